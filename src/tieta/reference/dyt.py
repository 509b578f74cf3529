"""Checkpoints of the DyT code (github.com/NUS-HPC-AI-Lab/Dynamic-Tuning,
``models/vision_transformer_IN21K.py``, ``models/dynamic_adapter.py``, ``main_vtab.py``) in tieta's terms.

Key layout pinned from that code (a timm 0.9-style ViT; ``misc.save_model`` writes
``{"model": model.state_dict(), "optimizer", "epoch", "scaler", "args": Namespace}`` as
``checkpoint-<epoch>.pth``):

    blocks.{i}.mlp_token_select.mlp_head.weight (1, D) / .bias (1,) -> blocks.{i}.dispatcher.weight / .bias
    blocks.{i}.adaptmlp.down_proj.weight (d, D) / .bias (d,)         -> blocks.{i}.adapter.down.weight / .bias
    blocks.{i}.adaptmlp.up_proj.weight (D, d) / .bias (D,)           -> blocks.{i}.adapter.up.weight / .bias
    blocks.{i}.adaptmlp.scale (1,), only with adapter_scalar "learnable_scalar": folded into up
    everything else keeps its name (patch_embed.proj, cls_token, pos_embed, blocks.{i}.norm1,
    attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2, norm, head): the code's ViT is named as today's timm's.

Semantics, checked against tieta's DyT with MLP dispatch: ``TokenSelect`` is a Linear(D, 1) on the
tokens after the class token (``x[:, 1:]``), with the class token always active; training takes a
hard Gumbel-sigmoid at tau 5, evaluation ``sigmoid(logit) > 0.5``; the block computes
``x = x + attn(norm1(x)); x = x + mask * mlp(norm2(x)) + adaptmlp(x)``, the adapter on every token
and on the stream after attention, ``up(dropout(relu(down(x)))) * scale`` with dropout 0.1 and
``adapter_layernorm_option="none"``. ``main_vtab.py`` sets ``args.scale = 1`` and normalises with the
Inception mean and std (0.5/0.5), which the import records. The adapter width is read from the
tensors (the released script uses ``--ffn_num 16``), rho from ``token_target_ratio``.

Refused: an adapter LayerNorm (``adapter_layernorm_option`` "in"/"out", unused by the release).
Uncertain: the code takes one prefix token (the class token); tieta's dispatcher skips every prefix
token, the same for the ViT-B/16 the release trains, different only for models with more prefix
tokens, which the DyT code does not build.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from tieta.errors import TietaError
from tieta.reference.common import (Converted, Reference, Rename, arg, matrix, pad_dim, per_block, refuse_unsupported,
                                    rename_all, shape_text)

DISPATCHER_WEIGHT = Rename("blocks.{i}.mlp_token_select.mlp_head.weight", "blocks.{i}.dispatcher.weight")
DISPATCHER_BIAS = Rename("blocks.{i}.mlp_token_select.mlp_head.bias", "blocks.{i}.dispatcher.bias")
DOWN_WEIGHT = Rename("blocks.{i}.adaptmlp.down_proj.weight", "blocks.{i}.adapter.down.weight")
DOWN_BIAS = Rename("blocks.{i}.adaptmlp.down_proj.bias", "blocks.{i}.adapter.down.bias")
UP_WEIGHT = Rename("blocks.{i}.adaptmlp.up_proj.weight", "blocks.{i}.adapter.up.weight")
UP_BIAS = Rename("blocks.{i}.adaptmlp.up_proj.bias", "blocks.{i}.adapter.up.bias")
SCALE = Rename("blocks.{i}.adaptmlp.scale", "blocks.{i}.adapter.learned_scale")  # folded, never stored
RENAMES = (DISPATCHER_WEIGHT, DISPATCHER_BIAS, DOWN_WEIGHT, DOWN_BIAS, UP_WEIGHT, UP_BIAS, SCALE)

UNSUPPORTED = [
    (r"adaptmlp\.adapter_layer_norm_before\.", "a LayerNorm inside the adapter (AdaptFormer's layernorm option "
     "'in' or 'out'; the DyT release uses 'none'), which tieta's adapter does not have"),
]
DYT_DROPOUT = 0.1  # hard-coded in the code's Block (Adapter(..., dropout=0.1))


def _scales(reference: Reference) -> dict[int, torch.Tensor]:
    """Each block's learned adapter scale (adapter_scalar "learnable_scalar"), as a 0-d tensor."""
    scales = per_block(reference.tensors, SCALE)
    for index, scale in scales.items():
        if scale.numel() != 1:
            raise TietaError(f"{SCALE.reference.format(i=index)} is {shape_text(scale.shape)} in {reference.path}, "
                             "but the adapter's learned scale is one number")
    return {index: scale.reshape(()) for index, scale in scales.items()}


def convert(reference: Reference, depth: int, schedule: Any = None) -> Converted:
    """The DyT code's checkpoint in tieta's terms (see the module docstring).

    Args:
        depth: blocks of the model it is imported into (unused: DyT is in every block).
        schedule: must be None (the DyT code does not merge tokens).
    """
    if schedule is not None:
        raise TietaError("--schedule is for PYRA-code checkpoints; the DyT code does not merge tokens")
    tensors = reference.tensors
    refuse_unsupported(tensors, UNSUPPORTED, reference.path)
    downs = {index: matrix(DOWN_WEIGHT.reference.format(i=index), weight)
             for index, weight in per_block(tensors, DOWN_WEIGHT).items()}
    ups = {index: matrix(UP_WEIGHT.reference.format(i=index), weight)
           for index, weight in per_block(tensors, UP_WEIGHT).items()}
    width = max([weight.shape[0] for weight in downs.values()] + [weight.shape[1] for weight in ups.values()],
                default=0)
    if not width or not per_block(tensors, DISPATCHER_WEIGHT):
        raise TietaError(f"{reference.path} holds no DyT modules (blocks.N.mlp_token_select and blocks.N.adaptmlp)")
    scales = _scales(reference)

    def to_tieta(rule: Rename, index: int, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        if rule is SCALE:
            return None
        if rule in (UP_WEIGHT, UP_BIAS) and index in scales:  # s * (W h + b) = (s W) h + s b
            tensor = tensor * scales[index].to(tensor.dtype)
        if rule in (DOWN_WEIGHT, DOWN_BIAS):
            return pad_dim(tensor, 0, width)  # zero rows: relu(0) = 0 feeds nothing forward
        if rule is UP_WEIGHT:
            return pad_dim(tensor, 1, width)
        return tensor

    notes = []
    if scales:
        scale = 1.0
        notes.append("the adapters' learned scales are folded into their up projections")
    else:
        scale = arg(reference.args, "scale", 1.0, float)
    if not reference.args:
        notes.append("the checkpoint kept no training arguments: rho 0.5, adapter scale 1 and drop-path 0 (the "
                     "release's settings) are assumed")
    settings: dict[str, Any] = {
        "method": "dyt", "dyt.variant": "mlp", "dyt.experts": 1, "dyt.adapter_dim": width,
        "dyt.rho": arg(reference.args, "token_target_ratio", 0.5, float), "dyt.tau": 5.0,
        "adapter.scale": scale, "adapter.dropout": DYT_DROPOUT,
        "drop_path": arg(reference.args, "drop_path", 0.0, float),
        "data.normalization": "inception",
    }
    converted, origin = rename_all(tensors, RENAMES, to_tieta)
    return Converted("dyt", settings, converted, origin, RENAMES, notes)
