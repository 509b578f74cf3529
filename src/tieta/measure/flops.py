"""FLOPs of what actually executes, counted by torch's own FlopCounterMode.

tieta's unit is GMACs, multiply-accumulates / 1e9 (what most papers call GFLOPs; ViT-B/16 at
224 px: 17.58); the PYRA paper divides MACs by 2**30 instead (ViT-B/16: 16.37), shown as "MACs/2^30
(PYRA paper's GFLOPs)" (:data:`tieta.report.tables.PYRA_UNIT`). As in fvcore and the
papers, only matrix products, convolutions and attention count; norms, activations and softmax do
not.

torch's counter knows the CUDA fused-attention kernels but not the CPU one
(``aten._scaled_dot_product_flash_attention_for_cpu``), so a CPU count would silently drop all of
attention; it is mapped here with torch's own attention formula.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from tieta.native import tensor_code

aten = torch.ops.aten


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Args: query (B, H, N, d), key (B, H, M, d), value (B, H, M, dv) shapes. Returns FLOPs (2 per MAC)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CUSTOM_FLOP_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts CPU fused attention."""
    return FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOP_FORMULAS)


@torch.no_grad()
def count_flops(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Per-image cost of one evaluation forward pass on ``images``.

    Args:
        model: any module; it is run in eval mode and left in the mode it had.
        images: (B, 3, H, W) inputs, on the model's device. Where the executed path depends on the
            data, the count is the average over these images.

    Returns:
        {"gmacs": MACs / 1e9 per image (GMACs),
         "pyra_gflops": MACs / 2**30 per image (the PYRA paper's unit),
         "flops": FLOPs (2 per MAC) per image}
    """
    was_training = model.training
    # the counter's module tracker hooks the backward of parameters that require grad, and fails on
    # those used without a graph (timm's attention-pool latent under no_grad): none require it here
    wanted = [parameter for parameter in model.parameters() if parameter.requires_grad]
    model.eval()
    try:
        for parameter in wanted:
            parameter.requires_grad_(False)
        # the native merge does the tensor code's arithmetic where the counter can't see it
        with tensor_code(), flop_counter() as counter:
            model(images)
    finally:
        for parameter in wanted:
            parameter.requires_grad_(True)
        model.train(was_training)
    flops = counter.get_total_flops() / images.shape[0]
    macs = flops / 2
    return {"gmacs": macs / 1e9, "pyra_gflops": macs / 2**30, "flops": flops}
