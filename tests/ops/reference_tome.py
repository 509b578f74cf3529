"""ToMe's bipartite soft matching as the reference repositories copy it (``tome/merge.py``'s
``bipartite_soft_matching``, in OpenToMe's ``opentome/tome/tome.py`` for ToFu and in
``dtem/utils.py`` for DTEM): the part their transcriptions in ``test_tofu_ops.py`` and
``test_dtem_ops.py`` share, written once as there."""

from __future__ import annotations

import math
from typing import Optional

import torch


@torch.no_grad()
def reference_matching(metric: torch.Tensor, r: int, class_token: bool,
                       distill_token: bool = False) -> Optional[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Match the A tokens (even positions) to the B tokens (odd ones) by cosine similarity and pick
    the r best-matched A tokens to merge; the class token (and the distillation token) are never
    picked.

    Args:
        metric: (B, N, C) the keys averaged over heads.
        r: tokens to merge away, clipped to what the unprotected tokens allow.

    Returns:
        None when nothing merges, else (r, unmerged, sources, destinations): the clipped r, the
        indices (B, N_A - r, 1) of the A tokens kept, (B, r, 1) of those merged, and (B, r, 1) of
        the B token each merges into. Without a class token the kept A tokens are in score order.
    """
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return None
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]
    return r, unm_idx, src_idx, dst_idx
