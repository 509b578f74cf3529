"""data.normalization: "model" (the backbone's own numbers) by default, names, explicit numbers; the
numbers a run used are recorded and reproduced by eval, export, tieta.load (with timm's own data
config) and predict; an older run without the setting is rebuilt with ImageNet's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image
from torch import nn

import tieta
from tieta import TietaError
from tieta.cli import main
from tieta.data import normalization
from tieta.data.transforms import Normalize, load_resized
from tieta.deploy.export import INFO_FILE, export_run
from tieta.deploy.predict import open_predictor
from tieta.train.checkpoint import CONFIG_KEY, read_tensors, write_tensors
from tieta.train.config import load_config
from tieta.train.fit import evaluate_checkpoint, fit, load_run_model, resume_run

TINY = {"model": "test_vit", "weights": "random", "img_size": 32, "optim.epochs": 1, "optim.warmup_epochs": 0,
        "optim.batch_size": 4, "eval_batch_size": 8, "lora.rank": 2}
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
OPENAI = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def _with_cfg(**cfg) -> nn.Module:
    """A stand-in backbone whose timm pretrained_cfg is ``cfg``."""
    model = nn.Identity()
    model.pretrained_cfg = cfg
    return model


def _numbers(resolved: dict) -> tuple:
    return resolved["mean"], resolved["std"], resolved["interpolation"]


def test_model_is_the_default_and_reads_the_backbones_pretrained_cfg():
    assert load_config().data.normalization == "model"
    clip = _with_cfg(architecture="eva02_base_patch14_224", tag="mim_in22k", mean=tuple(OPENAI[0]),
                     std=tuple(OPENAI[1]), interpolation="bicubic")
    resolved = normalization.resolve("model", clip)
    assert _numbers(resolved) == (*OPENAI, "bicubic")
    assert resolved["source"] == "timm's pretrained_cfg of eva02_base_patch14_224.mim_in22k"
    bilinear = _with_cfg(architecture="some_vit", mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")
    assert _numbers(normalization.resolve("model", bilinear)) == ([0.5] * 3, [0.5] * 3, "bilinear")


def test_a_backbone_built_with_random_weights_has_timms_default_cfg_of_its_name():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=1,
                              embed_dim=32, num_heads=2)
    resolved = normalization.resolve("model", model)
    assert _numbers(resolved) == ([0.5] * 3, [0.5] * 3, "bicubic")  # timm's published ViT-B/16: 0.5/0.5
    assert "vit_base_patch16_224.augreg2_in21k_ft_in1k" in resolved["source"]


@pytest.mark.parametrize("cfg", [None, {}, {"mean": (0.5, 0.5), "std": (0.5,) * 3}])
def test_a_backbone_without_usable_cfg_gets_imagenet_and_says_so(cfg):
    model = nn.Identity()
    if cfg is not None:
        model.pretrained_cfg = cfg
    resolved = normalization.resolve("model", model)
    assert _numbers(resolved) == (*IMAGENET, "bicubic") and resolved["source"].startswith("imagenet (")


@pytest.mark.parametrize("name, numbers", [("imagenet", IMAGENET), ("half", ([0.5] * 3, [0.5] * 3)),
                                           ("inception", ([0.5] * 3, [0.5] * 3)), ("clip", OPENAI),
                                           ("openai", OPENAI)])
def test_named_and_explicit_normalizations(name, numbers):
    assert _numbers(normalization.resolve(name)) == (*numbers, "bicubic")
    explicit = {"mean": numbers[0], "std": numbers[1]}
    config = load_config(overrides={"data.normalization": explicit})
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(Normalize(name)(images), Normalize(config.data.normalization)(images))


@pytest.mark.parametrize("value, message", [
    ("foo", "data.normalization must be one of imagenet, inception, half, clip, openai or model"),
    (3, "data.normalization must be one of"),
    ({"mean": [0.5, 0.5], "std": [0.5] * 3}, "data.normalization.mean must be three finite numbers"),
    ({"mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]}, "data.normalization.std must be positive"),
    ({"mean": [0.5] * 3, "std": [0.5, "a", 0.5]}, "data.normalization.std must be three finite numbers"),
    ({"mean": [10**400] * 3, "std": [0.5] * 3}, "data.normalization.mean must be three finite numbers"),
    ({"mean": [0.5] * 3}, "data.normalization as numbers is {mean: [r, g, b], std: [r, g, b]}"),
    ({"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "cubic"}, "data.normalization.interpolation must be"),
])
def test_bad_normalizations_are_one_sentence(value, message):
    with pytest.raises(TietaError) as refused:
        load_config(overrides={"data.normalization": value})
    assert message in str(refused.value) and "\n" not in str(refused.value)


def _image(tmp_path):
    """A non-square photo-like image (a straight resize and timm's resize-then-crop differ on it)."""
    path = tmp_path / "photo.png"
    pixels = torch.randint(0, 256, (45, 60, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(pixels.numpy()).save(path)
    return path


@pytest.mark.parametrize("setting", ["model", {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3],
                                               "interpolation": "bilinear"}], ids=["model", "explicit-bilinear"])
def test_run_export_load_and_timm_reproduce_the_training_transform(vtab_task, tmp_path, setting):
    run = tmp_path / "run"
    if setting == "model":  # the default
        fit(load_config(overrides={**TINY, "data.path": str(vtab_task)}), run)
    else:  # numbers given on the command line
        assert main(["train", "--data", str(vtab_task), "--output", str(run), "--model", "test_vit", "--weights",
                     "random", "--img-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4",
                     "--set", "data.normalization={mean: [0.4, 0.5, 0.6], std: [0.2, 0.25, 0.3], "
                     "interpolation: bilinear}"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["normalization"] == setting  # the setting as given ...
    used = saved["resolved"]["normalization"]  # ... and the numbers it stood for
    expected = (([0.5] * 3, [0.5] * 3, "bicubic") if setting == "model"  # test_vit's pretrained_cfg
                else (setting["mean"], setting["std"], "bilinear"))
    assert _numbers(used) == expected
    source = "timm's pretrained_cfg of test_vit.r160_in1k" if setting == "model" else "the numbers given"
    assert used["source"] == source
    export_run(run, tmp_path / "export")
    assert _numbers(json.loads((tmp_path / "export" / INFO_FILE).read_text())["normalization"]) == expected
    model = tieta.load(tmp_path / "export")
    data_config = timm.data.resolve_model_data_config(model)
    assert (list(data_config["mean"]), list(data_config["std"]), data_config["interpolation"]) == expected
    assert data_config["input_size"] == (3, 32, 32)
    # timm's own eval transform of the exported model gives what tieta trained on, pixel for pixel
    path = _image(tmp_path)
    theirs = timm.data.create_transform(**data_config)(Image.open(path).convert("RGB"))
    ours = Normalize(used)(load_resized(path, 32, used["interpolation"])[None])[0]
    assert torch.allclose(theirs, ours, atol=1e-5)
    # eval and predict (run folder and export) preprocess the same way
    assert _numbers(open_predictor(run).normalization) == expected
    assert _numbers(open_predictor(tmp_path / "export").normalization) == expected
    assert _numbers(load_run_model(run)[1].resolved["normalization"]) == expected


def _as_older_tieta(run):
    """Make ``run`` what an older tieta wrote: settings without data.normalization and no record."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"].pop("normalization", None), config.pop("resolved", None)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name in ("checkpoint.safetensors", "progress.safetensors"):
        if (run / name).is_file():
            tensors, metadata = read_tensors(run / name)
            for key in (CONFIG_KEY, "settings"):
                if key in metadata:
                    settings = json.loads(metadata[key])
                    settings["data"].pop("normalization", None), settings.pop("resolved", None)
                    metadata[key] = json.dumps(settings)
            write_tensors(tensors, run / name, metadata)


def test_an_older_run_without_the_setting_resumes_and_evaluates_with_imagenet(vtab_task, tmp_path, monkeypatch):
    from conftest import fail_in_epoch

    run = tmp_path / "run"
    fail_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit(load_config(overrides={**TINY, "optim.epochs": 2, "data.path": str(vtab_task),
                                   "data.normalization": "imagenet"}), run)
    monkeypatch.undo()
    _as_older_tieta(run)
    resume_run(run)  # would refuse a run whose settings now differ from those it started with
    trained = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    _as_older_tieta(run)
    model, config, _ = load_run_model(run)
    assert config.data.normalization == "imagenet"
    assert _numbers(config.resolved["normalization"]) == (*IMAGENET, "bicubic")
    assert evaluate_checkpoint(run)["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-6)


def test_the_papers_configs_the_vtab_mini_sweep_and_the_demo_name_their_normalization():
    from tieta.demo import DEMO_SETTINGS

    root = Path(__file__).resolve().parents[2]
    named = {path: yaml.safe_load((root / path).read_text())["base"]["data"]["normalization"]
             for path in ("configs/pyra_vtab.yaml", "configs/dyt_vtab.yaml", "benchmarks/vtab_mini.yaml")}
    assert named == {"configs/pyra_vtab.yaml": "imagenet", "configs/dyt_vtab.yaml": "inception",
                     "benchmarks/vtab_mini.yaml": "imagenet"}
    assert DEMO_SETTINGS["data.normalization"] == "imagenet"
