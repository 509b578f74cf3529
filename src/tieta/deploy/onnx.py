"""An evaluation model as an ONNX file, at a fixed batch size, and a check of it with onnxruntime.

    path = export_onnx(model, "model.onnx", batch_size=4, image_size=224)   # images in, logits out
    error = check_onnx(model, path, images)                                  # max |logits - PyTorch's|

The model is the inference model of a run (``load_run_model``, then ``merge_lora``): LoRA folded,
the token-reduction modules kept. The file takes (B, 3, S, S) float32 normalised images
("images") and gives (B, classes) logits ("logits"), opset 18, through torch's exporter
(``torch.export``, then onnxscript).

What exports, and how:

- ToMe and PYRA (merging), EViT, DynamicViT and DiffRate export the code that evaluation runs,
  token counts and all; their logits match PyTorch's to float rounding. What is arranged for the
  export only, all of it exact:
  - the merge runs as tensor operations, not the native C call (a ctypes call cannot be traced);
  - the stable sort that ranks ToMe's matches and DiffRate's tokens becomes ONNX ``TopK``, which
    breaks ties by the lower index as a stable sort does (the exporter has no translation for it);
  - DiffRate's merge, ``scatter_reduce(reduce="mean")``, which the exporter silently writes as a
    plain scatter (ONNX has no scatter mean: the last source would win, logits off by 1e-2 on a
    small ViT), becomes a scatter-add of the tokens divided by a scatter-add of their counts,
    which is how torch computes it;
  - attention is traced through its math kernel: given the size-bias mask of proportional
    attention, the exporter fails on the fused CPU kernel's output ("Cannot view a tensor").
- DyT with MLP dispatch (the default variant) exports its real skipping: the active tokens are
  found with ``NonZero`` and packed across the batch, so the graph runs the MLP on as many rows as
  the images activate and saves those FLOPs, at batch sizes above 1 too (the packed shape is
  computed from the data inside the graph).
- DyT's attention dispatch (variants "attn", "attn_mlp", "layer") does not export as real
  skipping: it pads each image's active tokens to the largest count in the batch, a Python
  integer read from the data, and branches on whether any padding is needed; ``torch.export``
  cannot trace either. The file holds the masked form instead (every token through attention and
  MLP, inactive keys masked out, outputs multiplied by the 0/1 decision): the same logits, but
  none of the skipped FLOPs are saved. A warning says so.
- A DiffRate model whose search has not been ended (kept numbers still read from its rate logits)
  is refused: fix its rates first (``tieta.methods.diffrate.fix_rates``; a trained run has).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tieta.errors import TietaError
from tieta.methods.state import reset_pass_states
from tieta.methods import registry
from tieta.native import tensor_code

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# protobuf cannot hold a file over 2 GiB: larger models keep their weights in "<file>.data" beside it
SINGLE_FILE_BYTES = 1_800_000_000


def export_onnx(model: nn.Module, path: str | Path, batch_size: int, image_size: int) -> Path:
    """Write ``model``'s evaluation forward pass as an ONNX file.

    Args:
        model: a tieta (or plain timm) ViT; it is exported in eval mode and left in the mode it
            was in, otherwise unchanged.
        path: the .onnx file to write (its folder is made if needed).
        batch_size: B, fixed in the file.
        image_size: S, the side of the (B, 3, S, S) input.

    Returns:
        The path written.

    Raises:
        TietaError: onnxscript is missing, the sizes do not fit the model, the model cannot be
            exported (see the module docstring), or torch's exporter fails.
    """
    if batch_size < 1:
        raise TietaError(f"the batch size of an ONNX export must be at least 1, got {batch_size}")
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (1, 1))
    if image_size < 1 or image_size % patch[0] or image_size % patch[1]:
        raise TietaError(f"the image size {image_size} is not a positive multiple of the model's patch size {patch[0]}")
    for method in registry.METHODS.values():  # each method says where its model cannot become a graph
        if method.check_traceable is not None:
            method.check_traceable(model)
    translations = _onnx_translations()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    like = next(model.parameters())
    images = torch.randn(batch_size, 3, image_size, image_size, device=like.device, dtype=like.dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    was_training = model.training
    model.eval()
    try:
        # tensor_code(): every native kernel off, as a ctypes call cannot be traced (ToMe's merge
        # also steps aside by itself while traced)
        with _traceable_forms(model), tensor_code(), sdpa_kernel(SDPBackend.MATH):
            torch.onnx.export(
                model, (images,), str(path), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], external_data=weight_bytes > SINGLE_FILE_BYTES,
                custom_translation_table=translations, verbose=False,
            )
    except TietaError:
        raise
    except Exception as error:  # the exporter's errors are pages long; one sentence, the cause chained
        raise TietaError(f"torch could not export this model to ONNX: {_first_line(error)}") from error
    finally:
        _forget_pass(model)
        model.train(was_training)
    return path


def check_onnx(model: nn.Module, path: str | Path, images: torch.Tensor) -> float:
    """Run the ONNX file on ``images`` with onnxruntime (CPU) and compare with PyTorch.

    Args:
        model: the model the file was exported from (run in eval mode, as evaluation runs it).
        path: the .onnx file.
        images: (B, 3, S, S) float32, B and S those of the export.

    Returns:
        max |ONNX logits - PyTorch logits| over the batch.

    Raises:
        TietaError: onnxruntime is missing, or the images are not of the file's shape.
    """
    session = onnx_session(path)
    expected = tuple(session.get_inputs()[0].shape)
    if tuple(images.shape) != expected:
        raise TietaError(f"{Path(path).name} takes images of shape {expected}, got {tuple(images.shape)}; "
                         "export it again at this batch and image size")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            reference = model(images).float().cpu()
    finally:
        model.train(was_training)
    logits = session.run([OUTPUT_NAME], {INPUT_NAME: images.detach().float().cpu().numpy()})[0]
    return float((torch.from_numpy(logits) - reference).abs().max())


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime InferenceSession of ``path`` on the CPU.

    Args:
        threads: intra-op threads (None: onnxruntime's default, one per physical core).
    """
    onnxruntime = _onnxruntime()
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise TietaError("running an ONNX file needs onnxruntime: pip install 'tieta[onnx]'") from None
    return onnxruntime


