"""The run configuration: nested dataclasses, read from YAML, overridden from the command line.

The general settings are here; each method brings its own sections (``Method.sections``), so a
run's config is these fields plus one section per registered method, e.g. ``lora.rank`` or
``merge.schedule``. Defaults are the papers' recipe (AdamW, lr 1e-3, weight decay 1e-4, 100
epochs, 10 warm-up epochs, cosine to 1e-5, batch 64, LoRA rank 8 on qkv); a shorter run warms up for
a tenth of its epochs (:func:`default_warmup_epochs`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from tieta import safe_yaml
from tieta.backbone import MAX_IMG_SIZE, WEIGHT_SUFFIXES
from tieta.data import normalization as normalizations
from tieta.data.vtab import FOLDER_SPLITS, VTAB_SPLITS
from tieta.dense.config import SegmentationConfig
from tieta.dense.dataset import SegmentationDataConfig
from tieta.errors import TietaError
from tieta.hf import source as hf_source
from tieta.methods import registry
from tieta.methods.method import Method
from tieta.train.optim import SCHEDULES
from tieta.train.record import check_record
from tieta.video.config import VideoConfig
from tieta.video.dataset import VideoDataConfig

# numpy's and torch's seeds: 0 <= seed < 2**32
SEED_LIMIT = 2**32
# split names a task folder can have: VTAB-1k list files or image-folder splits
SPLITS = tuple(dict.fromkeys([*VTAB_SPLITS, *FOLDER_SPLITS]))
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


@dataclass
class DataConfig:
    path: Optional[str] = None  # a VTAB-1k task folder or an image folder
    train_split: str = "train"  # train800val200 in VTAB-1k
    eval_split: str = "test"
    # "model": the backbone's own mean, std and resize filter (its timm pretrained_cfg); or "imagenet",
    # "inception"/"half" (0.5/0.5, DyT), "clip"/"openai", or {mean: [r, g, b], std: [r, g, b]}
    # (tieta.data.normalization); a run writes what it resolved to into config.yaml's resolved
    normalization: Any = field(default=normalizations.MODEL, metadata={"any_type": True})
    cache: bool = True  # keep decoded images in memory (no augmentation, so nothing changes per epoch)
    num_workers: int = 0
    # a fraction of the images held out for testing (seeded, stratified), for a source without a test
    # split: a class-per-folder tree, a single list file (tieta.data.sources)
    holdout: Optional[float] = None
    augment: str = "none"  # or "timm": timm's RandAugment training transform (tieta.data.augment)
    # "image", "video" (a folder of clips, tieta.video) or "segmentation" (images with label masks,
    # tieta.dense); None: what data.path holds, written resolved
    kind: Optional[str] = None


AUGMENTS = ("none", "timm")
DATA_KINDS = ("image", "video", "segmentation")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 100
    warmup_epochs: Optional[int] = None  # None: default_warmup_epochs(epochs), written resolved to config.yaml
    min_lr: float = 1e-5
    batch_size: int = 64
    clip_grad: Optional[float] = None  # max gradient norm, None for no clipping
    # micro-batches of batch_size whose gradients make one optimizer step (one step of N x batch_size)
    grad_accum_steps: int = 1
    label_smoothing: float = 0.0  # of the cross-entropy's targets, as timm's --smoothing
    lr_groups: dict[str, float] = field(default_factory=dict)  # e.g. {"head": 1e-3, "adapter": 5e-4}
    # after the warm-up: "cosine" down to min_lr, or "poly" (linear decay to min_lr, mmseg's
    # segmentation schedule; tieta.train.optim.lr_multiplier)
    schedule: str = "cosine"


# The warm-up rule. A run warms up for a tenth of its epochs, rounded down, and at most 10 (the
# papers' 10 of 100): 1 to 9 epochs get none, 10 get 1, 50 get 5, 100 and more get 10. A warm-up
# set explicitly (a config file, --warmup-epochs, --set optim.warmup_epochs, a sweep's base or run
# settings) is kept as given; the dataclass default (None) means the rule. A warm-up of 10 epochs
# in a 2-epoch run would keep the learning rate below a fifth of its base value for the whole run.
MAX_DEFAULT_WARMUP_EPOCHS = 10
WARMUP_SHARE = 10  # one warm-up epoch per this many epochs


def default_warmup_epochs(epochs: int) -> int:
    """The warm-up of a run of ``epochs`` that sets none: min(10, epochs // 10)."""
    return min(MAX_DEFAULT_WARMUP_EPOCHS, epochs // WARMUP_SHARE)


def with_warmup(config: RunConfig) -> RunConfig:
    """``config`` with the warm-up rule applied where ``optim.warmup_epochs`` is None (then a copy;
    otherwise ``config`` itself): what a run trains with, and writes to its config.yaml."""
    if config.optim.warmup_epochs is not None:
        return config
    config = copy.deepcopy(config)
    config.optim.warmup_epochs = default_warmup_epochs(config.optim.epochs)
    return config


def warmup_warning(config: RunConfig) -> Optional[str]:
    """The sentence that says a warm-up of at least the run's length keeps the learning rate below
    its base value (None where the warm-up is shorter, or left to the rule, which always is)."""
    warmup, epochs = config.optim.warmup_epochs, config.optim.epochs
    if warmup is None or warmup < epochs:
        return None
    reached = ("reaches its base value only at the last step" if warmup == epochs else
               f"never reaches its base value (it ends at {epochs / warmup:.0%} of it)")
    return (f"optim.warmup_epochs {warmup} is at least the run's {epochs} epochs: the learning rate {reached}; "
            f"give fewer warm-up epochs, or leave them out for the default, min(10, epochs // 10) = "
            f"{default_warmup_epochs(epochs)}")


@dataclass
class GeneralConfig:
    """The settings that do not belong to one method."""

    model: str = "vit_base_patch16_224"
    weights: Optional[str] = None  # None: timm's published weights; "random"; a built-in name; a file;
    # a transformers checkpoint folder or hf:ORG/NAME (then the model, left out, is the same)
    img_size: Optional[int] = None  # None: the model's own
    drop_path: float = 0.1
    method: str = "lora"  # methods joined by "+", applied in order, e.g. "lora+adapter"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    video: VideoConfig = field(default_factory=VideoConfig)  # video.frames set: a video model (tieta.video)
    # how a video task's clips are sampled, augmented and viewed (tieta.video.dataset); video runs only
    video_data: VideoDataConfig = field(default_factory=VideoDataConfig)
    eval_every: int = 1  # epochs between evaluations on the eval split (the last epoch always)
    eval_batch_size: int = 128
    seed: int = 0
    bf16: bool = False  # bfloat16 autocast (an older spelling of amp: bf16, kept for existing configs)
    amp: Optional[str] = None  # autocast: "bf16", or "fp16" with a gradient scaler; None: fp32
    log: list[str] = field(default_factory=list)  # loggers besides metrics.jsonl: csv, tensorboard, wandb
    device: str = "auto"  # "auto": cuda if available, else cpu
    # segmentation.head set: a segmentation model (tieta.dense)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    # how a segmentation task's images and masks are resized, cropped and augmented (tieta.dense.dataset);
    # segmentation runs only
    segmentation_data: SegmentationDataConfig = field(default_factory=SegmentationDataConfig)
    # written by a run, not set: the numbers data.normalization resolved to and the backbone it was
    # trained on (tieta.train.record), which rebuilding the run uses and checks
    resolved: Any = field(default=None, metadata={"any_type": True})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def precision(self) -> Optional[str]:
        """The autocast type training and evaluation run under: "bf16", "fp16", or None (fp32)."""
        return self.amp or ("bf16" if self.bf16 else None)

    @property
    def method_list(self) -> list[Method]:
        """The methods named by ``method``, in order."""
        return registry.parse_methods(self.method)

    @property
    def methods(self) -> list[str]:
        return [method.name for method in self.method_list]


def run_config_class() -> type:
    """The run config's class: the general settings, then one section per method the registry
    lists now (``config.lora``, ``config.merge``, ...)."""
    return dataclasses.make_dataclass(
        "RunConfig",
        [(name, cls, field(default_factory=cls)) for name, cls in registry.config_sections().items()],
        bases=(GeneralConfig,),
        namespace={"__module__": __name__,
                   "__doc__": "A run's settings: the general ones and every method's sections."},
    )


RunConfig = run_config_class()


def from_dict(cls, values: dict[str, Any], where: str = ""):
    """Build the dataclass ``cls`` from a (nested) dict, refusing unknown keys and wrong types by name."""
    if not isinstance(values, dict):
        raise TietaError(f"config section {where.rstrip('.') or 'top'} should be a mapping, got {_shown(values)}")
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
INT_LIMIT = 2**63  # integer settings are 64-bit (torch's and numpy's), and print in a message


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one short line, for a message (an integer too long for repr() is described)."""
    if type(value) is int and abs(value) >= 10**100:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1:,} digits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer past Python's 4,300 digits, deep inside a list
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
            raise TietaError(f"config key {key} should be a mapping, got {_shown(value)}")
        # a key is checked before its value, so it is a string there; one that would break the line is quoted
        return {_typed(k, key_type, key): _typed(v, value_type, f"{key}.{k}" if k.isprintable() else f"{key}[{k!r}]")
                for k, v in value.items()}
    if typing.get_origin(hint) is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise TietaError(f"config key {key} should be a list, got {_shown(value)}")
        return [_typed(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # an integer past 1.8e308
            raise TietaError(f"config key {key} should be a finite number, got {_shown(value)}") from None
    if type(value) is not hint:  # bool is an int subclass: compare exact types
        raise TietaError(f"config key {key} should be {_TYPE_NAMES.get(hint, hint)}, got {_shown(value)}")
    if hint is float and not math.isfinite(value):
        raise TietaError(f"config key {key} should be a finite number, got {value!r}")
    if hint is int and not -INT_LIMIT <= value < INT_LIMIT:
        raise TietaError(f"config key {key} should be an integer of at most 64 bits, got {_shown(value)}")
    return value


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[dict[str, Any]] = None,
                older: bool = False) -> RunConfig:
    """The defaults, updated by a YAML file, updated by dotted overrides ({"optim.lr": 1e-4}); a
    warm-up neither gives follows the rule (:func:`default_warmup_epochs`), resolved here.
    ``older``: the file is a run's config.yaml, which an older tieta may have written without some
    settings (:func:`with_older_defaults`).

    The file is read within ``tieta.safe_yaml``'s limits (at most 1 MiB, no repeated keys, aliases
    that share settings but do not multiply them) and must hold a mapping of settings.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        values = safe_yaml.read_file(path, "config file")
        if values is None:
            raise TietaError(f"config file {path} holds no settings (it is empty); give at least one, or leave "
                             "out --config")
        if not isinstance(values, dict):
            raise TietaError(f"config file {path} should hold a mapping of settings, got a {type(values).__name__}")
        if older:
            values = with_older_defaults(values)
    for dotted, value in (overrides or {}).items():
        if not isinstance(dotted, str):
            raise TietaError(f"setting names are dotted text such as optim.lr, got {_shown(dotted)}")
        section = values
        *parents, leaf = dotted.split(".")
        for parent in parents:
            section = section.setdefault(parent, {})
            if not isinstance(section, dict):
                shown = dotted if dotted.isprintable() else repr(dotted)
                raise TietaError(f"cannot set {shown}: {parent if parent.isprintable() else repr(parent)} is not "
                                 "a section")
        section[leaf] = value
    _model_from_weights(values)
    config = from_dict(RunConfig, values)
    validate(config)
    return with_warmup(config)


def _model_from_weights(values: dict[str, Any]) -> None:
    """Settings that leave out the model but give a transformers checkpoint (a save_pretrained
    folder or hf:ORG/NAME) as the weights name that checkpoint as the model too: its config.json
    gives the architecture, also where the weights are not read (a model rebuilt from a run). A
    model named beside such weights is refused."""
    weights = values.get("weights")
    if not isinstance(weights, str) or not hf_source.is_source(weights):
        return
    if "model" not in values:
        values["model"] = weights
    elif values["model"] != weights:
        raise TietaError(f"the weights {weights} are a transformers checkpoint, whose config.json gives the "
                         f"architecture; leave out the model ({values['model']})")


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=1e-4' -> ("optim.lr", 0.0001); the value is read as YAML (text that is not YAML
    stays text), within ``tieta.safe_yaml``'s limits."""
    if "=" not in text:
        raise TietaError(f"--set takes KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or not key.isprintable() or not all(part.strip() for part in key.split(".")):
        raise TietaError(f"--set takes KEY=VALUE with a dotted key such as optim.lr, got {text!r}")
    try:
        value = safe_yaml.loads(raw)
    except safe_yaml.RefusedYAML as error:
        raise TietaError(f"--set {key}: the value is refused: {error}") from None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-4" as a string; numbers are what such keys mean
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key, value


# Limits on sizes and numbers that pass their type but could not work: each is refused by name, with
# its limit, before anything is allocated (a C++ allocation error or hours of NaN are no answer).
# an image side in pixels (tieta.backbone.MAX_IMG_SIZE): 4096 px is 65,536 patches of 16 px, whose
# attention alone takes 17 GB a head
# images in one batch (training or evaluation): 1,024 times the papers' 64; a batch this large of
# even 32 px images is gigabytes of activations per block
MAX_BATCH_SIZE = 65_536
# training epochs (and warm-up epochs): VTAB-1k recipes train 100, and 10,000 are weeks of ViT-B
MAX_EPOCHS = 10_000
# any learning rate (optim.lr, min_lr, a group's): AdamW's steps are about lr in size, and a weight
# moved by more than 10 in one step is lost (1e308 overflows to inf in the first step)
MAX_LR = 10.0
# AdamW's decoupled weight decay multiplies every weight by (1 - lr x weight_decay) each step
MAX_WEIGHT_DECAY = 10.0
# the largest gradient norm of clipping: beyond it no gradient is ever clipped (null turns it off)
MAX_CLIP_GRAD = 1e6
# data-loading processes: each is a whole Python process with its own copy of the dataset index
MAX_WORKERS = 256
# micro-batches per optimizer step: 1,024 of the papers' 64 images are an epoch of most VTAB-1k tasks
MAX_GRAD_ACCUM_STEPS = 1_024
AMP_TYPES = ("bf16", "fp16")
LOGGERS = ("csv", "tensorboard", "wandb")


def _bounds(config: RunConfig) -> list[tuple[bool, str]]:
    """(within its limit, the sentence if not) for each general size and number with a limit."""
    optim = config.optim
    checks = [
        (config.img_size is None or config.img_size <= MAX_IMG_SIZE,
         f"img_size must be at most {MAX_IMG_SIZE} px, got {config.img_size}"),
        (optim.batch_size <= MAX_BATCH_SIZE,
         f"optim.batch_size must be at most {MAX_BATCH_SIZE:,}, got {optim.batch_size:,}"),
        (config.eval_batch_size <= MAX_BATCH_SIZE,
         f"eval_batch_size must be at most {MAX_BATCH_SIZE:,}, got {config.eval_batch_size:,}"),
        (optim.epochs <= MAX_EPOCHS, f"optim.epochs must be at most {MAX_EPOCHS:,}, got {optim.epochs:,}"),
        (optim.warmup_epochs is None or optim.warmup_epochs <= MAX_EPOCHS,
         f"optim.warmup_epochs must be at most {MAX_EPOCHS:,}, got {optim.warmup_epochs or 0:,}"),
        (optim.lr <= MAX_LR, f"optim.lr must be at most {MAX_LR:g}, got {optim.lr:g}"),
        (optim.min_lr <= MAX_LR, f"optim.min_lr must be at most {MAX_LR:g}, got {optim.min_lr:g}"),
        (optim.weight_decay <= MAX_WEIGHT_DECAY,
         f"optim.weight_decay must be at most {MAX_WEIGHT_DECAY:g}, got {optim.weight_decay:g}"),
        (optim.clip_grad is None or optim.clip_grad <= MAX_CLIP_GRAD,
         f"optim.clip_grad must be at most {MAX_CLIP_GRAD:g} (null turns clipping off), got {optim.clip_grad}"),
        (config.data.num_workers <= MAX_WORKERS,
         f"data.num_workers must be at most {MAX_WORKERS}, got {config.data.num_workers:,}"),
    ]
    for group, lr in optim.lr_groups.items():
        checks.append((lr <= MAX_LR, f"optim.lr_groups.{group} must be at most {MAX_LR:g}, got {lr:g}"))
    checks.append((optim.grad_accum_steps <= MAX_GRAD_ACCUM_STEPS,
                   f"optim.grad_accum_steps must be at most {MAX_GRAD_ACCUM_STEPS:,}, got {optim.grad_accum_steps:,}"))
    return checks


def _training_habits(config: RunConfig) -> list[tuple[bool, str]]:
    """(allowed, the sentence if not) for mixed precision, accumulation, label smoothing and loggers."""
    optim = config.optim
    own_loss = [method.name for method in config.method_list if method.objective is not None]
    checks = [
        (config.amp is None or config.amp in AMP_TYPES,
         f"amp must be one of {', '.join(AMP_TYPES)} (or null for fp32), got {config.amp!r}"),
        (not (config.bf16 and config.amp not in (None, "bf16")),
         f"bf16: true asks for bf16 autocast but amp is {config.amp!r}; give one of them"),
        (optim.grad_accum_steps >= 1, f"optim.grad_accum_steps must be at least 1, got {optim.grad_accum_steps}"),
        (0 <= optim.label_smoothing < 1, f"optim.label_smoothing must be in [0, 1), got {optim.label_smoothing}"),
        (optim.label_smoothing == 0 or not own_loss,
         f"optim.label_smoothing smooths the cross-entropy, but {' and '.join(own_loss)} trains with its own loss; "
         "leave it at 0"),
        # a method's own loss is no mean over images (a rate penalty, a search that steps on every
        # batch), so batches of it do not add up to one larger batch
        (optim.grad_accum_steps == 1 or not own_loss,
         f"{' and '.join(own_loss)} trains with its own loss, which batches do not add up to: "
         "optim.grad_accum_steps must stay 1 with it"),
        (len(set(config.log)) == len(config.log), f"log names a logger twice: {config.log}"),
    ]
    for logger in config.log:
        checks.append((logger in LOGGERS, f"log takes {', '.join(LOGGERS)}, got {logger!r}"))
    return checks


def _check_declared_bounds(config: RunConfig) -> None:
    """Each method setting whose field declares ``at_most`` (a size that allocates weights: a rank,
    a bottleneck, a number of experts) within it, named with its limit."""
    for name, cls in registry.config_sections().items():
        section = getattr(config, name)
        for item in dataclasses.fields(cls):
            limit = item.metadata.get("at_most")
            value = getattr(section, item.name)
            if limit is not None and isinstance(value, (int, float)) and value > limit:
                raise TietaError(f"{name}.{item.name} must be at most {limit:,} (it sets the size of the weights "
                                 f"the method adds), got {value:,}")


def _check_learning_rates(config: RunConfig) -> None:
    """Every group's base learning rate (a method's own included) within MAX_LR, and AdamW's decay
    factor (1 - lr x weight_decay) positive, so that no step flips or zeroes the weights."""
    rates = {"optim.lr": config.optim.lr}
    rates.update({f"the {group} parameters' learning rate": lr
                  for group, lr in group_learning_rates(config).items() if lr is not None})
    for name, lr in rates.items():
        if lr > MAX_LR:
            raise TietaError(f"{name} must be at most {MAX_LR:g}, got {lr:g}")
        if lr * config.optim.weight_decay >= 1:
            raise TietaError(f"{name} x optim.weight_decay must be below 1 (AdamW multiplies the weights by "
                             f"1 - lr x weight_decay each step), got {lr:g} x {config.optim.weight_decay:g}")


def validate(config: RunConfig) -> None:
    """Refuse settings that cannot work, each with one sentence (every method's sections are
    checked, used or not, so that a bad setting never waits for the run that uses it), and sizes and
    numbers beyond their limits (``MAX_IMG_SIZE`` and the others above) before anything is allocated."""
    config.method_list  # unknown or repeated method names
    optim, data = config.optim, config.data
    checks = [
        (optim.epochs >= 1, f"optim.epochs must be at least 1, got {optim.epochs}"),
        (optim.warmup_epochs is None or optim.warmup_epochs >= 0,
         f"optim.warmup_epochs cannot be negative, got {optim.warmup_epochs}"),
        (optim.batch_size >= 1, f"optim.batch_size must be at least 1, got {optim.batch_size}"),
        (optim.lr > 0, f"optim.lr must be positive, got {optim.lr}"),
        (optim.schedule in SCHEDULES, f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {optim.schedule!r}"),
        (optim.min_lr >= 0, f"optim.min_lr cannot be negative, got {optim.min_lr}"),
        (optim.weight_decay >= 0, f"optim.weight_decay cannot be negative, got {optim.weight_decay}"),
        (optim.clip_grad is None or optim.clip_grad > 0,
         f"optim.clip_grad, the largest gradient norm, must be positive (or null for no clipping), "
         f"got {optim.clip_grad}"),
        (config.eval_every >= 1, f"eval_every must be at least 1, got {config.eval_every}"),
        (config.eval_batch_size >= 1, f"eval_batch_size must be at least 1, got {config.eval_batch_size}"),
        (config.img_size is None or config.img_size > 0, f"img_size must be positive, got {config.img_size}"),
        (0 <= config.drop_path < 1, f"drop_path must be in [0, 1), got {config.drop_path}"),
        (0 <= config.seed < SEED_LIMIT,
         f"seed must be in 0 .. 2**32 - 1 (numpy's and torch's range), got {config.seed}"),
        (_DEVICE.fullmatch(config.device) is not None, f"device must be auto, cpu or cuda[:N], got {config.device!r}"),
        (data.num_workers >= 0, f"data.num_workers cannot be negative, got {data.num_workers}"),
    ]
    checks += [
        (data.holdout is None or 0 < data.holdout < 1,
         f"data.holdout, the fraction of images held out for testing, must be between 0 and 1, got {data.holdout}"),
        (data.augment in AUGMENTS, f"data.augment must be one of {', '.join(AUGMENTS)}, got {data.augment!r}"),
        (data.kind is None or data.kind in DATA_KINDS,
         f"data.kind must be one of {', '.join(DATA_KINDS)}, got {data.kind!r}"),
    ]
    for name in ("train_split", "eval_split"):
        split = getattr(data, name)
        checks.append((split in SPLITS, f"data.{name} must be one of {', '.join(SPLITS)}, got {split!r}"))
    groups = ("head", *registry.METHODS)
    for group, lr in optim.lr_groups.items():
        checks.append((group in groups, f"optim.lr_groups names a parameter group, one of {', '.join(groups)}; "
                                        f"got {group!r}"))
        checks.append((lr > 0, f"optim.lr_groups.{group} must be positive, got {lr}"))
    for ok, message in checks + _bounds(config) + _training_habits(config):
        if not ok:
            raise TietaError(message)
    normalizations.check_setting(data.normalization)
    config.video.check()
    config.video_data.check(prefix="video_data.")
    _check_resolved(config.resolved)
    _check_declared_bounds(config)
    config.segmentation.check()
    config.segmentation_data.check(prefix="segmentation_data.")
    for method in registry.METHODS.values():
        if method.validate is not None:
            method.validate(config)
    _check_learning_rates(config)
    objectives = [method.name for method in config.method_list if method.objective is not None]
    if len(objectives) > 1:
        raise TietaError(f"{' and '.join(objectives)} each train with their own loss; combine at most one of them")


def _check_resolved(resolved: Any) -> None:
    """A run's record (config.yaml's ``resolved``) of the kind tieta writes, or none."""
    if resolved is not None:
        check_record(resolved)


# what an older tieta's run settings mean where they lack a key: it normalised with ImageNet's
# statistics (then the default, written out only by later versions)
OLDER_DEFAULTS = {"data": {"normalization": "imagenet"}}


def with_older_defaults(values: Any) -> Any:
    """A run's settings (config.yaml, a checkpoint's) with what an older tieta left out filled in as
    it was then (:data:`OLDER_DEFAULTS`); anything but a mapping is returned as it is."""
    if not isinstance(values, dict):
        return values
    values = dict(values)
    for section, defaults in OLDER_DEFAULTS.items():
        if section not in values:
            values[section] = dict(defaults)
        elif isinstance(values[section], dict):
            values[section] = {**defaults, **values[section]}
    return values


def with_defaults(settings: Any) -> Any:
    """A run's recorded settings as this tieta reads them: what an older tieta left out filled in as
    it was then (:func:`with_older_defaults`), then every key added since at its default (which is
    how the run trained); settings that no longer read stay as they are."""
    settings = with_older_defaults(settings)
    try:
        return from_dict(RunConfig, settings).to_dict()
    except (TietaError, TypeError):
        return settings


def group_learning_rates(config: RunConfig) -> dict[str, float]:
    """Per-group base learning rates: the methods' own (e.g. PYRA's named lr), then optim.lr_groups."""
    groups: dict[str, float] = {}
    for method in config.method_list:
        if method.learning_rates is not None:
            groups.update(method.learning_rates(config))
    groups.update(config.optim.lr_groups)
    return groups


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved config without what may differ between equal runs (the device, the path's spelling,
    what the run recorded of its inputs), with what an older tieta did not record filled in
    (:func:`with_defaults`)."""
    values = {key: value for key, value in with_defaults(config).items() if key not in ("device", "resolved")}
    data = dict(values.get("data") or {})
    if data.get("path") and not str(data["path"]).startswith("hf:"):  # a hub dataset's name is no path
        data["path"] = str(Path(data["path"]).resolve())
    data.pop("kind", None)  # resolved from the path's contents (tieta.train.video_run), so the path covers it
    segmentation = values.get("segmentation")
    if isinstance(segmentation, dict):  # its one head, resolved from the path's contents as data.kind is
        values["segmentation"] = {key: value for key, value in segmentation.items() if key != "head"}
    video = values.get("video")
    if isinstance(video, dict) and video.get("frames") is None:  # a video run takes video_data's frames
        values["video"] = {**video, "frames": (values.get("video_data") or {}).get("frames")}
    values["data"] = data
    weights = values.get("weights")
    if isinstance(weights, str) and weights.endswith(WEIGHT_SUFFIXES):  # a weights file: its spelling aside
        values["weights"] = str(Path(weights).resolve())
    return values


def first_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """The first setting that differs, as "key 'old' there, 'new' now" ("" where none does)."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} {a!r} there, {b!r} now"
    return ""
