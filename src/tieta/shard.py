"""The batch a process holds is one shard of the global batch.

In data-parallel training each process computes on its shard, and the gradients of all processes
are summed. Two things then need the global batch, not the shard, to give the same training as one
process with the whole batch:

- means over the batch (a cross-entropy, DyT's activation rate, which enters its loss squared):
  ``batch_mean`` takes the global mean's value, and gives each process the gradient of its own
  samples' share of it, so that the summed gradients are those of the global mean;
- random draws per sample (DyT's Gumbel noise): ``batch_rand`` draws for the whole global batch,
  from a generator every process holds in the same state, and keeps the shard's rows.

Outside data-parallel training (no shard set) both are the plain operations, bit for bit.

    with sharded(Shard(global_count=64, start=32, count=32, reduce=all_reduce_sum)):
        loss = batch_mean(F.cross_entropy(logits, labels, reduction="none"))
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch


@dataclass(frozen=True)
class Shard:
    """Which rows of the global batch this process holds.

    Attributes:
        global_count: images in the global batch.
        start: index of this process's first image in the global batch.
        count: images this process holds (0: it holds one placeholder image that must not count).
        reduce: sums a tensor over all processes, in place (``torch.distributed.all_reduce``).
    """

    global_count: int
    start: int
    count: int
    reduce: Callable[[torch.Tensor], None]


_current: Optional[Shard] = None


@contextlib.contextmanager
def sharded(shard: Optional[Shard]) -> Iterator[None]:
    """Within the block, batch means and draws are over the global batch ``shard`` belongs to."""
    global _current
    previous, _current = _current, shard
    try:
        yield
    finally:
        _current = previous


def current() -> Optional[Shard]:
    return _current


def batch_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over the global batch of per-image ``values``.

    Args:
        values: (b,) one value per image of this process's shard.

    Returns:
        0-dim: the global mean (the same value in every process); its gradient reaches this shard's
        images with weight 1 / global_count, so gradients summed over processes are exact.
    """
    shard = _current
    if shard is None:
        return values.mean()
    local = values.sum() if shard.count else values.sum() * 0.0
    total = local.detach().float().clone()
    shard.reduce(total)
    return (total.to(local.dtype) + local - local.detach()) / shard.global_count


def batch_rand(shape: Sequence[int], batch_dim: int = 0, device=None, dtype=None) -> torch.Tensor:
    """``torch.rand(shape)`` for this shard's rows, drawn as part of the global batch's draw.

    Args:
        shape: the local shape; ``shape[batch_dim]`` is this shard's number of rows.
        batch_dim: the dimension that runs over images.
    """
    shard = _current
    if shard is None:
        return torch.rand(*shape, device=device, dtype=dtype)
    full = list(shape)
    full[batch_dim] = shard.global_count
    start = shard.start if shard.count else 0
    return torch.rand(*full, device=device, dtype=dtype).narrow(batch_dim, start, shape[batch_dim])


def split_sizes(global_count: int, processes: int) -> list[int]:
    """How a global batch is split over processes: contiguous, sizes differ by at most one."""
    base, extra = divmod(global_count, processes)
    return [base + (1 if rank < extra else 0) for rank in range(processes)]


def shard_of(global_count: int, rank: int, processes: int, reduce: Callable[[torch.Tensor], None]) -> Shard:
    """The ``Shard`` that process ``rank`` holds of a global batch of ``global_count`` images."""
    sizes = split_sizes(global_count, processes)
    return Shard(global_count, sum(sizes[:rank]), sizes[rank], reduce)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy`` (mean) over the global batch. Args: logits (b, C); labels (b,)."""
    if _current is None:
        return torch.nn.functional.cross_entropy(logits, labels)
    return batch_mean(torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
