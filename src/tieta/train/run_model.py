"""A finished run's model, rebuilt from its checkpoint as it was trained (``tieta eval``, ``export``,
``predict`` and the reports read runs through it)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tieta.errors import TietaError
from tieta.train.checkpoint import load_trained, read_checkpoint
from tieta.train.config import RunConfig, from_dict, validate, with_older_defaults
from tieta.train.model import build_model, seed_everything
from tieta.train.record import with_record
from tieta.train.rundir import CHECKPOINT, CHECKPOINT_BEST, CONFIG, FAILED, FINISHED, INTERRUPTED, read_state


def load_run_model(checkpoint: str | Path, best: bool = False) -> tuple[nn.Module, RunConfig, int]:
    """Rebuild a trained model from a checkpoint file (or a run folder holding one): the backbone
    from the weights its config names, the methods, then the trained tensors.

    Args:
        best: take the run folder's checkpoint_best.safetensors (the best evaluated epoch's tensors)
            instead of the final checkpoint.
    """
    path = Path(checkpoint)
    if best and not path.is_dir():
        raise TietaError(f"--best takes a run folder (it reads the folder's {CHECKPOINT_BEST}), got the file {path}")
    if path.is_dir():
        state = read_state(path)
        if state.state == "empty":
            raise TietaError(f"{path} holds no tieta run (no {CONFIG} and no {CHECKPOINT})")
        if state.state != FINISHED:
            advice = (f"; resume it with tieta train --resume {path}" if state.state in (INTERRUPTED, FAILED) else "")
            raise TietaError(f"the run in {path} has not finished ({state.describe()}){advice}")
        path = path / (CHECKPOINT_BEST if best else CHECKPOINT)
        if best and not path.is_file():
            raise TietaError(f"the run in {path.parent} kept no {CHECKPOINT_BEST} (it was trained by a tieta that "
                             "did not keep the best epoch); use its final checkpoint")
    tensors, config_dict, num_classes = read_checkpoint(path)
    config = from_dict(RunConfig, with_older_defaults(config_dict))  # an older run normalised with ImageNet's
    validate(config)  # the settings come from a file: refuse what cannot work before torch sees it
    seed_everything(config.seed)  # as in fit, so that a "random" backbone comes back the same
    model = build_model(config, num_classes)  # refuses a backbone other than the one recorded
    load_trained(model, tensors)
    return model, with_record(config, model), num_classes  # resolved: the numbers it trained with
