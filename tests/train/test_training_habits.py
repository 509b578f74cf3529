"""The training conveniences: mixed precision, gradient accumulation, label smoothing, the timm-named
flags, the loggers, top-5 and balanced accuracy, and the best epoch's checkpoint."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from torch import nn
from torch.utils.data import TensorDataset

from conftest import fail_in_epoch, write_vtab_task
from tieta import TietaError
from tieta.cli import _config_from, main, parse_arguments
from tieta.train.checkpoint import read_tensors, write_tensors
from tieta.train.config import load_config
from tieta.train.fit import evaluate_checkpoint, fit, make_loader, resume_run, training_objective, use_tf32
from tieta.train.loggers import check_available
from tieta.train.loop import evaluate, train_one_epoch
from tieta.train.model import build_model
from tieta.train.progress import read_record

# nothing drawn per step: no drop-path, no LoRA dropout
TINY = {"model": "test_vit", "weights": "random", "img_size": 32, "optim.epochs": 2, "optim.warmup_epochs": 1,
        "optim.batch_size": 4, "eval_batch_size": 8, "lora.rank": 2, "lora.dropout": 0.0, "drop_path": 0.0}


@pytest.fixture(autouse=True)
def _untimed(monkeypatch):
    """No throughput timing at the end of each run (2 s of it): these tests time nothing."""
    from tieta.train import fit as fit_module

    monkeypatch.setattr(fit_module, "measure_throughput", lambda *args, **kwargs: 1.0)


def _config(task, **extra):
    return load_config(overrides={**TINY, "data.path": str(task), **extra})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- gradient accumulation -----------------------------------------------------------------------

def _one_epoch(batch_size: int, accum_steps: int, images: int) -> dict[str, torch.Tensor]:
    """The trained tensors after one epoch over ``images`` random images in batches of ``batch_size``."""
    config = load_config(overrides={**TINY, "weights": "random"})
    torch.manual_seed(0)
    model = build_model(config, 3)
    data = TensorDataset(torch.randn(images, 3, 32, 32), torch.arange(images) % 3)
    loader = make_loader(data, batch_size, True, 7, 0)
    # plain SGD: the step is the gradient itself (AdamW's first step is about lr x sign(gradient), which
    # float rounding can flip where a gradient is nearly 0)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([{"params": trained, "base_lr": 1e-2}], lr=1e-2)
    sizes = [min(batch_size, images - start) for start in range(0, images, batch_size)]
    train_one_epoch(model, loader, nn.Identity(), optimizer, lambda step: 1.0 + step, 0, torch.device("cpu"),
                    global_sizes=sizes, accum_steps=accum_steps)
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_n_steps_of_batch_b_update_as_one_step_of_batch_n_times_b():
    # 10 images: a whole step of 3 batches of 2, then a partial group of 2 batches (4 images), at
    # another learning rate (the schedule counts optimizer steps)
    accumulated = _one_epoch(2, 3, 10)
    whole = _one_epoch(6, 1, 10)
    assert accumulated.keys() == whole.keys()
    for name in whole:
        assert torch.allclose(accumulated[name], whole[name], atol=1e-6, rtol=1e-5), name


def test_accumulated_run_has_the_metrics_of_the_larger_batch(vtab_task, tmp_path):
    fit(_config(vtab_task, **{"optim.batch_size": 2, "optim.grad_accum_steps": 2}), tmp_path / "accumulated")
    fit(_config(vtab_task, **{"optim.batch_size": 4}), tmp_path / "whole")
    for a, b in zip(_metrics(tmp_path / "accumulated"), _metrics(tmp_path / "whole")):
        assert a["lr"] == pytest.approx(b["lr"])  # the schedule counts optimizer steps
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["acc"] == b["acc"]


def test_accumulation_is_refused_with_a_method_of_its_own_loss_and_below_one(vtab_task):
    for method in ("dyt", "dynamicvit", "diffrate"):
        with pytest.raises(TietaError, match="grad_accum_steps must stay 1"):
            _config(vtab_task, method=method, **{"optim.grad_accum_steps": 2})
    with pytest.raises(TietaError, match="at least 1"):
        _config(vtab_task, **{"optim.grad_accum_steps": 0})


# --- mixed precision ------------------------------------------------------------------------------

def test_fp16_with_loggers_resumes_exactly_with_its_scaler_logs_and_best_checkpoint(vtab_task, tmp_path,
                                                                                    monkeypatch):
    config = _config(vtab_task, amp="fp16", log=["csv", "tensorboard"])
    fail_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "run")
    monkeypatch.undo()
    scaler = read_record(tmp_path / "run" / "progress.safetensors").scaler
    assert scaler is not None and scaler["scale"] > 0 and "_growth_tracker" in scaler
    kept = read_tensors(tmp_path / "run" / "progress.safetensors")[0]
    assert any(name.startswith("best.") for name in kept)  # the best epoch's tensors, until the end
    summary = resume_run(tmp_path / "run")
    # the run left alone, without loggers: logging changes nothing a run computes
    alone = fit(_config(vtab_task, amp="fp16"), tmp_path / "alone")
    assert [(r["loss"], r["acc"]) for r in _metrics(tmp_path / "run")] == \
        [(r["loss"], r["acc"]) for r in _metrics(tmp_path / "alone")]
    assert summary["acc"] == alone["acc"] and summary["amp"] == "fp16"
    assert summary["tf32"] is False  # TF32 is CUDA's; on the CPU it is off and said so
    # the best epoch's checkpoint survives the resume: the one of the run left alone
    resumed, kept = (read_tensors(tmp_path / run / "checkpoint_best.safetensors") for run in ("run", "alone"))
    assert resumed[1]["epoch"] == kept[1]["epoch"]
    assert all(torch.equal(resumed[0][name], kept[0][name]) for name in kept[0])
    # summary.csv holds every epoch once, timm's columns
    with open(tmp_path / "run" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert [float(row["train_loss"]) for row in rows] == [r["loss"] for r in _metrics(tmp_path / "alone")]
    assert all(row["eval_top5"] == "" for row in rows)  # 3 classes: no top-5
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("acc")] == [1, 2]  # none twice


def test_bf16_flag_is_amp_bf16_and_older_configs_still_resume(vtab_task, tmp_path, monkeypatch):
    args = parse_arguments(["train", "--bf16", "--data", str(vtab_task), "--output", "x"])
    assert _config_from(args).precision == "bf16"
    assert main(["train", "--bf16", "--amp", "fp16", "--data", str(vtab_task), "--output", str(tmp_path / "x")]) == 2
    assert load_config(overrides={"bf16": True}).precision == "bf16"  # a config.yaml of an older tieta
    with pytest.raises(TietaError, match="give one of them"):
        load_config(overrides={"bf16": True, "amp": "fp16"})
    # a run started by a tieta without the new settings: its config.yaml and checkpoint lack them
    fail_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit(_config(vtab_task, bf16=True), tmp_path / "old")
    monkeypatch.undo()
    config = yaml.safe_load((tmp_path / "old" / "config.yaml").read_text())
    for values, keys in ((config, ("amp", "log")), (config["optim"], ("grad_accum_steps", "label_smoothing"))):
        for key in keys:
            del values[key]
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    progress = tmp_path / "old" / "progress.safetensors"
    tensors, metadata = read_tensors(progress)
    metadata.pop("format"), metadata.pop("tieta_sha256")
    metadata["settings"] = json.dumps(config)
    write_tensors(tensors, progress, metadata)
    assert resume_run(tmp_path / "old")["amp"] == "bf16"


def test_tf32_is_used_on_cuda_only():
    assert use_tf32(torch.device("cpu")) is False
    if torch.cuda.is_available():
        assert use_tf32(torch.device("cuda")) is True
        assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"


# --- flags and label smoothing --------------------------------------------------------------------

def test_timm_named_flags_map_onto_the_config_keys(vtab_task):
    args = parse_arguments(["train", "--data", str(vtab_task), "--output", "x", "--drop-path", "0.2", "--min-lr",
                            "1e-6", "--clip-grad", "1.5", "--workers", "2", "--smoothing", "0.1",
                            "--grad-accum-steps", "4", "--amp", "fp16", "--log", "csv", "--log", "tensorboard"])
    config = _config_from(args)
    assert (config.drop_path, config.optim.min_lr, config.optim.clip_grad, config.data.num_workers) == \
        (0.2, 1e-6, 1.5, 2)
    assert (config.optim.label_smoothing, config.optim.grad_accum_steps, config.amp, config.log) == \
        (0.1, 4, "fp16", ["csv", "tensorboard"])
    assert load_config().optim.label_smoothing == 0.0 and load_config().optim.grad_accum_steps == 1


def test_label_smoothing_smooths_the_cross_entropy(vtab_task):
    model = build_model(load_config(overrides=TINY), 3).eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    loss = training_objective(_config(vtab_task, **{"optim.label_smoothing": 0.2}))(model, images, labels)
    assert loss.item() == pytest.approx(F.cross_entropy(model(images), labels, label_smoothing=0.2).item(), rel=1e-6)
    plain = training_objective(_config(vtab_task))(model, images, labels)
    assert plain.item() != pytest.approx(loss.item())
    for method in ("dyt", "dynamicvit", "diffrate"):
        with pytest.raises(TietaError, match="own loss"):
            _config(vtab_task, method=method, **{"optim.label_smoothing": 0.1})


# --- top-5 and balanced accuracy -------------------------------------------------------------------

class _Fixed(nn.Module):
    """A 'model' that answers the logits it was given, image by image (the image holds its index)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[images[:, 0].long()]


