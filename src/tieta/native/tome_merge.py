"""ToMe's merge (with PYRA's re-activation when given) as one native call, for evaluation on the CPU.

It computes what ``bipartite_soft_matching`` + ``merge_wavg`` (+ ``PyraModulation``) compute, in
one pass over the tokens. At batch 1 the tensor version's two dozen small operations, each run
with caches cold from the block's weights, cost more than the arithmetic; so does every line of
Python here, which is why this file is terse.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from tieta.native import load_library, native_enabled

_POINTER, _INT, _DOUBLE = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_ARGTYPES = [
    _POINTER, _INT, _INT, _INT, _INT,  # keys, batch, heads, tokens, head_dim
    _INT, _INT, _INT, _INT,  # key strides
    _POINTER, _INT, _POINTER,  # x, channels, size
    _INT, _INT,  # r, prefix
    _POINTER, _POINTER, _POINTER, _POINTER, _DOUBLE,  # PYRA: W_r, W_D, norm weight, norm bias, eps
    _POINTER, _POINTER, _POINTER,  # out_x, out_size, out_log_size
]
_NO_PYRA = (None, None, None, None, 0.0)
_kernel = None  # the loaded function, or False when it can't be had


def _load_kernel():
    global _kernel
    library = load_library("tome_merge")
    if library is None:
        _kernel = False
    else:
        _kernel = library.tieta_tome_merge
        _kernel.argtypes, _kernel.restype = _ARGTYPES, _INT
    return _kernel


def _pyra_args(pyra: torch.nn.Module) -> tuple:
    """The kernel's PYRA arguments, read from the module's own dicts (nn.Module attribute lookup
    goes through a failed normal lookup first, slow at this scale)."""
    params, norm = pyra._parameters, pyra._modules["norm"]
    norm_params = norm._parameters
    return (params["channel_weight"].data_ptr(), params["token_weight"].data_ptr(), norm_params["weight"].data_ptr(),
            norm_params["bias"].data_ptr(), norm.eps)


def native_merge_applies(keys: torch.Tensor, x: torch.Tensor, pyra: Optional[torch.nn.Module]) -> bool:
    """True when the native merge can stand in for the tensor one: CPU float32 evaluation with
    no gradient to carry and no autocast, and the kernel not switched off (``TIETA_NATIVE=0``)."""
    return (
        x.is_cpu and x.dtype is torch.float32 and keys.dtype is torch.float32
        and not (torch.is_grad_enabled()
                 and (x.requires_grad or (pyra is not None and any(p.requires_grad for p in pyra.parameters()))))
        and not torch.is_autocast_enabled("cpu") and _kernel is not False and native_enabled()
    )


def native_merge(
    keys: torch.Tensor, x: torch.Tensor, size: Optional[torch.Tensor], r: int, num_prefix: int,
    pyra: Optional[torch.nn.Module] = None,
) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One block's merge, or None when the kernel can't be built (the caller then uses tensors).

    Args:
        keys: (B, H, N, hd) the block's attention keys (after q/k norm), any strides.
        x: (B, N, C) tokens.
        size: (B, N, 1) token sizes, or None for all ones.
        r: tokens to merge away, at most ``max_merges(N, num_prefix)``.
        num_prefix: protected leading tokens.
        pyra: the block's PyraModulation (float32, CPU), or None.

    Returns:
        ((B, N - r, C) merged tokens, (B, N - r, 1) sizes, (B, 1, 1, N - r) log sizes).
    """
    kernel = _kernel or _load_kernel()
    if not kernel:
        return None
    batch, tokens, channels = x.shape
    kept = tokens - r
    x = x.contiguous()  # no copy when it already is (a model without class token starts transposed)
    size = None if size is None else size.contiguous()
    out_x, out_size, out_log_size = torch.empty(batch, kept, channels), torch.empty(batch, kept, 1), \
        torch.empty(batch, 1, 1, kept)
    pyra_args = _NO_PYRA if pyra is None else _pyra_args(pyra)
    if kernel(keys.data_ptr(), batch, keys.shape[1], tokens, keys.shape[3], *keys.stride(), x.data_ptr(), channels,
              None if size is None else size.data_ptr(), r, num_prefix, *pyra_args,
              out_x.data_ptr(), out_size.data_ptr(), out_log_size.data_ptr()):
        raise MemoryError("tieta's native merge ran out of memory")
    return out_x, out_size, out_log_size
