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

from tieta.backbone import load_backbone
from tieta.errors import TietaError
from tieta.measure.benchmark import benchmark
from tieta.measure.flops import count_flops
from tieta.measure.throughput import measure_throughput
from tieta.methods.adapter import add_adapter
from tieta.methods.diffrate import add_diffrate, search_rates
from tieta.methods.dynamicvit import add_dynamicvit, dynamicvit_loss
from tieta.methods.dyt import activation_rates, add_dyt, dyt_forward, dyt_loss
from tieta.methods.evit import add_evit
from tieta.methods.lora import add_lora, merge_lora
from tieta.methods.params import freeze_backbone, trainable_parameters
from tieta.methods.pyra import add_pyra
from tieta.methods.schedules import schedule
from tieta.methods.tome import add_tome

__version__ = "0.1.0"

__all__ = [
    "TietaError",
    "activation_rates",
    "add_adapter",
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
    "load_backbone",
    "measure_throughput",
    "merge_lora",
    "schedule",
    "search_rates",
    "trainable_parameters",
]
