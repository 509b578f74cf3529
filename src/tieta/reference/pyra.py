"""Checkpoints of the PYRA code (github.com/THU-MIG/PYRA, ``model/vision_transformer_timm.py``,
``model/tome.py``, ``model/adaptive_merge.py``) in tieta's terms.

Key layout pinned from that code (a timm 0.5.4 ViT with its own modules added; ``train.py`` saves
``{"model": model.state_dict(), ..., "args": Namespace}`` as ``best_checkpoint.pth``):

    blocks.{i}.attn.LoRA_a.weight (rank, D)   -> blocks.{i}.attn.qkv.lora_A (rank, D)
    blocks.{i}.attn.LoRA_b.weight (3D, rank)  -> blocks.{i}.attn.qkv.lora_B (1, 3D, rank)
    blocks.{i}.pyra_a (r_i, 1)  W_r           -> blocks.{i}.pyra.channel_weight
    blocks.{i}.pyra_b (1, D)    W_D           -> blocks.{i}.pyra.token_weight
    blocks.{i}.pyra_norm.weight / .bias (D,)  -> blocks.{i}.pyra.norm.weight / .bias
    everything else keeps its name: patch_embed.proj, cls_token, pos_embed, blocks.{i}.norm1,
    attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2, norm, head (and dist_token, head_dist for DeiT
    distilled) are named alike in timm 0.5.4 and today's timm.

Semantics, checked against tieta's: LoRA adds ``LoRA_b(LoRA_a(x))`` to q, k and v (the fused qkv
output) with scale 1 = tieta's fused LoRA with ``alpha`` None. PYRA's merge (``merge_wavg`` with
``pyra_weight``) is tieta's ``PyraModulation`` exactly: ``LayerNorm(src + dst)`` of the size-weighted
tokens, ``w_ch = 2 sigmoid(pyra_a^T M)``, ``w_tok = 2 sigmoid(M pyra_b^T) - 1``, ``src + src w_ch
w_tok``, with proportional attention on (``apply_tome``'s default). The code builds PYRA in a block
only where its r > 0, with ``pyra_r = tome_r``, so the merge schedule is read from the rows of
``pyra_a`` (a block without PYRA merges nothing). A checkpoint trained with ToMe but without PYRA
(``--token_merging`` alone) does not show its schedule in its tensors: it is taken from the saved
``args`` (``merging_schedule``), or from ``--schedule``.

Refused, each with a sentence: the code's sequential QuickGELU adapter, visual prompts and prefix
tokens (its other PETL options, off in every PYRA config), and a representation layer.

Uncertain: the released PYRA configs use ViT-B/16, ViT-L/16 (ImageNet-21k) and DeiT distilled; their
layouts follow from the code, no released fine-tuned checkpoint was available to compare with.
"""

from __future__ import annotations

from typing import Any, Optional

from tieta.errors import TietaError
from tieta.reference.common import (LORA_RENAMES, NOAH_FAMILY_UNSUPPORTED, Converted, Reference, Rename, arg,
                                    convert_lora, lora_rank, normalization, per_block, refuse_unsupported,
                                    rename_all)

PYRA_A = Rename("blocks.{i}.pyra_a", "blocks.{i}.pyra.channel_weight")
PYRA_B = Rename("blocks.{i}.pyra_b", "blocks.{i}.pyra.token_weight")
PYRA_NORM_WEIGHT = Rename("blocks.{i}.pyra_norm.weight", "blocks.{i}.pyra.norm.weight")
PYRA_NORM_BIAS = Rename("blocks.{i}.pyra_norm.bias", "blocks.{i}.pyra.norm.bias")
PYRA_RENAMES = (PYRA_A, PYRA_B, PYRA_NORM_WEIGHT, PYRA_NORM_BIAS)
RENAMES = (*LORA_RENAMES, *PYRA_RENAMES)
NO_MERGING = "none"


def _merge_schedule(reference: Reference, depth: int, schedule: Any, has_pyra: bool,
                    notes: list[str]) -> Optional[Any]:
    """The merge schedule: from the PYRA modules, else ``schedule``, else the saved arguments;
    None for a model that does not merge."""
    tensors = reference.tensors
    if has_pyra:
        if schedule is not None:
            raise TietaError("--schedule is for checkpoints without PYRA modules; this one's PYRA modules fix its "
                             "merge schedule")
        rows = per_block(tensors, PYRA_A)
        for index, weight in rows.items():
            if weight.dim() != 2:
                raise TietaError(f"{PYRA_A.reference.format(i=index)} is {tuple(weight.shape)} in "
                                 f"{reference.path}, but PYRA's W_r is (r, 1)")
        return [int(rows[index].shape[0]) if index in rows else 0 for index in range(depth)]
    if schedule is not None:
        return None if schedule == NO_MERGING else schedule
    if "token_merging" in reference.args:
        if not arg(reference.args, "token_merging", False, bool):
            return None
        named = arg(reference.args, "merging_schedule", None, str)
        if named is None:
            raise TietaError(f"{reference.path} was trained with token merging but its saved arguments do not name "
                             "the schedule; pass --schedule low|high|[r, ...]")
        notes.append(f"ToMe schedule {named!r}, from the checkpoint's saved arguments")
        return named
    raise TietaError(f"{reference.path} has no PYRA modules and does not say whether it was trained with token "
                     "merging; pass --schedule low|high|[r, ...] (ToMe) or --schedule none")


def convert(reference: Reference, depth: int, schedule: Any = None) -> Converted:
    """The PYRA code's checkpoint in tieta's terms (see the module docstring).

    Args:
        depth: blocks of the model it is imported into.
        schedule: ``--schedule`` ("none": no merging), for checkpoints without PYRA modules.
    """
    tensors = reference.tensors
    refuse_unsupported(tensors, NOAH_FAMILY_UNSUPPORTED, reference.path)
    notes: list[str] = []
    has_pyra = any(rule.match(key) is not None for key in tensors for rule in PYRA_RENAMES)
    merges = _merge_schedule(reference, depth, schedule, has_pyra, notes)
    rank = lora_rank(tensors)
    methods = (["pyra"] if has_pyra else ["tome"] if merges is not None else []) + (["lora"] if rank else [])
    if not methods:
        raise TietaError(f"{reference.path} holds neither LoRA nor PYRA modules and merges no tokens: there is "
                         "nothing but a classifier to import")
    settings: dict[str, Any] = {
        "method": "+".join(methods),
        "drop_path": arg(reference.args, "drop_path", 0.1, float),
        "data.normalization": normalization(reference.args),
    }
    if rank:
        settings.update({"lora.rank": rank, "lora.targets": "qkv", "lora.alpha": None,
                         "lora.dropout": arg(reference.args, "drop_rate_LoRA", 0.1, float)})
    if merges is not None:
        settings.update({"merge.schedule": merges, "merge.prop_attn": True})
    if arg(reference.args, "input_size", None, int) is not None:
        settings["img_size"] = reference.args["input_size"]
    if not reference.args:
        notes.append("the checkpoint kept no training arguments: ImageNet normalisation, drop-path 0.1 and LoRA "
                     "dropout 0.1 (the script's defaults) are assumed")
    converted, origin = rename_all(tensors, RENAMES, convert_lora(rank))
    return Converted(settings["method"], settings, converted, origin, RENAMES, notes)
