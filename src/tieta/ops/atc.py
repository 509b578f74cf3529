"""ATC: agglomerative clustering of the patch tokens (Haurum et al., ECCV 2024).

In a reduction block, right after the attention residual, the patch tokens are clustered bottom-up
by the cosine distance of their keys (averaged over heads), and each cluster becomes one token, the
size-weighted mean of its members:

    distance = cosine_distances(keys.mean(dim=1), num_prefix)         # (B, n, n), 1 - cos
    labels = agglomerative_labels(distance, clusters, "average")      # (B, n) cluster of each token
    x, size = merge_clusters(x, labels, clusters, size, num_prefix)   # (B, prefix + clusters, D)

The clustering is the textbook one: every token starts as its own cluster, and the two clusters at
the smallest distance merge, ``n - clusters`` times; the distance of a merged cluster to another
follows its linkage (Lance-Williams): ``single`` the smaller of its parts' distances, ``complete``
the larger, ``average`` their mean weighted by the parts' token counts (the mean of all pairwise
distances). The reference (``JoakimHaurum/ATC``) calls scikit-learn's ``AgglomerativeClustering``
per image (scipy's nearest-neighbour chain, or its minimum spanning tree for single linkage, then
a cut of the dendrogram); single, complete and average linkage are reducible, so both give the same
clusters whenever no two candidate distances are exactly equal. Differences from the reference, said plainly:

- ties: single linkage follows scipy's minimum spanning tree, ties included; for complete and
  average linkage, where two pairs are at exactly the same distance, this merges the pair of lowest
  token indices first, and scipy's chain may reach another of the tied pairs first (following the
  chain exactly would take up to 3 n small steps per reduction instead of n - clusters, which
  compiled and exported graphs unroll);
- order: the clusters come out in the order of their first token (scikit-learn numbers them in
  the order of its heap); a ViT without rotary positions computes the same for any order;
- prefix tokens: every one (class, distillation, registers) is protected; the reference drops only
  the class token from the distances and would cluster a distillation token.

Distances are taken in float32 as the reference does, then clustered in float64 (scipy's type).
"""

from __future__ import annotations

from typing import Optional

import torch

LINKAGES = ("single", "complete", "average")


def cluster_counts(num_patches: int, keep_rate: float, stages: int) -> list[int]:
    """The reference's clusters per reduction location: ``int(num_patches * keep_rate ** (i + 1))``.

    The keep rate compounds over the locations and the count is truncated, both as the reference
    computes them (ViT-B/16 at keep rate 0.7: 137, 96, 67 clusters).

    Args:
        num_patches: patch tokens of the model (196 for ViT-B/16 at 224 px).
        keep_rate: share of the patch tokens kept per location.
        stages: how many reduction locations.
    """
    return [int(num_patches * keep_rate ** (index + 1)) for index in range(stages)]


