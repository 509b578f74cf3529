"""ToFu's pruning and MLERP merge against a literal transcription of the reference code
(OpenToMe, ``opentome/tome/tome.py``: ``bipartite_soft_matching`` and its ``merge(x, mode)``)."""

from __future__ import annotations

import pytest
import torch

from tieta.ops.merging import bipartite_soft_matching
from tieta.ops.tofu import mlerp_merge, prune, strategy_blocks
from tests.ops.reference_tome import reference_matching


def reference_tofu(x, metric, r, class_token, distill_token, mode):
    """The reference's matching (``reference_tome.py``) and merge as written there (its token map
    left out).

    Args: x (B, N, C), metric (B, N, C') the keys averaged over heads; mode "prune" or "tofu".
    """
    matching = reference_matching(metric, r, class_token, distill_token)
    if matching is None:
        return x
    r, unm_idx, src_idx, dst_idx = matching

    src, dst = x[..., ::2, :], x[..., 1::2, :]
    n, t1, c = src.shape
    unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
    if mode == "tofu":
        dst_norm = torch.norm(dst, dim=-1)
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        src_norm = torch.norm(src, dim=-1)
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="mean")
        n = dst_norm.scatter_reduce(-1, dst_idx.squeeze(-1), src_norm, reduce="amax")
        dst = dst / dst_norm[..., None] * n[..., None]
    # mode "prune" matches none of the reference's branches: the sources are simply left out
    if distill_token:
        return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    return torch.cat([unm, dst], dim=1)


def fuse(matching, x):
    return mlerp_merge(x, matching.kept_rows, matching.source_rows, matching.destination_rows)


def case(n: int, r: int, seed: int):
    torch.manual_seed(seed)
    return torch.randn(3, n, 12), torch.randn(3, 4, n, 6)  # x (B, N, C), keys (B, H, N, hd)


# (tokens, r, prefix): a class token, class and distillation tokens, an r the tokens clip
CASES = [(17, 4, 1), (18, 8, 1), (20, 5, 2), (9, 10, 1), (33, 12, 1)]


@pytest.mark.parametrize("n,r,num_prefix", CASES)
@pytest.mark.parametrize("mode", ["prune", "tofu"])
def test_matches_the_reference(n, r, num_prefix, mode):
    x, keys = case(n, r, seed=n + r)
    expected = reference_tofu(x, keys.mean(dim=1), r, True, num_prefix == 2, mode)
    matching = bipartite_soft_matching(keys.sum(dim=1), r, num_prefix)
    got = fuse(matching, x) if mode == "tofu" else prune(x, matching.kept_rows)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["prune", "tofu"])
def test_without_a_class_token_the_same_tokens_in_original_order(mode):
    """The reference leaves the unmerged A tokens in score order when there is no class token;
    tieta keeps them in their original order (as ToMe's merge does): the same rows, reordered."""
    x, keys = case(16, 5, seed=3)
    expected = reference_tofu(x, keys.mean(dim=1), 5, False, False, mode)
    matching = bipartite_soft_matching(keys.sum(dim=1), 5, 0)
    got = fuse(matching, x) if mode == "tofu" else prune(x, matching.kept_rows)
    unmerged = 8 - 5
    torch.testing.assert_close(got[:, unmerged:], expected[:, unmerged:], rtol=1e-5, atol=1e-6)
    by_first = lambda rows: rows[rows[:, 0].argsort()]
    for image in range(3):
        torch.testing.assert_close(by_first(got[image, :unmerged]), by_first(expected[image, :unmerged]))


def test_mlerp_keeps_the_largest_norm_and_leaves_the_rest_exact():
    x, keys = case(17, 6, seed=5)
    matching = bipartite_soft_matching(keys.sum(dim=1), 6, 1)
    fused = fuse(matching, x)
    pruned = prune(x, matching.kept_rows)
    changed = (fused != pruned).any(dim=-1)  # (B, N - r): the destinations only
    assert changed.sum() > 0 and not changed[:, 0].any()  # the class token untouched, bit for bit
    assert torch.equal(fused[~changed], pruned[~changed])
    # a destination's norm: the largest of its group, times ||mean|| / ||destination before||
    rows = x.reshape(-1, 12)
    for out_row, sources in _groups(matching).items():
        group = torch.stack([pruned.reshape(-1, 12)[out_row]] + [rows[s] for s in sources])
        mean = group.mean(dim=0)
        expected = mean / group[0].norm() * group.norm(dim=-1).max()
        torch.testing.assert_close(fused.reshape(-1, 12)[out_row], expected, rtol=1e-5, atol=1e-6)


def _groups(matching) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for source, destination in zip(matching.source_rows.tolist(), matching.destination_rows.tolist()):
        groups.setdefault(destination, []).append(source)
    return groups


def test_strategy_is_the_references():
    assert strategy_blocks(12) == [False] * 7 + [True] * 5  # i > 12 // 2
    assert strategy_blocks(3) == [False, False, True]
