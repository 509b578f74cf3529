"""A run records the backbone it was trained on (a weights file by absolute path and SHA-256, hub
weights by timm tag) and rebuilding it (eval, export, predict, resume) refuses another one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from conftest import fail_in_epoch, write_vtab_task
from tieta import TietaError
from tieta.cli import main
from tieta.deploy.export import export_run
from tieta.train.checkpoint import CONFIG_KEY, read_tensors, write_tensors
from tieta.train.config import load_config
from tieta.train.fit import evaluate_checkpoint, fit, load_run_model, resume_run
from tieta.train.model import build_backbone
from tieta.train.record import backbone_record, check_backbone
from tieta.train.rundir import read_state

TINY = {"model": "test_vit", "img_size": 32, "optim.epochs": 1, "optim.warmup_epochs": 0, "optim.batch_size": 4,
        "eval_batch_size": 8, "lora.rank": 2}
CHANGED = "changed since the run was trained on it"


def _weights(path, seed: int = 0):
    """A test_vit weights file (32 px) of random values."""
    torch.manual_seed(seed)
    save_file(timm.create_model("test_vit", img_size=32).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """A run trained on the weights file named relatively, from the folder that holds it."""
    root = tmp_path_factory.mktemp("record")
    task = write_vtab_task(root / "task")
    home = root / "weights"
    home.mkdir()
    _weights(home / "vit.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(home)
        fit(load_config(overrides={**TINY, "weights": "vit.safetensors", "data.path": str(task)}), root / "run")
    files = (home / "vit.safetensors", root / "run" / "checkpoint.safetensors")
    return root / "run", home / "vit.safetensors", {path: path.read_bytes() for path in files}


@pytest.fixture
def trained(trained_once, tmp_path, monkeypatch):
    """The run and its weights file as trained (a test may change them), seen from another folder."""
    run, weights, pristine = trained_once
    for path, data in pristine.items():
        path.write_bytes(data)
    monkeypatch.chdir(tmp_path)
    return run, weights


def test_a_weights_file_is_recorded_by_absolute_path_and_checksum(trained):
    run, weights = trained
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["weights"] == str(weights)  # given as "vit.safetensors"
    assert saved["resolved"]["backbone"] == {"weights": "file", "path": str(weights), "bytes": weights.stat().st_size,
                                             "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert json.loads((run / "summary.json").read_text())["weights"] == str(weights)
    # from another folder, the run is rebuilt on the same file
    assert evaluate_checkpoint(run)["images"] == 6
    assert export_run(run, "export")["output"].is_dir()  # in this test's own folder


def test_a_changed_weights_file_is_refused_by_eval_export_and_predict(trained, capsys):
    run, weights = trained
    _weights(weights, seed=1)
    with pytest.raises(TietaError, match=f"the weights file {weights} {CHANGED}") as refused:
        evaluate_checkpoint(run)
    assert "\n" not in str(refused.value)
    image = next((run.parent / "task" / "images" / "test").iterdir())
    for command in (["export", str(run), "--output", "export"], ["predict", str(run), str(image)]):
        assert main(command) == 2
        assert CHANGED in capsys.readouterr().err
    assert not Path("export").exists()


def test_a_run_without_the_record_is_rebuilt_as_before(trained):
    run, weights = trained
    tensors, metadata = read_tensors(run / "checkpoint.safetensors")
    settings = json.loads(metadata[CONFIG_KEY])
    del settings["resolved"]
    write_tensors(tensors, run / "checkpoint.safetensors", {**metadata, CONFIG_KEY: json.dumps(settings)})
    _weights(weights, seed=1)  # nothing says which file it was: an older run cannot check
    assert load_run_model(run)[1].resolved["backbone"]["weights"] == "file"


def test_resume_refuses_a_changed_weights_file(vtab_task, tmp_path, monkeypatch):
    weights = _weights(tmp_path / "vit.safetensors")
    fail_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit(load_config(overrides={**TINY, "optim.epochs": 2, "weights": str(weights), "data.path": str(vtab_task)}),
            tmp_path / "run")
    monkeypatch.undo()
    _weights(weights, seed=1)
    with pytest.raises(TietaError, match=CHANGED):
        resume_run(tmp_path / "run")
    assert read_state(tmp_path / "run").state == "interrupted"


def test_hub_weights_are_recorded_by_timm_tag():
    assert backbone_record("vit_base_patch16_224", None) == {
        "weights": "hub", "timm": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "hf_hub_id": "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "url": ""}
    assert backbone_record("vit_base_patch16_224.augreg_in21k", None)["timm"] == "vit_base_patch16_224.augreg_in21k"
    assert backbone_record("test_vit", "random") == {"weights": "random"}


def test_built_in_weights_are_recorded_by_name_and_checksum(tmp_path, monkeypatch):
    from tieta.train import record

    weights = _weights(tmp_path / "built.safetensors")
    monkeypatch.setattr(record, "builtin_weights", lambda: {"built_in": lambda: weights})
    assert backbone_record("test_vit", "built_in") == {"weights": "builtin", "name": "built_in",
                                                       "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    config = load_config(overrides={"model": "test_vit", "weights": "built_in",
                                    "resolved": {"backbone": backbone_record("test_vit", "built_in")}})
    check_backbone(config)
    _weights(weights, seed=1)
    with pytest.raises(TietaError, match="the built-in weights built_in are not those the run was trained on"):
        check_backbone(config)


def test_another_timm_tag_is_refused_before_any_download():
    recorded = {"weights": "hub", "timm": "test_vit.older_tag", "hf_hub_id": "timm/test_vit.older_tag", "url": ""}
    config = load_config(overrides={"model": "test_vit", "resolved": {"backbone": recorded}})
    with pytest.raises(TietaError, match="the run was trained on timm's test_vit.older_tag .* but this timm resolves "
                                         "test_vit to test_vit.r160_in1k"):
        build_backbone(config, 3)
    check_backbone(load_config(overrides={"model": "test_vit",
                                          "resolved": {"backbone": backbone_record("test_vit", None)}}))


def test_other_weights_than_the_recorded_kind_are_refused():
    config = load_config(overrides={**TINY, "weights": "random",
                                    "resolved": {"backbone": {"weights": "file", "path": "/x/vit.safetensors"}}})
    with pytest.raises(TietaError, match="trained on the weights file /x/vit.safetensors, but its settings now name "
                                         "random weights"):
        build_backbone(config, 3)


@pytest.mark.parametrize("resolved", [{"other": 1}, [1], {"backbone": {"weights": "cloud"}},
                                      {"normalization": {"mean": [1, 2], "std": [1, 1, 1]}}])
def test_a_malformed_record_is_one_sentence(resolved):
    with pytest.raises(TietaError, match="resolved"):
        load_config(overrides={"resolved": resolved})
