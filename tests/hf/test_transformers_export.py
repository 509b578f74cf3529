"""tieta export --format transformers: transformers loads the folder as its own model class and
computes the LoRA-trained model's logits; what it cannot run is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tieta
from tests.conftest import refused
from tests.hf.hf_models import save_hf_model, transformers
from tieta.cli import main
from tieta.deploy.export import export_transformers_run
from tieta.train.config import load_config
from tieta.train.fit import fit, load_run_model

TINY = {"optim.epochs": 1, "optim.warmup_epochs": 0, "optim.batch_size": 4, "eval_batch_size": 8, "lora.rank": 2,
        "adapter.dim": 2, "optim.lr": 0.01}


def _trained(task: Path, folder: Path, method: str = "lora", **settings) -> Path:
    fit(load_config(overrides={**TINY, "data.path": str(task), "method": method, **settings}), folder)
    return folder


def _transformers_logits(folder: Path, images: torch.Tensor) -> torch.Tensor:
    note = json.loads((folder / "tieta_transformers.json").read_text())
    model = getattr(transformers, note["transformers_class"]).from_pretrained(folder).eval()
    with torch.no_grad():
        found = model(pixel_values=images)
    if (folder / "tieta_head.safetensors").is_file():  # CLIP, SigLIP: the head beside the image model
        head = load_file(folder / "tieta_head.safetensors")
        return found.pooler_output @ head["weight"].T + head["bias"]
    return found.logits


@pytest.mark.parametrize("kind, transformers_class", [
    ("vit", "ViTForImageClassification"),
    ("dinov2", "Dinov2ForImageClassification"),
    ("dinov2_registers", "Dinov2WithRegistersForImageClassification"),
    ("clip", "CLIPVisionModel"),
    ("siglip_vision", "SiglipVisionModel"),
])
def test_a_lora_run_exported_to_transformers_gives_its_logits(vtab_task, tmp_path, kind, transformers_class):
    save_hf_model(kind, tmp_path / "checkpoint")
    run = _trained(vtab_task, tmp_path / "run", weights=str(tmp_path / "checkpoint"))
    written = export_transformers_run(run, tmp_path / "export")
    assert written["transformers_class"] == transformers_class and written["max_difference"] < 1e-5
    trained, config, _ = load_run_model(run)  # LoRA still unfolded here
    assert all(value.abs().sum() > 0 for name, value in trained.state_dict().items() if name.endswith("lora_B"))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained.eval()(images)
    torch.testing.assert_close(_transformers_logits(tmp_path / "export", images), expected, rtol=1e-4, atol=1e-5)
    processor = json.loads((tmp_path / "export" / "preprocessor_config.json").read_text())
    trained_with = config.resolved["normalization"]  # data.normalization: model, the checkpoint's processor's
    assert processor["image_mean"] == trained_with["mean"] and processor["image_std"] == trained_with["std"]
    assert processor["size"] == {"height": 32, "width": 32}


def test_a_timm_vit_exports_as_transformers_vit(vtab_task, tmp_path):
    run = _trained(vtab_task, tmp_path / "run", model="test_vit", weights="random", img_size=32)
    export_transformers_run(run, tmp_path / "export")
    trained, _, _ = load_run_model(run)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = trained.eval()(images)
    torch.testing.assert_close(_transformers_logits(tmp_path / "export", images), expected, rtol=1e-4, atol=1e-5)
    # and the export is a transformers checkpoint again: a backbone for the next run
    backbone = tieta.load_backbone(weights=tmp_path / "export", num_classes=3).eval()
    with torch.no_grad():
        features = trained.forward_features(images)
    torch.testing.assert_close(backbone.forward_features(images), features, rtol=1e-4, atol=1e-5)


def test_the_command_exports_and_refuses_what_transformers_cannot_run(vtab_task, tmp_path, capsys, monkeypatch):
    save_hf_model("vit", tmp_path / "checkpoint")
    run = _trained(vtab_task, tmp_path / "run", method="lora+adapter", weights=str(tmp_path / "checkpoint"))
    capsys.readouterr()
    message = refused(capsys, "export", str(run), "--output", str(tmp_path / "export"), "--format", "transformers")
    assert "LoRA-only" in message and "adapter" in message
    assert not (tmp_path / "export").exists()
    message = refused(capsys, "export", str(run), "--output", str(tmp_path / "export"), "--format", "transformers",
                      "--onnx")
    assert "--onnx" in message
    run = _trained(vtab_task, tmp_path / "lora", weights=str(tmp_path / "checkpoint"))
    assert main(["export", str(run), "--output", str(tmp_path / "export"), "--format", "transformers"]) == 0
    out = capsys.readouterr().out
    assert "ViTForImageClassification" in out and "largest logit difference" in out
    assert refused(capsys, "export", str(run), "--output", str(tmp_path / "export"), "--format",
                   "transformers").endswith("pass --overwrite")
    assert main(["export", str(run), "--output", str(tmp_path / "export"), "--format", "transformers",
                 "--overwrite"]) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed
    assert "pip install 'tieta[transformers]'" in refused(capsys, "export", str(run), "--output",
                                                         str(tmp_path / "other"), "--format", "transformers")
