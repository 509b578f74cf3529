"""tieta train with a transformers checkpoint as --weights and no --model."""

from __future__ import annotations

import yaml

from tests.conftest import refused
from tests.hf.hf_models import save_hf_model
from tieta.cli import main
from tieta.train.config import load_config

SHORT = ["--epochs", "1", "--batch-size", "4", "--set", "optim.warmup_epochs=0", "--lora-rank", "2"]


def test_the_checkpoint_names_the_model_when_the_model_is_left_out(tmp_path):
    save_hf_model("dinov2", tmp_path)
    assert load_config(overrides={"weights": str(tmp_path)}).model == str(tmp_path)
    assert load_config(overrides={"weights": "hf:org/name"}).model == "hf:org/name"
    assert load_config(overrides={"weights": "random"}).model == "vit_base_patch16_224"  # the default stays
    assert load_config(overrides={"weights": "random", "model": "test_vit"}).model == "test_vit"


def test_train_eval_and_flops_with_a_checkpoint_folder_and_no_model(vtab_task, tmp_path, capsys, monkeypatch):
    save_hf_model("clip", tmp_path / "clip")
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # the checkpoint named by a relative path: the run records it absolute
    assert main(["train", "--weights", "clip", "--data", str(vtab_task), "--output", str(run), *SHORT]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == config["weights"] == str(tmp_path / "clip")
    record = config["resolved"]["backbone"]
    assert record["weights"] == "transformers" and record["model_type"] == "clip"
    assert record["source"] == str(tmp_path / "clip") and "model.safetensors:" in record["sha256"]
    monkeypatch.chdir(vtab_task)  # another folder
    assert main(["eval", str(run)]) == 0
    assert main(["flops", "--weights", str(tmp_path / "clip"), "--lora-rank", "2"]) == 0
    assert "per image" in capsys.readouterr().out
    save_hf_model("clip", tmp_path / "clip", seed=1)  # other weights in the same folder
    capsys.readouterr()
    message = refused(capsys, "eval", str(run))
    assert "are not those the run was trained on" in message and str(tmp_path / "clip") in message


def test_a_timm_model_with_a_checkpoint_folder_is_one_sentence(tmp_path, capsys):
    save_hf_model("vit", tmp_path / "vit")
    capsys.readouterr()  # transformers' progress bar
    message = refused(capsys, "flops", "--model", "test_vit", "--weights", str(tmp_path / "vit"))
    assert "transformers checkpoint" in message and "leave out the model (test_vit)" in message
