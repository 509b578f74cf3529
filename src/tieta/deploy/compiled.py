"""torch.compile for evaluation models, with the whole forward pass in one graph.

    fast = compile_model(model)              # fast(images) gives model(images)'s logits
    graph_breaks(model, images)              # 0 for ToMe and PYRA models, at any depth

What broke the graph of a ToMe or PYRA evaluation model, and the exact fixes:

- The native merge (``tieta.native.tome_merge``), a ctypes call that dynamo cannot trace: 10 graph
  breaks, 11 graphs, on the CPU (the same count at depth 3 and 6: the blocks share their code, so
  each piece is compiled once, but at run time every merging block leaves the compiled graph for
  the C call). Traced code (``torch.compiler.is_compiling()``, true under ``torch.compile`` and
  ``torch.export``) now takes the tensor merge, which computes the same (``TokenMerge.forward``).
- The shape-keyed cache of the merge's index arithmetic (``functools.lru_cache``): dynamo traced
  through it with a warning, and ``torch.export`` left its fake tensors in it for later eager
  calls. Traced code now bypasses it (``bipartite_soft_matching``).

After these: 0 graph breaks, one graph, for ToMe and PYRA (and EViT, DynamicViT); the compiled
logits are the eager ones to float rounding.

DyT's real skipping finds its active tokens with ``nonzero``, whose output shape depends on the
data: dynamo breaks the graph at every dispatch, and as each break re-checks the growing list of
masks, it soon hits its recompile limit and runs the rest eagerly. Told to capture such ops
(``capture_dynamic_output_shape_ops``), it makes one graph whose token counts are symbols, with
the same logits for any active count. That setting is global to dynamo, so a compiled DyT model
sets it only around its own calls (about 25 us each).

Which merge is used where the native merge and compilation meet: a compiled model always runs the
tensor merge, inside its graph; the native merge is what an uncompiled model uses on the CPU. The
choice is the measured one (ViT-S/16, 224 px, 2 CPU cores, ``benchmarks/results/deploy_cpu.md``):
at batch 1 the compiled model with the tensor merge and the eager one with the native merge are
level (1.01x for ToMe "low", 1.04x for PYRA, inside the noise), and both beat eager with the
tensor merge by about 10%; at batch 32 the compiled model is ahead (1.07x, 1.15x). Eager + native
was faster in no case measured, so there is no per-batch switch. (onnxruntime beat both at batch
1, about 1.35x eager.)
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch._dynamo
from torch import nn

from tieta.methods import registry


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """``torch.compile`` of ``model`` for evaluation (the model is put in eval mode).

    The merge of ToMe and PYRA runs as tensor operations inside the compiled graph: the native C
    merge would split the graph at every merging block, and measured on the CPU the compiled tensor
    merge is never slower than the eager model with the native merge (level at batch 1, 1.07-1.15x
    at batch 32; see the module docstring). A DyT model is compiled with its data-dependent token
    counts captured in the graph.

    Args:
        model: a tieta (or plain timm) ViT, e.g. ``merge_lora(load_run_model(run)[0])``.
        options: passed to ``torch.compile`` (e.g. ``mode="max-autotune"``); by default the graph
            is compiled for the input shape it first sees (``dynamic=False``), once per batch size.

    Returns:
        The compiled module; call it as the model.
    """
    model.eval()
    options.setdefault("dynamic", False)
    compiled = torch.compile(model, **options)
    return DataDependentShapes(compiled) if _skips_tokens(model) else compiled


class DataDependentShapes(nn.Module):
    """A compiled model whose calls let dynamo capture ops with data-dependent output shapes (DyT's
    ``nonzero``) in the graph instead of breaking it.

    Args:
        compiled: the ``torch.compile`` of the model.
    """

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _tracing_settings(True):
            return self.compiled(*args, **kwargs)


def graph_breaks(model: nn.Module, images: torch.Tensor) -> int:
    """Graph breaks ``torch.compile`` meets in one evaluation pass of ``model`` on ``images``, with
    the settings :func:`compile_model` compiles it with.

    Runs the model once under ``torch._dynamo.explain`` (no compilation), in eval mode, without
    gradients; the model's mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _tracing_settings(_skips_tokens(model)):
            return torch._dynamo.explain(model)(images).graph_break_count
    finally:
        model.train(was_training)


def _skips_tokens(model: nn.Module) -> bool:
    """Whether a method of the model has shapes that depend on the data in evaluation (DyT's real
    skipping), which dynamo must capture in the graph."""
    return any(method.data_dependent_shapes(model) for method in registry.METHODS.values()
               if method.data_dependent_shapes is not None)


def _tracing_settings(data_dependent_shapes: bool) -> contextlib.AbstractContextManager:
    if not data_dependent_shapes:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
