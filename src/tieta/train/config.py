"""The run configuration: nested dataclasses, read from YAML, overridden from the command line.

Defaults are the papers' recipe (AdamW, lr 1e-3, weight decay 1e-4, 100 epochs, 10 warm-up epochs,
cosine to 1e-5, batch 64, LoRA rank 8 on qkv).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from tieta.errors import TietaError


@dataclass
class LoRAConfig:
    rank: int = 8
    targets: str = "qkv"  # "qkv": one fused pair (NOAH/PYRA); or letters of q, k, v: one pair each
    alpha: Optional[float] = None  # None: scale 1 (reference code); else alpha / rank
    dropout: float = 0.1


@dataclass
class AdapterConfig:
    dim: int = 8
    scale: float = 1.0
    dropout: float = 0.1


@dataclass
class MergeConfig:
    """Token merging (ToMe, and PYRA on top of it)."""

    # "low" / "high" (the PYRA paper's), an int r, a per-block list, or {r: R, inflection: F}
    schedule: Any = field(default="low", metadata={"any_type": True})
    prop_attn: bool = True  # proportional attention, as the PYRA code (training and evaluation)


# PYRA's learning rate by name: the published runs trained PYRA at the base lr (the reference
# code's separate flag never reached its optimizer); the script meant 1e-4
PYRA_LRS = {"reference": None, "paper": 1e-4}


@dataclass
class PyraConfig:
    lr: Any = field(default="reference", metadata={"any_type": True})  # "reference", "paper" or a number


@dataclass
class DyTConfig:
    """Dynamic Tuning: token dispatch with adapters (the DyT paper's defaults)."""

    rho: float = 0.5  # target share of active tokens
    variant: str = "mlp"  # "mlp", "attn", "attn_mlp" or "layer"
    adapter_dim: int = 8
    experts: int = 1  # > 1: MoE-adapter
    tau: float = 5.0  # Gumbel-sigmoid temperature
    tau_end: Optional[float] = None  # e.g. 0.1: anneal tau linearly over the epochs
    rate_weight: float = 2.0
    full_weight: float = 1.0
    distill_weight: float = 1.0


@dataclass
class DataConfig:
    path: Optional[str] = None  # a VTAB-1k task folder or an image folder
    train_split: str = "train"  # train800val200 in VTAB-1k
    eval_split: str = "test"
    normalization: str = "imagenet"  # or "inception" (0.5/0.5, DyT)
    cache: bool = True  # keep decoded images in memory (no augmentation, so nothing changes per epoch)
    num_workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 100
    warmup_epochs: int = 10
    min_lr: float = 1e-5
    batch_size: int = 64
    clip_grad: Optional[float] = None  # max gradient norm, None for no clipping
    lr_groups: dict[str, float] = field(default_factory=dict)  # e.g. {"head": 1e-3, "adapter": 5e-4}


@dataclass
class RunConfig:
    model: str = "vit_base_patch16_224"
    weights: Optional[str] = None  # None: timm's published weights; "random"; a built-in name; a file
    img_size: Optional[int] = None  # None: the model's own
    drop_path: float = 0.1
    method: str = "lora"  # methods joined by "+", applied in order, e.g. "lora+adapter"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    pyra: PyraConfig = field(default_factory=PyraConfig)
    dyt: DyTConfig = field(default_factory=DyTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: int = 1  # epochs between evaluations on the eval split (the last epoch always)
    eval_batch_size: int = 128
    seed: int = 0
    bf16: bool = False  # bfloat16 autocast
    device: str = "auto"  # "auto": cuda if available, else cpu

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def methods(self) -> list[str]:
        return [name for name in self.method.split("+") if name]


def from_dict(cls, values: dict[str, Any], where: str = ""):
    """Build the dataclass ``cls`` from a (nested) dict, refusing unknown keys by name."""
    if not isinstance(values, dict):
        raise TietaError(f"config section {where or 'top'} should be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise TietaError(f"unknown config key {where}{key!r}; known: {', '.join(fields)}")
        default = getattr(cls(), key)
        if fields[key].metadata.get("any_type"):
            pass
        elif dataclasses.is_dataclass(default):
            value = from_dict(type(default), value, f"{where}{key}.")
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif default is not None and value is not None and type(value) is not type(default):
            raise TietaError(f"config key {where}{key} should be a {type(default).__name__}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[dict[str, Any]] = None) -> RunConfig:
    """The defaults, updated by a YAML file, updated by dotted overrides ({"optim.lr": 1e-4})."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TietaError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise TietaError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from error
        if not isinstance(values, dict):
            raise TietaError(f"config file {path} should hold a mapping of settings")
    for dotted, value in (overrides or {}).items():
        section = values
        *parents, leaf = dotted.split(".")
        for parent in parents:
            section = section.setdefault(parent, {})
            if not isinstance(section, dict):
                raise TietaError(f"cannot set {dotted}: {parent} is not a section")
        section[leaf] = value
    config = from_dict(RunConfig, values)
    validate(config)
    return config


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=1e-4' -> ("optim.lr", 0.0001); the value is read as YAML."""
    if "=" not in text:
        raise TietaError(f"--set takes KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-4" as a string; numbers are what such keys mean
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def validate(config: RunConfig) -> None:
    """Refuse settings that cannot work, each with one sentence."""
    from tieta.train.model import METHODS  # the registry of method names

    for name in config.methods:
        if name not in METHODS:
            raise TietaError(f"unknown method {name!r}; choose from {', '.join(METHODS)} (join several with '+')")
    if not config.methods:
        raise TietaError("method must name at least one method, e.g. 'lora'")
    checks = [
        (config.optim.epochs >= 1, "optim.epochs must be at least 1"),
        (0 <= config.optim.warmup_epochs, "optim.warmup_epochs cannot be negative"),
        (config.optim.batch_size >= 1, "optim.batch_size must be at least 1"),
        (config.optim.lr > 0, "optim.lr must be positive"),
        (config.eval_every >= 1, "eval_every must be at least 1"),
        (config.img_size is None or config.img_size > 0, "img_size must be positive"),
        (config.device in ("auto", "cpu") or config.device.startswith("cuda"), "device must be auto, cpu or cuda[:N]"),
    ]
    for ok, message in checks:
        if not ok:
            raise TietaError(message)
    lr = config.pyra.lr
    if not (lr in PYRA_LRS or (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0)):
        raise TietaError(f"pyra.lr must be 'reference' (the base lr), 'paper' (1e-4) or a positive number, got {lr!r}")


def group_learning_rates(config: RunConfig) -> dict[str, float]:
    """Per-method learning rates: optim.lr_groups, plus PYRA's named choice."""
    groups = dict(config.optim.lr_groups)
    if "pyra" in config.methods and "pyra" not in groups:
        lr = PYRA_LRS.get(config.pyra.lr, config.pyra.lr) if isinstance(config.pyra.lr, str) else config.pyra.lr
        if lr is not None:
            groups["pyra"] = float(lr)
    return groups
