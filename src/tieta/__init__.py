"""tieta: Training-Inference Efficient Task Adaptation for timm Vision Transformers.

The public verbs, each usable on its own and composable::

    import timm, tieta
    model = tieta.load_backbone("vit_base_patch16_224", num_classes=10)
    tieta.add_lora(model, rank=8)           # or tieta.add_adapter(model, dim=8)
    tieta.add_pyra(model, r="low")          # token merging with PYRA (tieta.add_tome: plain ToMe)
    # or, for dynamic token skipping: tieta.add_dyt(model, rho=0.5) with tieta.dyt_loss in training
    tieta.freeze_backbone(model)
    tieta.trainable_parameters(model)      # (trainable, total)
    tieta.merge_lora(model)                # after training: LoRA folded into the qkv weights
"""

import importlib
from typing import Any

from tieta.methods import registry as _registry  # names only: no method module (nor torch) is imported here

# public name -> the module that defines it; each is imported on first use (PEP 562), so that
# `import tieta` and the command line's --help do not load torch and timm. The methods' verbs come
# from their registry entries; these are the rest.
_HOMES = {
    "TietaError": "tieta.errors",
    "benchmark": "tieta.measure.benchmark",
    "count_flops": "tieta.measure.flops",
    "freeze_backbone": "tieta.methods.params",
    "load": "tieta.deploy.export",
    "load_backbone": "tieta.backbone",
    "measure_throughput": "tieta.measure.throughput",
    "plan": "tieta.measure.plan",
    "schedule": "tieta.methods.schedules",
    "trainable_parameters": "tieta.methods.params",
    "VideoModel": "tieta.video.model",
    "frame_token_masks": "tieta.video.model",
    **_registry.verbs(),
}

__version__ = "0.1.0"

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tieta' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
