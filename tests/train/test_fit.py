import json

import pytest
import torch
import yaml
from safetensors import safe_open

import tieta
from tieta import TietaError
from tieta.train.config import load_config
from tieta.train.fit import evaluate_checkpoint, fit, load_run_model

TINY = {"model": "test_vit", "weights": "random", "img_size": 32, "optim.epochs": 3, "optim.warmup_epochs": 1,
        "optim.batch_size": 4, "eval_batch_size": 8, "lora.rank": 2, "adapter.dim": 2}


def _config(task, **extra):
    return load_config(overrides={**TINY, "data.path": str(task), **extra})


def test_run_folder_contents(vtab_task, tmp_path):
    summary = fit(_config(vtab_task, method="lora+adapter"), tmp_path / "run")
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {"config.yaml", "metrics.jsonl", "summary.json", "checkpoint.safetensors",
                                              "checkpoint_best.safetensors", "state.json", ".lock"}
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == "lora+adapter" and config["optim"]["lr"] == 1e-3
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and all("acc" in e for e in epochs)
    saved = json.loads((run / "summary.json").read_text())
    assert saved == summary
    for key in ("acc", "best_acc", "trainable_params", "trainable_percent", "gmacs", "pyra_gflops",
                "eval_images_per_s", "wall_time_s"):
        assert summary[key] is not None
    assert summary["best_acc"] == max(e["acc"] for e in epochs)
    with safe_open(str(run / "checkpoint.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert keys and all("lora_" in k or ".adapter." in k or k.startswith("head") for k in keys)


def test_checkpoint_rebuilds_the_trained_model(vtab_task, tmp_path):
    config = _config(vtab_task, weights=None)
    config.weights = str(tmp_path / "backbone.safetensors")  # a local backbone, as a user would have
    from safetensors.torch import save_file
    import timm

    torch.manual_seed(3)
    save_file(timm.create_model("test_vit").state_dict(), config.weights)
    summary = fit(config, tmp_path / "run")
    model, _, num_classes = load_run_model(tmp_path / "run")
    assert num_classes == 3
    result = evaluate_checkpoint(tmp_path / "run")
    assert result["acc"] == pytest.approx(summary["acc"])
    tieta.merge_lora(model)  # the deployable, plain timm model
    assert not any("lora" in k for k in model.state_dict())


def test_training_is_reproducible(vtab_task, tmp_path):
    first = fit(_config(vtab_task), tmp_path / "a")
    second = fit(_config(vtab_task), tmp_path / "b")
    losses = lambda run: [json.loads(l)["loss"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert losses("a") == losses("b")
    assert first["acc"] == second["acc"]


def test_learns_an_easy_task(vtab_task, tmp_path):
    summary = fit(_config(vtab_task, **{"optim.epochs": 8, "optim.lr": 1e-2}), tmp_path / "run")
    assert summary["best_acc"] > 60  # colour classes; chance is 33%


def test_existing_run_folder_is_refused_and_kept(vtab_task, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(TietaError, match="already exists"):
        fit(_config(vtab_task), run)
    assert (run / "notes.txt").read_text() == "mine"
    fit(_config(vtab_task, **{"optim.epochs": 1}), run, overwrite=True)
    assert (run / "notes.txt").read_text() == "mine"  # only tieta's own files are replaced


def test_bf16_autocast_runs(vtab_task, tmp_path, monkeypatch):
    from tieta.train import fit as fit_module

    dtypes = []  # (training?, the dtype the first attention's qkv computed in) for each forward pass
    build = fit_module.build_model

    def watched(*args, **kwargs):
        model = build(*args, **kwargs)
        model.blocks[0].attn.qkv.register_forward_hook(lambda m, a, out: dtypes.append((m.training, out.dtype)))
        return model

    monkeypatch.setattr(fit_module, "build_model", watched)
    summary = fit(_config(vtab_task, bf16=True, **{"optim.epochs": 1}), tmp_path / "run")
    assert 0 <= summary["acc"] <= 100
    assert {dtype for training, dtype in dtypes if training} == {torch.bfloat16}  # every training step
    assert torch.bfloat16 in {dtype for training, dtype in dtypes if not training}  # evaluation too


def test_pyra_lora_run_records_schedule_and_tokens(vtab_task, tmp_path):
    config = _config(vtab_task, method="pyra+lora", **{"merge.schedule": [2, 1], "optim.epochs": 1})
    summary = fit(config, tmp_path / "run")
    assert summary["schedule"] == [2, 1, 0, 0, 0, 0]  # test_vit has 6 blocks
    assert summary["token_counts"] == [5, 3, 2, 2, 2, 2, 2]  # 2 x 2 patches + class token at 32 px
    with safe_open(str(tmp_path / "run" / "checkpoint.safetensors"), "pt") as handle:
        assert any(".pyra." in key for key in handle.keys())
    assert evaluate_checkpoint(tmp_path / "run")["acc"] == pytest.approx(summary["acc"])


def test_dyt_run_trains_with_its_loss_and_reports_rates(vtab_task, tmp_path):
    config = _config(vtab_task, method="dyt", **{"optim.epochs": 2, "dyt.adapter_dim": 2, "dyt.tau_end": 0.1,
                                                  "img_size": 64})
    summary = fit(config, tmp_path / "run")
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["tau"] for e in epochs] == pytest.approx([5.0, 0.1])
    assert len(summary["activation_rates"]) == 6 and 0 <= summary["activation_rate"] <= 1
    with safe_open(str(tmp_path / "run" / "checkpoint.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert any(".dispatcher." in k for k in keys) and any(".adapter." in k for k in keys)
    assert evaluate_checkpoint(tmp_path / "run")["acc"] == pytest.approx(summary["acc"])


def test_dyt_with_tome(vtab_task, tmp_path):
    summary = fit(_config(vtab_task, method="tome+dyt", img_size=64,
                          **{"merge.schedule": [3, 2], "optim.epochs": 1}), tmp_path / "run")
    assert summary["token_counts"][:3] == [17, 14, 12] and "activation_rate" in summary