@torch.no_grad()
def cosine_distances(metric: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """1 - cosine similarity between the patch tokens' metrics, symmetric from the upper triangle.

    Args:
        metric: (B, N, C) similarity features (keys averaged over heads).
        num_prefix: leading tokens left out (class, distillation, registers).

    Returns:
        (B, n, n) float64 distances of the n = N - num_prefix patch tokens, +inf on the diagonal.
        As scipy reads a square matrix (its upper triangle), the lower triangle is its mirror.
    """
    metric = metric[:, num_prefix:].float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    distance = (1 - metric @ metric.transpose(-1, -2)).double()  # float32 as the reference, then scipy's double
    upper = distance.triu(diagonal=1)
    symmetric = upper + upper.transpose(-1, -2)
    eye = torch.eye(symmetric.shape[-1], dtype=torch.bool, device=symmetric.device)
    return symmetric.masked_fill(eye, float("inf"))


def linkage_update(linkage: str, to_kept: torch.Tensor, to_merged: torch.Tensor, kept_count: torch.Tensor,
                   merged_count: torch.Tensor) -> torch.Tensor:
    """Distance from the union of two clusters to every other cluster (Lance-Williams, as scipy).

    Args:
        linkage: "single", "complete" or "average".
        to_kept, to_merged: (B, n) distances of every cluster to the two merging clusters.
        kept_count, merged_count: (B, 1) tokens in each of the two.

    Returns:
        (B, n) distances to their union.
    """
    if linkage == "single":
        return torch.minimum(to_kept, to_merged)
    if linkage == "complete":
        return torch.maximum(to_kept, to_merged)
    return (kept_count * to_kept + merged_count * to_merged) / (kept_count + merged_count)


@torch.no_grad()
def agglomerative_labels(distance: torch.Tensor, clusters: int, linkage: str = "average") -> torch.Tensor:
    """Cluster every image's tokens bottom-up into ``clusters`` clusters.

    Single linkage: :func:`single_linkage_labels`. Complete and average: each step merges, in every
    image at once, the two clusters at the smallest distance (the pair of lowest indices among exact
    ties); the union lives on at the lower index. ``n - clusters`` steps, each O(B n^2): a Python
    loop of a fixed count, so ``torch.compile`` and ONNX export unroll it.

    Args:
        distance: (B, n, n) symmetric distances, +inf on the diagonal (:func:`cosine_distances`).
        clusters: clusters to form, 1..n.
        linkage: "single", "complete" or "average".

    Returns:
        (B, n) long: the cluster of each token, 0..clusters-1, numbered in the order of their
        first token.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    batch, tokens, _ = distance.shape
    if not 1 <= clusters <= tokens:
        raise ValueError(f"cannot form {clusters} clusters of {tokens} tokens")
    if linkage == "single":
        return single_linkage_labels(distance, clusters)
    device = distance.device
    distance = distance.clone()  # updated in place, row and column of each merge: O(B n) a step
    rows = distance.view(batch * tokens, tokens)  # image b's row i is row b * n + i
    cells = distance.view(-1)
    root = torch.arange(tokens, device=device).expand(batch, tokens).clone()  # each token's cluster
    count = torch.ones(batch * tokens, dtype=distance.dtype, device=device)  # tokens per cluster, as rows
    first_row = torch.arange(batch, device=device) * tokens  # (B,)
    columns = torch.arange(tokens, device=device)
    for _ in range(tokens - clusters):
        pair = distance.reshape(batch, -1).argmin(dim=1)  # row-major: the first (i < j) of the smallest
        kept, merged = pair // tokens, pair % tokens  # (B,), kept < merged
        kept_row, merged_row = first_row + kept, first_row + merged
        kept_count, merged_count = count[kept_row][:, None], count[merged_row][:, None]
        joined = linkage_update(linkage, rows[kept_row], rows[merged_row], kept_count, merged_count)  # (B, n)
        gone = (columns == kept[:, None]) | (columns == merged[:, None])
        joined = joined.masked_fill(gone, float("inf"))
        # 1-D index copies: advanced indexing around a slice takes a slow path on the CPU
        in_column = (first_row[:, None] + columns) * tokens  # (B, n): where each row starts
        rows.index_copy_(0, kept_row, joined)  # the union's row
        cells.index_copy_(0, (in_column + kept[:, None]).reshape(-1), joined.reshape(-1))  # and column
        rows.index_fill_(0, merged_row, float("inf"))  # the merged cluster is gone
        cells.index_fill_(0, (in_column + merged[:, None]).reshape(-1), float("inf"))
        count.index_copy_(0, kept_row, (kept_count + merged_count)[:, 0])
        root = torch.where(root == merged[:, None], kept[:, None], root)
    return numbered(root)


@torch.no_grad()
def single_linkage_labels(distance: torch.Tensor, clusters: int) -> torch.Tensor:
    """Single linkage as scipy computes it, ties included: the minimum spanning tree grown by Prim
    from token 0 (the lowest index among equally near tokens joins first), its edges sorted stably
    by length, and the clusters those shorter than the cut connect.

    Args:
        distance: (B, n, n) symmetric distances (:func:`cosine_distances`).
        clusters: clusters to form, 1..n.

    Returns:
        (B, n) long: the cluster of each token, numbered in the order of their first token.
    """
    batch, tokens, _ = distance.shape
    device = distance.device
    images = torch.arange(batch, device=device)
    nearest = torch.full((batch, tokens), float("inf"), dtype=distance.dtype, device=device)  # to the tree
    in_tree = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    last = torch.zeros(batch, dtype=torch.long, device=device)  # the token that joined last
    starts, ends, lengths = [], [], []
    for _ in range(tokens - 1):
        in_tree = in_tree | (torch.arange(tokens, device=device) == last[:, None])
        nearest = torch.minimum(nearest, distance[images, last]).masked_fill(in_tree, float("inf"))
        joining = nearest.argmin(dim=1)  # first index of the smallest
        starts.append(last)
        ends.append(joining)
        lengths.append(nearest[images, joining])
        last = joining
    root = torch.arange(tokens, device=device).expand(batch, tokens).clone()
    if tokens == 1:
        return numbered(root)
    order = torch.stack(lengths, dim=1).sort(dim=1, stable=True).indices  # (B, n - 1)
    starts, ends = torch.stack(starts, dim=1).gather(1, order), torch.stack(ends, dim=1).gather(1, order)
    for step in range(tokens - clusters):  # join along the shortest edges
        a, b = root[images, starts[:, step]], root[images, ends[:, step]]
        low, high = torch.minimum(a, b), torch.maximum(a, b)
        root = torch.where(root == high[:, None], low[:, None], root)
    return numbered(root)


def numbered(root: torch.Tensor) -> torch.Tensor:
    """(B, n) cluster numbers 0.. in the order of their first token, from each token's cluster
    root (B, n), the root being the cluster's first token."""
    alive = root == torch.arange(root.shape[1], device=root.device)  # (B, n): the clusters' first tokens
    number = alive.long().cumsum(dim=1) - 1
    return number.gather(1, root)


def merge_clusters(x: torch.Tensor, labels: torch.Tensor, clusters: int, size: Optional[torch.Tensor],
                   num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cluster of patch tokens as one token, the size-weighted mean of its members.

    Args:
        x: (B, N, D) tokens after the attention residual.
        labels: (B, N - num_prefix) cluster of each patch token, 0..clusters-1.
        clusters: number of clusters.
        size: (B, N, 1) input patches per token, None for 1 each (the reference's first merge).
        num_prefix: leading tokens passed through in front, each its own token.

    Returns:
        (B, num_prefix + clusters, D) tokens and their (B, num_prefix + clusters, 1) sizes.
    """
    batch, _, width = x.shape
    if size is None:
        size = x.new_ones(batch, x.shape[1], 1)
    prefix = torch.arange(num_prefix, device=x.device).expand(batch, num_prefix)
    index = torch.cat([prefix, labels + num_prefix], dim=1)[..., None]  # (B, N, 1)
    slots = num_prefix + clusters
    total = x.new_zeros(batch, slots, width).scatter_add(1, index.expand(-1, -1, width), x * size)
    size = size.new_zeros(batch, slots, 1).scatter_add(1, index, size)
    return total / size, size
