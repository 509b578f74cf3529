"""tieta export -> tieta.load: the trained model's logits, for every method; and what a broken
export is told."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tieta
from tieta.cli import main
from tieta.methods import registry
from tieta.deploy.export import INFO_FILE, WEIGHTS_FILE, export_run, load_export
from tieta.train.checkpoint import CHECKSUM_KEY, read_tensors, write_tensors
from tieta.train.config import load_config
from tieta.train.fit import fit, load_run_model

TINY = {"model": "test_vit", "weights": "random", "img_size": 64, "optim.epochs": 1, "optim.warmup_epochs": 0,
        "optim.batch_size": 4, "eval_batch_size": 8, "lora.rank": 2, "adapter.dim": 2}
METHODS = {
    "lora": {},
    "lora+adapter": {},
    "tome+lora": {"merge.schedule": 2},
    "pyra+lora": {"merge.schedule": 2},
    "dyt": {},
    "dyt+tome": {"merge.schedule": 2},
    "evit+lora": {},
    "dynamicvit+lora": {},
    "diffrate+lora": {"diffrate.kept_prune": [17, 14, 12, 10, 8, 7], "diffrate.kept_merge": [17, 13, 11, 9, 7, 6]},
    "diffrate+adapter": {"diffrate.target_gmacs": 0.01, "diffrate.search_epochs": 1, "optim.epochs": 2},  # searched
}

# every other registered method, by its registry entry, with LoRA (as the token reducers train):
# name -> config settings where its defaults do nothing on test_vit at 64 px (17 tokens)
TINY_SETTINGS = {"fpet": {"fpet.layers": [1]}, "tofu": {"merge.schedule": 2}, "pitome": {"pitome.ratio": 0.5},
                 "mctf": {"mctf.r": 2}, "dtem": {"dtem.r": 2}}
COVERED_BY_HAND = {"lora", "adapter", "tome", "pyra", "dyt", "evit", "dynamicvit", "diffrate"}
EXCLUDED: dict[str, str] = {}  # name -> why it is not among these cases
assert set(TINY_SETTINGS) | COVERED_BY_HAND | set(EXCLUDED) <= set(registry.names())
for _name in registry.names():
    if _name not in COVERED_BY_HAND and _name not in EXCLUDED:
        METHODS[f"{_name}+lora"] = TINY_SETTINGS.get(_name, {})


def _trained(task: Path, folder: Path, method: str) -> Path:
    config = load_config(overrides={**TINY, "data.path": str(task), "method": method, **METHODS[method]})
    fit(config, folder)
    return folder


@pytest.mark.parametrize("method", list(METHODS))
def test_export_then_load_gives_the_trained_models_logits(vtab_task, tmp_path, method):
    run = _trained(vtab_task, tmp_path / "run", method)
    written = export_run(run, tmp_path / "export")
    assert written["export_bytes"] > written["checkpoint_bytes"] > 0
    loaded = tieta.load(tmp_path / "export")
    trained, _, _ = load_run_model(run)
    trained.eval()
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = trained(images), loaded(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not any("lora" in key for key in loaded.state_dict())  # folded into the backbone


def test_an_export_needs_no_run_folder_task_or_hub(vtab_task, tmp_path, monkeypatch):
    run = _trained(vtab_task, tmp_path / "run", "pyra+lora")
    export_run(run, tmp_path / "export")
    expected = tieta.load(tmp_path / "export")(torch.ones(1, 3, 64, 64))
    for folder in (run, vtab_task):  # both gone
        for path in sorted(folder.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    monkeypatch.setattr("timm.models.load_checkpoint", lambda *a, **k: pytest.fail("reached for weights"))
    model, info = load_export(tmp_path / "export")
    assert info.method == "pyra+lora" and info.img_size == 64
    torch.testing.assert_close(model(torch.ones(1, 3, 64, 64)), expected)


def test_export_command_reports_the_three_sizes(vtab_task, tmp_path, capsys):
    run = _trained(vtab_task, tmp_path / "run", "lora")
    assert main(["export", str(run), "--output", str(tmp_path / "export")]) == 0
    out = capsys.readouterr().out

    def shown(size: int) -> str:  # as the command rounds a size
        return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"

    backbone = tieta.load(tmp_path / "export")  # LoRA folded: the backbone's own tensors
    assert f"the run's checkpoint {shown((run / 'checkpoint.safetensors').stat().st_size)} " in out
    assert f"the export {shown((tmp_path / 'export' / WEIGHTS_FILE).stat().st_size)} " in out
    assert f"the backbone alone {shown(sum(t.numel() * t.element_size() for t in backbone.state_dict().values()))}" in out
    assert main(["export", str(run), "--output", str(tmp_path / "export")]) == 2  # never over an export
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(run), "--output", str(tmp_path / "export"), "--overwrite"]) == 0


@pytest.fixture
def exported(vtab_task, tmp_path) -> Path:
    export_run(_trained(vtab_task, tmp_path / "run", "tome+lora"), tmp_path / "export")
    return tmp_path / "export"


def _rewrite(folder: Path, change) -> None:
    tensors, metadata = read_tensors(folder / WEIGHTS_FILE)
    change(tensors)
    # with a fresh checksum, so that what is refused is the tensors themselves
    write_tensors(tensors, folder / WEIGHTS_FILE, {k: v for k, v in metadata.items() if k != CHECKSUM_KEY})


def _refused(capsys, folder: Path) -> str:
    assert main(["predict", str(folder), str(folder)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("tieta: error:") and "\n" not in error and "Traceback" not in error
    return error


def test_missing_keys_are_named(exported, capsys):
    _rewrite(exported, lambda t: t.pop("blocks.1.attn.qkv.weight"))
    assert "lacks blocks.1.attn.qkv.weight" in _refused(capsys, exported)


def test_extra_keys_are_named(exported, capsys):
    _rewrite(exported, lambda t: t.update({"blocks.0.attn.lora_A": torch.zeros(2, 2)}))
    assert "has blocks.0.attn.lora_A, which the model lacks" in _refused(capsys, exported)


def test_wrong_shapes_are_named(exported, capsys):
    _rewrite(exported, lambda t: t.update({"head.weight": torch.zeros(7, t["head.weight"].shape[1])}))
    assert "head.weight of shape (7," in _refused(capsys, exported)


def test_another_architecture_is_refused(vtab_task, tmp_path, capsys):
    exported = export_run(_trained(vtab_task, tmp_path / "run", "lora"), tmp_path / "export")["output"]
    info = json.loads((exported / INFO_FILE).read_text())
    info["config"]["model"] = info["model"] = "test_vit3"  # 9 blocks of width 96, not 6 of 64
    (exported / INFO_FILE).write_text(json.dumps(info))
    error = _refused(capsys, exported)
    assert "does not fit the model it describes: it lacks reg_token" in error
    assert "pos_embed of shape (1, 17, 64) where the model's is (1, 17, 96)" in error


def test_an_export_from_a_newer_tieta_is_refused(exported, capsys):
    info = json.loads((exported / INFO_FILE).read_text())
    (exported / INFO_FILE).write_text(json.dumps({**info, "format": 99, "tieta_version": "9.0"}))
    assert "upgrade tieta" in _refused(capsys, exported)


def test_a_tampered_export_is_refused(exported, capsys):
    data = bytearray((exported / WEIGHTS_FILE).read_bytes())
    data[-7] ^= 0x10
    (exported / WEIGHTS_FILE).write_bytes(bytes(data))
    assert "checksum" in _refused(capsys, exported)


def test_unreadable_export_info_is_refused(exported, capsys):
    (exported / INFO_FILE).write_text("{not json")
    assert "unreadable" in _refused(capsys, exported)
    (exported / INFO_FILE).write_text(json.dumps({"format": 1}))
    assert "lacks what tieta needs" in _refused(capsys, exported)


@pytest.mark.parametrize("method", ["pyra+lora", "dyt", "diffrate+adapter"])
def test_export_with_onnx_writes_a_checked_file(vtab_task, tmp_path, capsys, method):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run = _trained(vtab_task, tmp_path / "run", method)
    assert main(["export", str(run), "--output", str(tmp_path / "export"), "--onnx", "--onnx-batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "export" / "model.onnx").is_file() and "batch 2" in out
    assert len({path.stat().st_mode & 0o777 for path in (tmp_path / "export").iterdir()}) == 1  # one mode for all
    difference = float(out.split("onnxruntime ")[-1].split()[0])
    assert difference < 1e-4
