"""What a run records of its inputs beyond its settings, and the check that rebuilding it finds them
unchanged.

A run writes into config.yaml (and its checkpoints) the field ``resolved``:

    resolved:
      normalization: {mean: [r, g, b], std: [r, g, b], interpolation: bicubic, source: ...}
      backbone: {weights: file, path: /abs/ViT-B_16.npz, sha256: ..., bytes: ...}

``normalization`` holds the numbers ``data.normalization`` resolved to (``tieta.data.normalization``),
which evaluating, exporting, predicting and resuming use as they are. ``backbone`` says which weights
the run started from:

    weights: hub      the timm tag (``architecture.tag``) and hf_hub_id timm resolved the model name to
    weights: file     the weights file's absolute path, SHA-256 and size in bytes
    weights: builtin  the built-in asset's name and its file's SHA-256
    weights: transformers  a transformers checkpoint (a save_pretrained folder or hf:ORG/NAME): its
                      model type, the folder's absolute path or the hub name, each weights file's SHA-256
    weights: random   nothing more: a random backbone comes back from the run's seed

Rebuilding the run (``tieta eval``, ``export``, ``predict``, ``train --resume``) checks the backbone
against the record before loading it, and refuses another one with a sentence that says what changed
(a changed file, another timm tag). A run folder of an older tieta, without the record, is rebuilt as
before.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

from timm.models import get_pretrained_cfg
from torch import nn

from tieta.backbone import RANDOM, builtin_weights
from tieta.data import normalization as normalizations
from tieta.errors import TietaError, shown
from tieta.files import file_sha256
from tieta.hf import source as hf_source

HUB, FILE, BUILTIN, TRANSFORMERS = "hub", "file", "builtin", "transformers"
_KINDS = (HUB, FILE, BUILTIN, TRANSFORMERS, RANDOM)
_RECORD_KEYS = ("normalization", "backbone")


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    try:
        return file_sha256(path)
    except OSError as error:
        raise TietaError(f"cannot read the weights file {path}: {error.strerror or error}") from None


def weights_kind(weights: Optional[str]) -> str:
    """hub (timm's published weights), random, builtin, transformers or file: what ``load_backbone``
    makes of it."""
    if weights is None:
        return HUB
    if str(weights) == RANDOM:
        return RANDOM
    if hf_source.is_source(weights):
        return TRANSFORMERS
    return BUILTIN if str(weights) in builtin_weights() else FILE


def backbone_record(model_name: str, weights: Optional[str]) -> dict[str, Any]:
    """What identifies the backbone ``load_backbone(model_name, weights)`` loads (see the module's
    docstring); a weights file is named by its absolute path."""
    kind = weights_kind(weights)
    if kind == HUB:
        cfg = get_pretrained_cfg(model_name)
        architecture = (cfg.architecture if cfg else None) or model_name.split(".")[0]
        tag = f"{architecture}.{cfg.tag}" if cfg and cfg.tag else architecture
        return {"weights": HUB, "timm": tag, "hf_hub_id": (cfg.hf_hub_id if cfg else None) or "",
                "url": (cfg.url if cfg else None) or ""}
    if kind == RANDOM:
        return {"weights": RANDOM}
    if kind == TRANSFORMERS:
        described = hf_source.describe(weights)
        return {"weights": TRANSFORMERS, "model_type": described["model_type"], "source": described["source"],
                "sha256": " ".join(f"{item['file']}:{item['sha256']}" for item in described["weights"])}
    if kind == BUILTIN:
        path = builtin_weights()[str(weights)]()
        return {"weights": BUILTIN, "name": str(weights), "sha256": sha256_of(path)}
    path = Path(weights).resolve()
    if not path.is_file():  # load_backbone says why in its own words
        return {"weights": FILE, "path": str(path)}
    return {"weights": FILE, "path": str(path), "sha256": sha256_of(path), "bytes": path.stat().st_size}


def _shown(record: dict[str, Any]) -> str:
    """The recorded backbone in a few words."""
    kind = record.get("weights")
    if kind == HUB:
        return f"timm's published weights {record.get('timm')}"
    if kind == FILE:
        return f"the weights file {record.get('path')}"
    if kind == BUILTIN:
        return f"the built-in weights {record.get('name')}"
    if kind == TRANSFORMERS:
        return f"the transformers checkpoint {record.get('source')}"
    return "random weights"


def check_backbone(config: Any) -> None:
    """Refuse to rebuild a run on another backbone than the one its record names (nothing to check
    where it has no record: a new run, or one of an older tieta).

    Raises:
        TietaError: one sentence that says what changed.
    """
    recorded = (config.resolved or {}).get("backbone") if isinstance(config.resolved, dict) else None
    if not recorded:
        return
    advice = "a run is rebuilt only on the backbone it was trained on"
    kind = weights_kind(config.weights)
    if kind != recorded.get("weights"):
        raise TietaError(f"the run was trained on {_shown(recorded)}, but its settings now name "
                         f"{_shown(backbone_record(config.model, config.weights))}; {advice}")
    if kind == RANDOM:
        return
    if kind == FILE and not Path(config.weights).is_file():
        return  # load_backbone refuses a missing file in its own words
    if kind == TRANSFORMERS and not str(config.weights).startswith(hf_source.HUB_PREFIX) \
            and not Path(config.weights).is_dir():
        return
    now = backbone_record(config.model, config.weights)
    if kind == HUB and (now["timm"], now["hf_hub_id"]) != (recorded.get("timm"), recorded.get("hf_hub_id")):
        then = f"{recorded.get('timm')} ({recorded.get('hf_hub_id') or 'no hub id'})"
        raise TietaError(f"the run was trained on timm's {then}, but this timm resolves {config.model} to "
                         f"{now['timm']} ({now['hf_hub_id'] or 'no hub id'}); {advice}: use the timm version it was "
                         "trained with")
    if kind == TRANSFORMERS and recorded.get("sha256") and now["sha256"] != recorded["sha256"]:
        raise TietaError(f"the weights of the transformers checkpoint {now['source']} are not those the run was "
                         f"trained on ({recorded.get('source')}: other SHA-256s); {advice}")
    if kind in (FILE, BUILTIN) and recorded.get("sha256") and now["sha256"] != recorded["sha256"]:
        then = f"SHA-256 {recorded['sha256'][:16]}... then, {now['sha256'][:16]}... now"
        if kind == BUILTIN:
            raise TietaError(f"the built-in weights {recorded.get('name')} are not those the run was trained on "
                             f"({then}); {advice}")
        if Path(now["path"]) == Path(str(recorded.get("path"))):
            raise TietaError(f"the weights file {now['path']} changed since the run was trained on it ({then}); "
                             f"{advice}: restore that file")
        raise TietaError(f"the weights file {now['path']} is not the one the run was trained on "
                         f"({recorded.get('path')}; {then}); {advice}")


def check_record(resolved: Any) -> None:
    """Refuse a ``resolved`` field that is not of the kind a run writes (one sentence)."""
    if not isinstance(resolved, dict) or set(resolved) - set(_RECORD_KEYS):
        raise TietaError(f"resolved is what a run records ({' and '.join(_RECORD_KEYS)}), written by tieta, not set; "
                         f"got {shown(resolved)}")
    if resolved.get("normalization") is not None:
        if not isinstance(resolved["normalization"], dict):
            raise TietaError(f"resolved.normalization should be the numbers a run used, got "
                             f"{shown(resolved['normalization'])}")
        normalizations.check_numbers(resolved["normalization"], "resolved.normalization")
    backbone = resolved.get("backbone")
    if backbone is not None and (not isinstance(backbone, dict) or backbone.get("weights") not in _KINDS
                                 or not all(isinstance(key, str) and type(value) in (str, int) for key, value
                                            in backbone.items())):
        raise TietaError(f"resolved.backbone should be what a run records of its weights ({', '.join(_KINDS)}), got "
                         f"{shown(backbone)}")


def fresh(config: Any) -> Any:
    """A copy of ``config`` without a record: what a new run starts from (a config.yaml of another
    run used as a template records that run's inputs, not this one's)."""
    config = copy.copy(config)
    config.resolved = None
    return config


def with_record(config: Any, model: nn.Module) -> Any:
    """A copy of ``config`` whose ``resolved`` holds the run's record (kept where it has one: a
    resumed or rebuilt run uses what it was trained with) and whose weights file, if any, is named
    by its absolute path."""
    config = copy.deepcopy(config)
    resolved = dict(config.resolved or {})
    if resolved.get("normalization") is None:
        resolved["normalization"] = normalizations.resolve(config.data.normalization, model)
    if resolved.get("backbone") is None:
        resolved["backbone"] = backbone_record(config.model, config.weights)
    kind = weights_kind(config.weights)
    if kind == FILE or (kind == TRANSFORMERS and not str(config.weights).startswith(hf_source.HUB_PREFIX)):
        absolute = str(Path(config.weights).resolve())
        if config.model == config.weights:  # a transformers checkpoint names the model too
            config.model = absolute
        config.weights = absolute
    config.resolved = resolved
    return config


def run_normalization(config: Any) -> dict[str, Any]:
    """The numbers a run with a record preprocesses with (:func:`with_record` first)."""
    return config.resolved["normalization"]


def normalization_of(config: Any, model: Optional[nn.Module] = None) -> dict[str, Any]:
    """The numbers a run's images are normalised with: those it recorded, else what its setting
    stands for (``model``: read from the built backbone)."""
    recorded = config.resolved.get("normalization") if isinstance(config.resolved, dict) else None
    return recorded or normalizations.resolve(config.data.normalization, model)