def test_top5_and_balanced_accuracy():
    # 6 classes; four images of class 0 (all right), two of class 1 (one right): top-1 5/6,
    # balanced (1 + 0.5) / 2; the wrong one has its class third, so top-5 is 6/6
    logits = torch.zeros(6, 6)
    logits[:4, 0] = 5
    logits[4, 1] = 5
    logits[5, 3], logits[5, 2], logits[5, 1] = 5, 4, 3
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    data = TensorDataset(torch.arange(6.0)[:, None], labels)
    result = evaluate(_Fixed(logits), make_loader(data, 4, False, 0, 0), nn.Identity(), torch.device("cpu"))
    assert result["acc"] == pytest.approx(500 / 6)
    assert result["balanced_acc"] == pytest.approx(75.0)
    assert result["top5"] == pytest.approx(100.0)
    few = evaluate(_Fixed(logits[:, :3]), make_loader(data, 4, False, 0, 0), nn.Identity(), torch.device("cpu"))
    assert few["top5"] is None  # 3 classes: no top-5


# --- the best epoch's checkpoint, eval and export --------------------------------------------------

def test_best_checkpoint_is_kept_checksummed_and_used_by_eval_and_export(vtab_task, tmp_path, capsys):
    summary = fit(_config(vtab_task), tmp_path / "run")
    best = tmp_path / "run" / "checkpoint_best.safetensors"
    _, metadata = read_tensors(best)  # checksum verified
    assert int(metadata["epoch"]) == summary["best_epoch"]
    evaluated = evaluate_checkpoint(tmp_path / "run", best=True)  # what tieta eval --json prints
    assert evaluated["acc"] == pytest.approx(summary["best_acc"])
    assert evaluated["top5"] is None and evaluated["balanced_acc"] is not None
    assert summary["top5"] is None and summary["balanced_acc"] is not None  # 3 classes
    records = _metrics(tmp_path / "run")
    assert all("top5" in r and "balanced_acc" in r for r in records)
    assert main(["eval", str(tmp_path / "run"), "--best"]) == 0
    out = capsys.readouterr().out
    assert "(best epoch)" in out and "top-5 %" in out and "n/a" in out and "balanced %" in out
    assert main(["export", str(tmp_path / "run"), "--best", "--output", str(tmp_path / "export")]) == 0
    exported = tmp_path / "export" / "model.safetensors"
    with safe_open(str(best), "pt") as kept, safe_open(str(exported), "pt") as written:
        head = kept.get_tensor("head.weight")
        assert torch.equal(head, written.get_tensor("head.weight"))
    best.unlink()
    assert main(["eval", str(tmp_path / "run"), "--best"]) == 2
    assert "kept no checkpoint_best" in capsys.readouterr().err


