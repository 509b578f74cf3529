"""Data-parallel training across processes started by ``torchrun``.

``torchrun --nproc_per_node=N -m tieta train ...`` starts N copies of ``tieta train``; each one
finds its place in the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...)
and joins one process group: NCCL on GPUs, gloo on the CPU.

The engine, and why it is exact:
- every process builds the same model from the same seed, and draws the same shuffled order;
- each global batch (``optim.batch_size`` images, as configured) is split into contiguous shards,
  one per process (``tieta.ops.shard``), so the global batch is the one a single process would see;
- the loss takes means over the global batch, and the gradients of the trained tensors are summed
  over the processes in one flat all-reduce after each backward pass: the sum of the shards'
  gradients is the gradient of the global batch. Only parameters are synchronised, so a process's
  token count may differ from another's (merging, DyT's skipping) without any cost;
- every process steps the same optimizer on the same gradients, so the parameters stay equal;
- evaluation splits the images over the processes and sums the counts.

Parameter-efficient fine-tuning trains well under 1% of the weights, so one flat all-reduce per
step moves little; overlapping it with the backward pass (what ``DistributedDataParallel`` does)
would save little and would not see parameters that a step did not use.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from tieta.errors import TietaError
from tieta.shard import Shard, shard_of, split_sizes


@dataclass(frozen=True)
class Processes:
    """This process's place among those training together (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder and prints."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def shard(self, global_count: int) -> Optional[Shard]:
        """This process's share of a global batch (None in a single process: nothing to share)."""
        return shard_of(global_count, self.rank, self.world, all_reduce_sum) if self.parallel else None


SINGLE = Processes()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join(device_name: str) -> tuple[Processes, str]:
    """Join the process group torchrun set up, if any; returns (this process's place, the device
    name to use: with CUDA, each process takes the GPU of its local rank)."""
    if not launched_by_torchrun():
        return SINGLE, device_name
    try:
        rank, world, local_rank = (int(os.environ[key]) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise TietaError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (torchrun sets them)") from None
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise TietaError(f"process {rank} wants GPU {local_rank} (its local rank), but torch sees "
                             f"{torch.cuda.device_count()} CUDA devices here")
        if device_name not in ("auto", "cuda"):
            raise TietaError(f"under torchrun each process takes the GPU of its local rank; use --device cuda "
                             f"or auto, not {device_name}")
        device_name = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Processes(rank, world, local_rank), device_name


def leave(processes: Processes) -> None:
    if launched_by_torchrun() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` over the processes, in place."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def sum_over_processes(values: Sequence[float], processes: Processes) -> list[float]:
    """Element-wise sums of a few numbers over the processes (float64)."""
    if not processes.parallel:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    all_reduce_sum(tensor)
    return tensor.tolist()


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def agree(ok: bool, processes: Processes) -> bool:
    """Whether every process is ``ok`` (so that all stop together when one cannot go on)."""
    return sum_over_processes([0.0 if ok else 1.0], processes)[0] == 0


def sum_gradients(parameters: Sequence[nn.Parameter], processes: Processes) -> None:
    """Sum the gradients of ``parameters`` over the processes, in one flat all-reduce (a parameter
    a process did not use counts as a zero gradient there)."""
    if not processes.parallel or not parameters:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    all_reduce_sum(flat)
    offset = 0
    for param, grad in zip(parameters, grads):
        size = grad.numel()
        param.grad = flat[offset:offset + size].view_as(param).to(param.dtype)
        offset += size


def gather_tensors(tensor: torch.Tensor, processes: Processes) -> list[torch.Tensor]:
    """Every process's ``tensor`` (all the same shape and dtype), in rank order."""
    if not processes.parallel:
        return [tensor]
    device = _collective_device()
    parts = [torch.empty_like(tensor, device=device) for _ in range(processes.world)]
    dist.all_gather(parts, tensor.to(device))
    return [part.cpu() for part in parts]


def barrier(processes: Processes) -> None:
    if processes.parallel:
        dist.barrier()


class ShardedBatches(Sampler[list[int]]):
    """This process's shard of each global batch drawn by ``batches`` (a ``BatchSampler``).

    A shard with no image (a last global batch smaller than the number of processes) holds the
    batch's first image as a placeholder, which ``tieta.ops.shard.batch_mean`` does not count.
    """

    def __init__(self, batches: Sampler[list[int]], processes: Processes) -> None:
        self.batches, self.processes = batches, processes

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = self.processes.rank, self.processes.world
        for batch in self.batches:
            sizes = split_sizes(len(batch), world)
            start = sum(sizes[:rank])
            yield batch[start:start + sizes[rank]] or batch[:1]


def global_batch_sizes(images: int, batch_size: int) -> list[int]:
    """The sizes of the global batches of one epoch (the last may be smaller)."""
    return [min(batch_size, images - start) for start in range(0, images, batch_size)]


def eval_indices(images: int, processes: Processes) -> list[int]:
    """The evaluation images this process scores: a contiguous share, none twice."""
    sizes = split_sizes(images, processes.world)
    start = sum(sizes[: processes.rank])
    return list(range(start, start + sizes[processes.rank]))
