"""Peak memory of one training step: the most tensor bytes alive at once during forward, loss,
backward and the AdamW step, counted from torch's allocator (not the process's resident set, which
also holds the Python interpreter, libraries and freed memory the allocator keeps).

What is counted: the model's parameters and buffers, their gradients from the step before, AdamW's
moments, the batch, and every tensor the step makes while it is alive (activations kept for
backward, gradients, temporaries), at the moment their sum is highest. On CUDA that is what was
allocated before the step plus ``torch.cuda.max_memory_allocated``'s rise during it (after a
reset); on the CPU it is the running sum, in time order, of the allocation (+) and free (-) events
of torch's CPU allocator that ``torch.profiler`` records with ``profile_memory=True``, from the
copy of the model onwards. Both are exact for tensor memory; scratch memory a library allocates
outside torch's allocator (some oneDNN kernels) is not seen.

The step measured is the second on a copy of the model (the first makes AdamW's moments, as every
step after the first has them), so the model given is left as it was.
"""

from __future__ import annotations

import copy
import itertools
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from tieta.errors import TietaError
from tieta.methods.method import LossFn

# the allocator's events in the profiler's records
MEMORY_EVENT = "[memory]"
# the name the measured step is recorded under
MEASURED_STEP = "tieta: measured training step"


def cross_entropy_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain objective: cross-entropy of the model's logits."""
    return nn.functional.cross_entropy(model(images), labels)


def tensor_bytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    """Bytes of the storages behind ``tensors``, each storage once (views and shared weights are
    not counted twice); None entries (a missing gradient) are skipped."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


class _TrainingStep:
    """One training step of a copy of ``model``, with its own AdamW (made on first call)."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn,
                 lr: float) -> None:
        self.model = copy.deepcopy(model).to(images.device).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        self.images, self.labels, self.loss_fn = images, labels, loss_fn

    def __call__(self) -> None:
        loss = self.loss_fn(self.model, self.images, self.labels)
        self.optimizer.zero_grad(set_to_none=True)  # after the forward pass, as tieta.train does
        loss.backward()
        self.optimizer.step()

    def resident_bytes(self) -> int:
        """Bytes of what a step starts with: parameters, buffers, gradients, AdamW's moments, the batch."""
        moments = (value for state in self.optimizer.state.values() for value in state.values()
                   if isinstance(value, torch.Tensor))
        return tensor_bytes(itertools.chain(self.model.parameters(), self.model.buffers(),
                                            (p.grad for p in self.model.parameters()), moments,
                                            (self.images, self.labels)))


def _cpu_peak(make_step: Callable[[], Callable[[], None]]) -> int:
    """The most bytes torch's CPU allocator holds, during the second call of the step that
    ``make_step`` makes, for the step (the model's copy, its optimizer) and what it allocates: the
    running sum of the allocator's events in time order, from the copy onwards (the profiler does
    not see the frees of tensors made before it started, so the copy is made inside it)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recording:
        step = make_step()
        step()  # AdamW's moments are made in its first step
        with record_function(MEASURED_STEP):
            step()
    events = sorted(recording.profiler.kineto_results.events(), key=lambda event: event.start_ns())  # stable
    measured = next(event for event in events if event.name() == MEASURED_STEP)
    level, peak = 0, None
    for event in events:
        if event.name() != MEMORY_EVENT or event.device_type() != torch.autograd.DeviceType.CPU:
            continue
        if event.start_ns() > measured.end_ns():
            break
        if peak is None and event.start_ns() >= measured.start_ns():
            peak = level  # what the measured step starts with
        level += event.nbytes()
        if peak is not None:
            peak = max(peak, level)
    return level if peak is None else peak


def _cuda_peak_rise(step: Callable[[], None], device: torch.device) -> int:
    """The highest CUDA's allocated bytes get above their level before ``step``."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


def training_step_peak_bytes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                             loss_fn: LossFn = cross_entropy_loss, lr: float = 1e-6) -> int:
    """Peak tensor bytes of one training step of ``model`` (forward, ``loss_fn``, backward, AdamW
    step on the parameters that require gradients), on the device ``images`` are on.

    The step runs on a copy, after one unmeasured step (AdamW's moments exist, as in every step after
    the first); the gradients are cleared after the forward pass, as ``tieta.train`` does. Counted:
    the tensors the step starts with (parameters, buffers, gradients, AdamW's moments, the batch)
    plus the allocator's highest rise above them during the step (see the module's docstring).

    Args:
        model: left unchanged (its weights, gradients and train/eval mode).
        images: (B, 3, H, W), on the device to measure.
        labels: (B,) class indices.
        loss_fn: (model, images, labels) -> scalar loss, e.g. a method's ``Method.objective``.

    Returns:
        bytes.

    Raises:
        TietaError: ``images`` are on a device other than the CPU or CUDA.
    """
    device = images.device
    if device.type not in ("cpu", "cuda"):
        raise TietaError(f"the peak memory of a training step is measured on the CPU or CUDA, not on {device}")
    labels = labels.to(device)

    def make_step() -> _TrainingStep:
        return _TrainingStep(model, images, labels, loss_fn, lr)

    if device.type == "cpu":
        return _cpu_peak(make_step) + tensor_bytes((images, labels))  # the batch was made before the copy
    step = make_step()
    step()  # AdamW's moments are made in its first step
    return step.resident_bytes() + _cuda_peak_rise(step, device)