# --- loggers ---------------------------------------------------------------------------------------

def test_wandb_logs_offline(vtab_task, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    fit(_config(vtab_task, log=["wandb"], **{"optim.epochs": 1}), tmp_path / "run")
    run_id = json.loads((tmp_path / "run" / "wandb.json").read_text())["id"]
    assert list((tmp_path / "wandb" / "wandb").glob(f"offline-run-*-{run_id}"))


def test_a_missing_logger_package_is_one_sentence(vtab_task, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TietaError, match=r"pip install 'tieta\[wandb\]'"):
        check_available(["wandb"])
    with pytest.raises(TietaError, match="log takes csv, tensorboard, wandb"):
        _config(vtab_task, log=["mlflow"])
    assert main(["train", "--data", str(vtab_task), "--model", "test_vit", "--weights", "random", "--img-size", "32",
                 "--log", "wandb", "--output", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()  # refused before the folder is touched


def test_two_processes_accumulating_train_as_one_process_with_the_whole_batch(tmp_path):
    import subprocess

    task = write_vtab_task(tmp_path / "task")  # 12 training images: 2 steps of 2 x 3 images, or of 6
    common = ["-m", "tieta", "train", "--model", "test_vit", "--weights", "random", "--img-size", "32", "--epochs",
              "1", "--warmup-epochs", "0", "--drop-path", "0", "--set", "lora.dropout=0", "--set", "lora.rank=2",
              "--set", "eval_batch_size=4",
              "--data", str(task)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
               "--batch-size", "3", "--grad-accum-steps", "2", "--output", str(tmp_path / "two")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fit(_config(task, **{"optim.epochs": 1, "optim.warmup_epochs": 0, "optim.batch_size": 6, "eval_batch_size": 4}),
        tmp_path / "one")
    one, two = (_metrics(tmp_path / name)[0] for name in ("one", "two"))
    for key in ("loss", "acc", "balanced_acc", "eval_loss", "lr"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (key, one, two)


def test_settings_recorded_before_the_new_keys_compare_equal_to_their_defaults():
    from tieta.train.config import comparable, first_difference

    current = load_config(overrides={"model": "test_vit", "weights": "random"}).to_dict()
    older = json.loads(json.dumps(current))
    for section, key in (("optim", "grad_accum_steps"), ("optim", "label_smoothing"), ("data", "holdout"),
                         ("data", "augment")):
        del older[section][key]
    del older["amp"], older["log"]
    assert first_difference(comparable(older), comparable(current)) == ""  # a sweep's finished run is the same
