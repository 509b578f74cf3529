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

# public name -> the module that defines it; each is imported on first use (PEP 562), so that
# `import tieta` and the command line's --help do not load torch and timm
_HOMES = {
    "TietaError": "tieta.errors",
    "activation_rates": "tieta.methods.dyt",
    "add_adapter": "tieta.methods.adapter",
    "add_atc": "tieta.methods.atc",
    "add_diffrate": "tieta.methods.diffrate",
    "add_dynamicvit": "tieta.methods.dynamicvit",
    "add_dyt": "tieta.methods.dyt",
    "add_evit": "tieta.methods.evit",
    "add_lora": "tieta.methods.lora",
    "add_pyra": "tieta.methods.pyra",
    "add_tome": "tieta.methods.tome",
    "benchmark": "tieta.measure.benchmark",
    "count_flops": "tieta.measure.flops",
    "dynamicvit_loss": "tieta.methods.dynamicvit",
    "dyt_forward": "tieta.methods.dyt",
    "dyt_loss": "tieta.methods.dyt",
    "freeze_backbone": "tieta.methods.params",
    "load": "tieta.deploy.export",
    "load_backbone": "tieta.backbone",
    "measure_throughput": "tieta.measure.throughput",
    "merge_lora": "tieta.methods.lora",
    "schedule": "tieta.methods.schedules",
    "search_rates": "tieta.methods.diffrate",
    "trainable_parameters": "tieta.methods.params",
}

__version__ = "0.1.0"

__all__ = [
    "TietaError",
    "activation_rates",
    "add_adapter",
    "add_atc",
    "add_diffrate",
    "add_dynamicvit",
    "add_dyt",
    "add_evit",
    "add_lora",
    "add_pyra",
    "add_tome",
    "benchmark",
    "count_flops",
    "dynamicvit_loss",
    "dyt_forward",
    "dyt_loss",
    "freeze_backbone",
    "load",
    "load_backbone",
    "measure_throughput",
    "merge_lora",
    "schedule",
    "search_rates",
    "trainable_parameters",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tieta' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
