"""Checkpoints of the NOAH code (github.com/ZhangYuanhan-AI/NOAH, ``model/supernet_vision_transformer_timm.py``,
``supernet_train_prompt.py``) in tieta's terms: its LoRA baseline (``--is_LoRA``), on the fused qkv.

Key layout pinned from that code (a timm 0.5.4 ViT with its PETL modules; the script saves
``{"model": model.state_dict(), ..., "args": Namespace}`` as ``checkpoint.pth`` every epoch):

    blocks.{i}.attn.LoRA_a.weight (rank, D)   -> blocks.{i}.attn.qkv.lora_A (rank, D)
    blocks.{i}.attn.LoRA_b.weight (3D, rank)  -> blocks.{i}.attn.qkv.lora_B (1, 3D, rank)
    everything else keeps its name (patch_embed.proj, cls_token, pos_embed, blocks.{i}.norm1,
    attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2, norm, head): timm 0.5.4 and today's timm agree.

Semantics: ``q, k, v += split(LoRA_b(LoRA_a(dropout(x))))``, scale 1, which is tieta's fused LoRA
with ``alpha`` None. The NOAH code runs a block's LoRA at a sampled rank, the first rows of
``LoRA_a`` and columns of ``LoRA_b`` (``set_sample_config``); the LoRA baseline samples the full
rank, which is what is imported.

Refused, each with a sentence: NOAH's adapter (sequential on the MLP output, QuickGELU: not
AdaptFormer), visual prompts and prefix tokens, so NOAH's searched subnets (which combine all three
with LoRA) are refused; only LoRA checkpoints import.

Uncertain: a retrained subnet whose LoRA ranks are below the stored rank computes with the first
rows only; its unused ``LoRA_b`` columns stay at their zero initialisation (never given a gradient),
so the full product is the same, but a checkpoint whose unused columns were changed otherwise would
not import exactly. Normalisation: ImageNet's mean and std unless its arguments say --inception.
"""

from __future__ import annotations

from typing import Any

from tieta.errors import TietaError
from tieta.reference.common import (LORA_RENAMES, NOAH_FAMILY_UNSUPPORTED, Converted, Reference, arg,
                                    convert_lora, lora_rank, normalization, refuse_unsupported, rename_all)


def convert(reference: Reference, depth: int, schedule: Any = None) -> Converted:
    """The NOAH code's LoRA checkpoint in tieta's terms (see the module docstring).

    Args:
        depth: blocks of the model it is imported into (unused: LoRA is in every block).
        schedule: must be None (the NOAH code does not merge tokens).
    """
    if schedule is not None:
        raise TietaError("--schedule is for PYRA-code checkpoints; the NOAH code does not merge tokens")
    tensors = reference.tensors
    refuse_unsupported(tensors, NOAH_FAMILY_UNSUPPORTED, reference.path)
    rank = lora_rank(tensors)
    if not rank:
        raise TietaError(f"{reference.path} holds no LoRA (blocks.N.attn.LoRA_a.weight): tieta imports NOAH's LoRA "
                         "checkpoints")
    settings: dict[str, Any] = {
        "method": "lora", "lora.rank": rank, "lora.targets": "qkv", "lora.alpha": None,
        "lora.dropout": arg(reference.args, "drop_rate_LoRA", 0.1, float),
        "drop_path": arg(reference.args, "drop_path", 0.1, float),
        "data.normalization": normalization(reference.args),
    }
    if arg(reference.args, "input_size", None, int) is not None:
        settings["img_size"] = reference.args["input_size"]
    notes = [] if reference.args else ["the checkpoint kept no training arguments: ImageNet normalisation, "
                                       "drop-path 0.1 and LoRA dropout 0.1 (the script's defaults) are assumed"]
    converted, origin = rename_all(tensors, LORA_RENAMES, convert_lora(rank))
    return Converted("lora", settings, converted, origin, LORA_RENAMES, notes)
