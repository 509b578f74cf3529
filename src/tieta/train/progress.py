"""The resumable checkpoint: everything a killed run needs to go on exactly as if it had not stopped.

Written after every epoch (``progress.safetensors``, safetensors with a checksum, atomically):
- the trained tensors (LoRA, adapters, head, ...), as in the final checkpoint;
- the optimizer's state (AdamW's step and moments per parameter, and its groups);
- the random states: torch's (every process's CPU generator, and its CUDA ones), numpy's and
  Python's, and the generator that shuffles the training images (the sampler's position);
- the epoch, the best accuracy so far, and how many processes trained;
- the metric records of the finished epochs (``metrics.jsonl`` is rebuilt from them on resume);
- fp16's gradient scaler (its scale and the steps since it last changed);
- the trained tensors of the best epoch so far (checkpoint_best.safetensors once finished);
- the settings and the data's fingerprint the run started with (a resume refuses a change); the
  settings include the run's record of its normalisation and backbone (``tieta.train.record``).

The learning-rate schedule and every method's per-epoch schedule are functions of the step and the
epoch, so they need no state of their own.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from tieta.errors import TietaError
from tieta.files import parse_json
from tieta.train.checkpoint import load_trained, metadata_count, read_tensors, trained_state, write_tensors
from tieta.train.distributed import Processes, gather_tensors

FORMAT = "tieta-progress-1"


@dataclass
class Progress:
    """Where a run stands after an epoch (what resuming it needs besides the tensors)."""

    epoch: int  # epochs completed
    best: Optional[dict[str, Any]]  # {"acc": ..., "epoch": ...} of the evaluations so far
    records: Optional[list[dict[str, Any]]] = field(default_factory=list)  # one per finished epoch (None: an
    # older checkpoint, which did not record them)
    settings: Optional[dict[str, Any]] = None  # the resolved config the run started with
    data: str = ""  # the fingerprint of its data (tieta.data.vtab.fingerprint)
    scaler: Optional[dict[str, Any]] = None  # fp16's GradScaler.state_dict() (None without one)
    # the trained tensors of the best epoch (None: none evaluated yet, or an older checkpoint); only
    # load_progress reads them
    best_tensors: Optional[dict[str, torch.Tensor]] = None


def save_progress(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, shuffle: torch.Generator,
                  progress: Progress, processes: Processes) -> None:
    """Write the resumable checkpoint (collective: every process calls it; the main one writes)."""
    tensors: dict[str, torch.Tensor] = {f"model.{name}": p for name, p in trained_state(model).items()}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    for rank, rng in enumerate(gather_tensors(torch.get_rng_state(), processes)):
        tensors[f"rng.torch.{rank}"] = rng
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for rank, rng in enumerate(gather_tensors(torch.cuda.get_rng_state(), processes)):
            tensors[f"rng.cuda.{rank}"] = rng
    for name, tensor in (progress.best_tensors or {}).items():
        tensors[f"best.{name}"] = tensor
    tensors["rng.shuffle"] = shuffle.get_state()
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    python_version, python_state, python_gauss = random.getstate()
    tensors["rng.python"] = torch.tensor(python_state, dtype=torch.int64)
    metadata = {
        "tieta_format": FORMAT,
        "epoch": str(progress.epoch),
        "best": json.dumps(progress.best),
        "processes": str(processes.world),
        "param_groups": json.dumps(state["param_groups"]),
        "numpy": json.dumps([kind, position, has_gauss, gauss]),
        "python": json.dumps([python_version, python_gauss]),
        "records": json.dumps(progress.records),
        "settings": json.dumps(progress.settings),
        "data": progress.data,
    }
    if progress.scaler is not None:
        metadata["scaler"] = json.dumps(progress.scaler)
    if processes.main:
        write_tensors(tensors, path, metadata)


def load_progress(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, shuffle: torch.Generator,
                  processes: Processes) -> Progress:
    """Restore a run to the end of its last checkpointed epoch; returns where it stands."""
    tensors, metadata = read_tensors(path)
    progress = read_record(path, metadata)
    try:
        saved_world = int(metadata["processes"])
        groups = json.loads(metadata["param_groups"])
        numpy_kind, numpy_position, numpy_has_gauss, numpy_gauss = json.loads(metadata["numpy"])
        python_version, python_gauss = json.loads(metadata["python"])
    except (KeyError, ValueError, TypeError):
        raise TietaError(f"{path} holds unreadable progress metadata") from None
    if saved_world != processes.world:
        raise TietaError(f"{path} was written by {saved_world} process(es); resume it with as many (an exact "
                         f"resume needs every process's random state), not {processes.world}")
    trained = {name.removeprefix("model."): t for name, t in tensors.items() if name.startswith("model.")}
    load_trained(model, trained)
    missing = {name for name, p in model.named_parameters() if p.requires_grad} - set(trained)
    if missing:
        raise TietaError(f"{path} lacks {sorted(missing)[0]}, which this run trains (built with other methods?)")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as error:
        raise TietaError(f"{path} holds an optimizer state that does not fit this run ({error})") from None
    torch.set_rng_state(tensors[f"rng.torch.{processes.rank}"])
    if f"rng.cuda.{processes.rank}" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng.cuda.{processes.rank}"])
    shuffle.set_state(tensors["rng.shuffle"])
    np.random.set_state((numpy_kind, tensors["rng.numpy"].numpy().astype(np.uint32), numpy_position,
                         numpy_has_gauss, numpy_gauss))
    random.setstate((python_version, tuple(tensors["rng.python"].tolist()), python_gauss))
    best = {name.removeprefix("best."): t for name, t in tensors.items() if name.startswith("best.")}
    progress.best_tensors = best if best.keys() == trained.keys() else None
    return progress


def read_record(path: Path, metadata: Optional[dict[str, str]] = None) -> Progress:
    """What the resumable checkpoint at ``path`` records of its run (its tensors checked, not loaded
    into a model): the epoch, the best accuracy, the finished epochs' metrics, the settings and the
    data's fingerprint."""
    if metadata is None:
        metadata = read_tensors(path)[1]
    if metadata.get("tieta_format") != FORMAT:
        raise TietaError(f"{path} is not a tieta resumable checkpoint (or one from another tieta version)")
    unreadable = TietaError(f"{path} holds unreadable progress metadata")
    try:
        epoch = metadata_count(metadata["epoch"])
        best = parse_json(metadata["best"], f"the best accuracy in {path}")
        records = parse_json(metadata["records"], f"the metrics in {path}") if "records" in metadata else None
        settings = parse_json(metadata.get("settings", "null"), f"the settings in {path}")
        scaler = parse_json(metadata.get("scaler", "null"), f"the gradient scaler's state in {path}")
    except KeyError:
        raise unreadable from None
    records_ok = records is None or (isinstance(records, list) and all(isinstance(r, dict) for r in records))
    if (epoch is None or not (best is None or isinstance(best, dict)) or not records_ok
            or not (settings is None or isinstance(settings, dict))
            or not (scaler is None or isinstance(scaler, dict))):
        raise unreadable
    return Progress(epoch, best, records, settings, metadata.get("data", ""), scaler)
