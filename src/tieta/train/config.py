"""The run configuration: nested dataclasses, read from YAML, overridden from the command line.

The general settings are here; each method brings its own sections (``Method.sections``), so a
run's config is these fields plus one section per registered method, e.g. ``lora.rank`` or
``merge.schedule``. Defaults are the papers' recipe (AdamW, lr 1e-3, weight decay 1e-4, 100
epochs, 10 warm-up epochs, cosine to 1e-5, batch 64, LoRA rank 8 on qkv).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from tieta.errors import TietaError
from tieta.methods import registry
from tieta.methods.method import Method


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
class GeneralConfig:
    """The settings that do not belong to one method."""

    model: str = "vit_base_patch16_224"
    weights: Optional[str] = None  # None: timm's published weights; "random"; a built-in name; a file
    img_size: Optional[int] = None  # None: the model's own
    drop_path: float = 0.1
    method: str = "lora"  # methods joined by "+", applied in order, e.g. "lora+adapter"
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
    def method_list(self) -> list[Method]:
        """The methods named by ``method``, in order."""
        return registry.parse_methods(self.method)

    @property
    def methods(self) -> list[str]:
        return [method.name for method in self.method_list]


# the general settings, then one section per method (``config.lora``, ``config.merge``, ...)
RunConfig = dataclasses.make_dataclass(
    "RunConfig",
    [(name, cls, field(default_factory=cls)) for name, cls in registry.config_sections().items()],
    bases=(GeneralConfig,),
    namespace={"__module__": __name__, "__doc__": "A run's settings: the general ones and every method's sections."},
)


def from_dict(cls, values: dict[str, Any], where: str = ""):
    """Build the dataclass ``cls`` from a (nested) dict, refusing unknown keys and wrong types by name."""
    if not isinstance(values, dict):
        raise TietaError(f"config section {where or 'top'} should be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise TietaError(f"unknown config key {where}{key!r}; known: {', '.join(fields)}")
        if fields[key].metadata.get("any_type"):
            pass
        elif dataclasses.is_dataclass(hints[key]):
            value = from_dict(hints[key], value, f"{where}{key}.")
        else:
            value = _typed(value, hints[key], f"{where}{key}")
        kwargs[key] = value
    return cls(**kwargs)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _typed(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against the field's type (an int is taken for a float), or a TietaError."""
    optional = type(None) in typing.get_args(hint) and typing.get_origin(hint) in (Union, types.UnionType)
    if optional:
        if value is None:
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise TietaError(f"config key {key} should be a mapping, got {value!r}")
        return {_typed(k, key_type, key): _typed(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if typing.get_origin(hint) is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise TietaError(f"config key {key} should be a list, got {value!r}")
        return [_typed(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not hint:  # bool is an int subclass: compare exact types
        raise TietaError(f"config key {key} should be {_TYPE_NAMES.get(hint, hint)}, got {value!r}")
    return value


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
    """Refuse settings that cannot work, each with one sentence (every method's sections are
    checked, used or not, so that a bad setting never waits for the run that uses it)."""
    config.method_list  # unknown or repeated method names
    checks = [
        (config.optim.epochs >= 1, "optim.epochs must be at least 1"),
        (0 <= config.optim.warmup_epochs, "optim.warmup_epochs cannot be negative"),
        (config.optim.batch_size >= 1, "optim.batch_size must be at least 1"),
        (config.optim.lr > 0, "optim.lr must be positive"),
        (config.eval_every >= 1, "eval_every must be at least 1"),
        (config.eval_batch_size >= 1, "eval_batch_size must be at least 1"),
        (config.img_size is None or config.img_size > 0, "img_size must be positive"),
        (0 <= config.drop_path < 1, "drop_path must be in [0, 1)"),
        (config.device in ("auto", "cpu") or config.device.startswith("cuda"), "device must be auto, cpu or cuda[:N]"),
    ]
    for ok, message in checks:
        if not ok:
            raise TietaError(message)
    for method in registry.METHODS.values():
        if method.validate is not None:
            method.validate(config)
    objectives = [method.name for method in config.method_list if method.objective is not None]
    if len(objectives) > 1:
        raise TietaError(f"{' and '.join(objectives)} each train with their own loss; combine at most one of them")


def group_learning_rates(config: RunConfig) -> dict[str, float]:
    """Per-group base learning rates: the methods' own (e.g. PYRA's named lr), then optim.lr_groups."""
    groups: dict[str, float] = {}
    for method in config.method_list:
        if method.learning_rates is not None:
            groups.update(method.learning_rates(config))
    groups.update(config.optim.lr_groups)
    return groups
