"""ATC's ops against a slow, literal transcription of the reference (``JoakimHaurum/ATC``,
``ATC_setup/models/atc.py``) and of the library code it calls per image: scikit-learn's
``AgglomerativeClustering(metric="precomputed")`` (the condensed upper triangle, scipy's
``linkage``, then ``_hc_cut``), scipy's ``nn_chain`` (average, complete) and
``mst_single_linkage`` (single), each with its ``label`` pass. Loops over images and tokens,
written to be read."""

from __future__ import annotations

import heapq
import math

import pytest
import torch

from tieta.ops.atc import LINKAGES, agglomerative_labels, cluster_counts, cosine_distances, merge_clusters

INF = math.inf

# ---------------------------------------------------------------------------------------------
# scipy.cluster.hierarchy, transcribed (scipy/cluster/_hierarchy.pyx)


def condensed_index(n: int, i: int, j: int) -> int:
    if i < j:
        return n * i - (i * (i + 1) // 2) + (j - i - 1)
    return n * j - (j * (j + 1) // 2) + (i - j - 1)


def new_dist(method: str, d_xi: float, d_yi: float, d_xy: float, size_x: int, size_y: int, size_i: int) -> float:
    if method == "complete":
        return max(d_xi, d_yi)
    return (size_x * d_xi + size_y * d_yi) / (size_x + size_y)  # average


def label(Z: list[list[float]], n: int) -> None:
    """Renumber the sorted dendrogram's clusters with a union-find (LinkageUnionFind)."""
    parent = list(range(2 * n - 1))
    size = [1] * n + [0] * (n - 1)
    next_label = n

    def find(x):
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for i in range(n - 1):
        x, y = int(Z[i][0]), int(Z[i][1])
        x_root, y_root = find(x), find(y)
        if x_root < y_root:
            Z[i][0], Z[i][1] = x_root, y_root
        else:
            Z[i][0], Z[i][1] = y_root, x_root
        parent[x_root] = parent[y_root] = next_label
        size[next_label] = size[x_root] + size[y_root]
        Z[i][3] = size[next_label]
        next_label += 1


def sort_and_label(Z: list[list[float]], n: int) -> list[list[float]]:
    Z = [Z[k] for k in sorted(range(n - 1), key=lambda k: Z[k][2])]  # np.argsort(kind='mergesort'): stable
    label(Z, n)
    return Z


def nn_chain(dists: list[float], n: int, method: str) -> list[list[float]]:
    Z = [[0.0] * 4 for _ in range(n - 1)]
    D = list(dists)
    size = [1] * n
    cluster_chain = [0] * n
    chain_length = 0
    y = 0
    for k in range(n - 1):
        if chain_length == 0:
            chain_length = 1
            for i in range(n):
                if size[i] > 0:
                    cluster_chain[0] = i
                    break
        while True:
            x = cluster_chain[chain_length - 1]
            if chain_length > 1:
                y = cluster_chain[chain_length - 2]
                current_min = D[condensed_index(n, x, y)]
            else:
                current_min = INF
            for i in range(n):
                if size[i] == 0 or x == i:
                    continue
                dist = D[condensed_index(n, x, i)]
                if dist < current_min:
                    current_min = dist
                    y = i
            if chain_length > 1 and y == cluster_chain[chain_length - 2]:
                break
            cluster_chain[chain_length] = y
            chain_length += 1
        chain_length -= 2
        if x > y:
            x, y = y, x
        nx, ny = size[x], size[y]
        Z[k] = [x, y, current_min, nx + ny]
        size[x] = 0
        size[y] = nx + ny
        for i in range(n):
            ni = size[i]
            if ni == 0 or i == y:
                continue
            D[condensed_index(n, i, y)] = new_dist(method, D[condensed_index(n, i, x)], D[condensed_index(n, i, y)],
                                                   current_min, nx, ny, ni)
    return sort_and_label(Z, n)


def mst_single_linkage(dists: list[float], n: int) -> list[list[float]]:
    Z = [[0.0] * 4 for _ in range(n - 1)]
    merged = [0] * n
    D = [INF] * n
    x, y = 0, 0
    for k in range(n - 1):
        current_min = INF
        merged[x] = 1
        for i in range(n):
            if merged[i] == 1:
                continue
            dist = dists[condensed_index(n, x, i)]
            if D[i] > dist:
                D[i] = dist
            if D[i] < current_min:
                y = i
                current_min = D[i]
        Z[k] = [x, y, current_min, 0]
        x = y
    return sort_and_label(Z, n)


# ---------------------------------------------------------------------------------------------
# scikit-learn, transcribed (sklearn/cluster/_agglomerative.py)


def hc_get_descendent(node: int, children: list[tuple[int, int]], n_leaves: int) -> list[int]:
    ind, descendent = [node], []
    while ind:
        i = ind.pop()
        if i < n_leaves:
            descendent.append(i)
        else:
            ind.extend(children[i - n_leaves])
    return descendent


def hc_cut(n_clusters: int, children: list[tuple[int, int]], n_leaves: int) -> list[int]:
    nodes = [-(max(children[-1]) + 1)]
    for _ in range(n_clusters - 1):
        these_children = children[-nodes[0] - n_leaves]
        heapq.heappush(nodes, -these_children[0])
        heapq.heappushpop(nodes, -these_children[1])
    labels = [0] * n_leaves
    for i, node in enumerate(nodes):
        for leaf in hc_get_descendent(-node, children, n_leaves):
            labels[leaf] = i
    return labels


def sklearn_labels(square: list[list[float]], n_clusters: int, linkage: str) -> list[int]:
    """``AgglomerativeClustering(n_clusters, metric="precomputed", linkage=linkage).fit(square).labels_``."""
    n = len(square)
    condensed = [float(square[i][j]) for i in range(n) for j in range(i + 1, n)]  # np.triu_indices(k=1), as double
    Z = mst_single_linkage(condensed, n) if linkage == "single" else nn_chain(condensed, n, linkage)
    children = [(int(row[0]), int(row[1])) for row in Z]
    return hc_cut(n_clusters, children, n)


# ---------------------------------------------------------------------------------------------
# the reference's agglomerative_clustering + merge_wavg, transcribed (ATC_setup/models/atc.py)


def reference_atc(metric: torch.Tensor, x: torch.Tensor, size, num_clusters: int, linkage: str):
    """One reduction with a class token: (merged x, sizes, labels per patch token)."""
    protected = 1
    B, T, _ = metric.shape
    num_clusters = min(num_clusters, T - protected)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric @ metric.transpose(-1, -2)
    scores = scores[:, 1:, 1:]
    scores = (1 - scores).tolist()
    cluster_labels = [sklearn_labels(scores[b], num_clusters, linkage) for b in range(B)]
    labels = torch.tensor(cluster_labels) + protected
    labels = torch.cat([torch.zeros(B, 1, dtype=torch.long), labels], dim=-1)
    if size is None:
        size = torch.ones_like(x[..., 0, None])

    def merge(t):
        dst = torch.zeros(B, num_clusters + protected, t.shape[-1], dtype=t.dtype)
        return dst.scatter_reduce(-2, labels.unsqueeze(-1).repeat(1, 1, t.shape[-1]), t, reduce="sum")

    out, size = merge(x * size), merge(size)
    return out / size, size, labels[:, 1:] - protected


def canonical(labels: list[int]) -> list[int]:
    """Cluster numbers in the order of their first token (the same partition, renumbered)."""
    first: dict[int, int] = {}
    for value in labels:
        first.setdefault(value, len(first))
    return [first[value] for value in labels]


# ---------------------------------------------------------------------------------------------
# tests


def test_cluster_counts_as_the_reference_rounds_them():
    assert cluster_counts(196, 0.7, 3) == [137, 96, 67]  # 196 * 0.7 ** 2 = 96.04: truncated
    assert cluster_counts(196, 0.9, 3) == [176, 158, 142]
    assert cluster_counts(196, 0.5, 3) == [98, 49, 24]


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize("clusters", [1, 5, 13, 24])
def test_labels_are_scikit_learns_partition(linkage, clusters):
    generator = torch.Generator().manual_seed(clusters)
    metric = torch.randn(3, 25, 8, generator=generator)
    distance = cosine_distances(metric, num_prefix=1)
    labels = agglomerative_labels(distance, clusters, linkage)
    metric = metric[:, 1:] / metric[:, 1:].norm(dim=-1, keepdim=True)
    square = (1 - metric @ metric.transpose(-1, -2)).tolist()
    for image in range(3):
        expected = canonical(sklearn_labels(square[image], clusters, linkage))
        assert labels[image].tolist() == expected


@pytest.mark.parametrize("linkage", LINKAGES)
def test_one_reduction_is_the_references(linkage):
    """Merged tokens and sizes: the reference's, with its clusters renumbered by first token."""
    generator = torch.Generator().manual_seed(7)
    metric, x = torch.randn(2, 17, 6, generator=generator), torch.randn(2, 17, 5, generator=generator)
    size = torch.randint(1, 4, (2, 17, 1), generator=generator).float()
    for sizes in (None, size):
        expected, expected_size, reference_labels = reference_atc(metric, x, sizes, 6, linkage)
        labels = agglomerative_labels(cosine_distances(metric, 1), 6, linkage)
        out, out_size = merge_clusters(x, labels, 6, sizes, 1)
        for image in range(2):
            order = [0] + [1 + c for c in dict.fromkeys(reference_labels[image].tolist())]  # first-token order
            torch.testing.assert_close(out[image], expected[image, order])
            torch.testing.assert_close(out_size[image], expected_size[image, order])


@pytest.mark.parametrize("linkage", LINKAGES)
def test_duplicated_tokens(linkage):
    """Duplicated tokens (exactly tied distances, as flat image regions give): the merged tokens
    are the reference's up to their order."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(1, 6, 4, generator=generator)
    metric = torch.cat([base[:, :1], base[:, 1:].repeat(1, 3, 1)], dim=1)  # class token + 5 tokens thrice
    x = torch.cat([base[:, :1], base[:, 1:].repeat(1, 3, 1)], dim=1)
    for clusters in (3, 5, 7, 10):
        expected, expected_size, _ = reference_atc(metric, x, None, clusters, linkage)
        labels = agglomerative_labels(cosine_distances(metric, 1), clusters, linkage)
        out, out_size = merge_clusters(x, labels, clusters, None, 1)
        rows = sorted(torch.cat([out[0], out_size[0]], dim=1).tolist())
        expected_rows = sorted(torch.cat([expected[0], expected_size[0]], dim=1).tolist())
        torch.testing.assert_close(torch.tensor(rows), torch.tensor(expected_rows))


def test_single_linkage_breaks_ties_as_scipy():
    """Many exactly equal distances (integer grid points, city-block distance): single linkage
    gives scikit-learn's partition all the same. (Complete and average linkage need not: scipy's
    chain may merge another of the tied pairs first; see tieta.ops.atc.)"""
    generator = torch.Generator().manual_seed(4)
    for trial in range(20):
        tokens = 4 + trial
        points = torch.randint(0, 3, (tokens, 2), generator=generator).double()
        square = (points[:, None] - points[None]).abs().sum(-1)
        distance = square.masked_fill(torch.eye(tokens, dtype=torch.bool), INF)[None]
        clusters = 1 + trial % tokens
        labels = agglomerative_labels(distance, clusters, "single")[0].tolist()
        assert labels == canonical(sklearn_labels(square.tolist(), clusters, "single"))


def test_keep_all_and_bad_arguments():
    metric = torch.randn(2, 9, 4)
    labels = agglomerative_labels(cosine_distances(metric, 1), 8, "single")
    assert labels.tolist() == [list(range(8))] * 2
    with pytest.raises(ValueError, match="linkage"):
        agglomerative_labels(cosine_distances(metric, 1), 3, "ward")
    with pytest.raises(ValueError, match="clusters"):
        agglomerative_labels(cosine_distances(metric, 1), 9, "average")


def test_batched_is_per_image():
    generator = torch.Generator().manual_seed(5)
    metric = torch.randn(4, 21, 8, generator=generator)
    for linkage in LINKAGES:
        together = agglomerative_labels(cosine_distances(metric, 2), 7, linkage)
        alone = torch.cat([agglomerative_labels(cosine_distances(metric[i:i + 1], 2), 7, linkage) for i in range(4)])
        assert torch.equal(together, alone)


def test_agrees_with_scikit_learn_itself():
    """Where scikit-learn is installed (it is no dependency of tieta), its labels, renumbered."""
    cluster = pytest.importorskip("sklearn.cluster")
    generator = torch.Generator().manual_seed(11)
    metric = torch.randn(2, 30, 8, generator=generator)
    for linkage in LINKAGES:
        labels = agglomerative_labels(cosine_distances(metric, 1), 9, linkage)
        normed = metric[:, 1:] / metric[:, 1:].norm(dim=-1, keepdim=True)
        square = (1 - normed @ normed.transpose(-1, -2)).numpy()
        for image in range(2):
            clustering = cluster.AgglomerativeClustering(n_clusters=9, metric="precomputed", linkage=linkage)
            fitted = clustering.fit(square[image])
            assert labels[image].tolist() == canonical(fitted.labels_.tolist())