def _onnx_translations() -> dict[Callable, Callable]:
    """The exporter's translations that tieta replaces or adds (see the module docstring).

    - ``aten.sort.stable`` (no translation of the exporter's own) as ONNX ``TopK``, which breaks
      ties by the lower index, as a stable sort does, descending or not.
    - ``aten.scatter_reduce.two``: the exporter writes ``reduce="mean"`` as a plain scatter (ONNX's
      ScatterElements has no mean; the last source wins), a silently wrong graph. Here the mean is
      what torch computes: the sum of the destination and its sources, scattered with "add",
      divided by their count, scattered the same way.
    """
    try:
        from onnxscript import opset18 as op
    except ImportError:
        raise TietaError("exporting to ONNX needs onnxscript: pip install 'tieta[onnx]'") from None

    def stable_sort(self, *, stable: bool | None = None, dim: int = -1, descending: bool = False):
        length = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
        return op.TopK(self, length, axis=dim, largest=descending, sorted=True)

    def ones_of(shape_of, like):
        return op.Expand(op.CastLike(op.Constant(value_float=1.0), like), op.Shape(shape_of))

    def scatter_reduce(self, dim: int, index, src, reduce: str, include_self: bool = True):
        if not include_self:  # tieta's code always includes the destination; torch's tricks for the rest are not needed
            raise NotImplementedError("scatter_reduce with include_self=False has no exact ONNX translation in tieta")
        if reduce != "mean":
            reduction = {"sum": "add", "prod": "mul", "amax": "max", "amin": "min"}[reduce]
            return op.ScatterElements(self, index, src, axis=dim, reduction=reduction)
        total = op.ScatterElements(self, index, src, axis=dim, reduction="add")
        count = op.ScatterElements(ones_of(self, self), index, ones_of(index, self), axis=dim, reduction="add")
        return op.Div(total, count)

    return {torch.ops.aten.sort.stable: stable_sort, torch.ops.aten.scatter_reduce.two: scatter_reduce}


@contextlib.contextmanager
def _traceable_forms(model: nn.Module) -> Iterator[None]:
    """Every method's traceable form of the model (see the module docstring), for the export."""
    with contextlib.ExitStack() as stack:
        for method in registry.METHODS.values():
            if method.traceable_form is not None:
                stack.enter_context(method.traceable_form(model))
        yield


def _forget_pass(model: nn.Module) -> None:
    """Drop what the traced pass left in the model's per-pass states (tracer tensors, not data)."""
    reset_pass_states(model)


def _first_line(error: BaseException) -> str:
    """The innermost cause's message, first line."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
