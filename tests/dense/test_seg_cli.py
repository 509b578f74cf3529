"""A segmentation task through the CLI, as an image task goes: ``tieta train`` detects it (or is told
``data.kind: segmentation``), trains with the pixel loss, evaluates by mIoU, mAcc and aAcc, and
``tieta eval``, ``report``, ``export`` + ``tieta.load`` and ``predict IMAGE --output DIR`` work on
the runs; bad input is one sentence."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tieta
from tieta.cli import main
from tieta.dense.model import SegmentationModel
from tests.conftest import VTAB_MINI, fail_in_epoch, refused, train_side_by_side

SOURCE = VTAB_MINI / "dtd10"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CLASSES = 4  # background, disc, square, triangle (make_segmentation_task's, the outline ignored)
# a tiny random ViT at 64 px: the training crops and the sliding window are the model's input
TINY = ["--model", "test_vit", "--weights", "random", "--img-size", "64", "--lora-rank", "2", "--adapter-dim", "2",
        "--epochs", "1", "--batch-size", "2", "--set", "segmentation.channels=16",
        "--set", "segmentation.aux_channels=8", "--set", "segmentation_data.crop_size=64",
        "--set", "segmentation_data.scale=[128, 64]"]
METHODS = {"dyt": [], "tome+lora": ["--schedule", "1"], "evit+lora": []}


@pytest.fixture(scope="module")
def seg_task(tmp_path_factory) -> Path:
    """6 training and 3 test pictures of 80 x 64 px (ADE20K's layout), from dtd10's photographs."""
    from tieta.dense.testdata import make_segmentation_task

    if not SOURCE.is_dir():
        pytest.skip(f"vtab-mini data not found at {SOURCE}")
    return make_segmentation_task(tmp_path_factory.mktemp("seg") / "task", SOURCE, width=80, height=64)


@pytest.fixture(scope="module")
def runs(seg_task, tmp_path_factory) -> dict[str, Path]:
    """One finished run per method family, side by side in one folder (a sweep's layout)."""
    return train_side_by_side(seg_task, tmp_path_factory.mktemp("sweep"), TINY, METHODS)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_segmentation_task_trains_evaluates_exports_and_predicts(method, runs, seg_task, tmp_path, capsys):
    run = runs[method]
    config = (run / "config.yaml").read_text()
    assert "kind: segmentation" in config and "head: upernet" in config  # detected, and recorded resolved
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"] == "mIoU" and summary["num_classes"] == CLASSES and summary["gmacs"] > 0
    assert summary["acc"] == summary["mIoU"] == summary["best_acc"]  # the headline is the mIoU
    assert all(0 <= summary[key] <= 100 for key in ("mIoU", "mAcc", "aAcc"))
    assert "top5" not in summary and summary["majority_acc"] is None
    (epoch,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epoch["mIoU"] == summary["mIoU"] and {"mAcc", "aAcc", "loss"} <= set(epoch)
    if method != "dyt":  # a path that does not depend on the pixels: the GMACs of any one 64 px window
        from tieta.train.run_model import load_run_model

        trained = load_run_model(run)[0]
        assert isinstance(trained, SegmentationModel)
        assert summary["gmacs"] == pytest.approx(tieta.count_flops(trained.eval(), torch.zeros(1, 3, 64, 64))["gmacs"])
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mIoU"] == pytest.approx(summary["mIoU"]) and result["images"] == 3
    assert result["aAcc"] == pytest.approx(summary["aAcc"])
    assert main(["eval", str(run)]) == 0
    assert "mIoU %" in capsys.readouterr().out

    assert main(["export", str(run), "--output", str(tmp_path / "export")]) == 0
    model = tieta.load(tmp_path / "export")
    assert isinstance(model, SegmentationModel) and model.classes == CLASSES
    image = seg_task / "images" / "validation" / "val_0006.jpg"
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "export"), str(image), str(seg_task / "images" / "training"),
                 "--output", str(tmp_path / "masks")]) == 0
    out, err = capsys.readouterr()
    assert "val_0006_mask.png" in out and "segmented 7 images" in err
    assert any(name in out for name in ("background", "disc", "square", "triangle"))  # classes.txt's names
    with Image.open(tmp_path / "masks" / "val_0006_mask.png") as mask, Image.open(image) as picture:
        assert mask.mode == "P" and mask.size == picture.size == (80, 64)
        assert np.array(mask).max() < CLASSES  # class indices
    with Image.open(tmp_path / "masks" / "val_0006_overlay.png") as overlay:
        assert overlay.mode == "RGB" and overlay.size == (80, 64)


def test_predict_writes_what_the_run_evaluates_and_never_a_user_s_file(runs, seg_task, tmp_path, capsys):
    from tieta.dense.dataset import mask_labels
    from tieta.dense.metrics import SegmentationMeter

    run, folder = runs["tome+lora"], seg_task / "images" / "validation"
    output = tmp_path / "masks"
    assert main(["predict", str(run), str(folder), "--output", str(output)]) == 0
    meter = SegmentationMeter(CLASSES)  # the written masks score what tieta eval scores
    for image in sorted(folder.iterdir()):
        with Image.open(output / f"{image.stem}_mask.png") as mask:
            predicted = np.array(mask)
        truth = mask_labels(seg_task / "annotations" / "validation" / f"{image.stem}.png", True)
        meter.update(torch.from_numpy(predicted.astype(np.int64)), torch.from_numpy(truth.astype(np.int64)))
    summary = json.loads((run / "summary.json").read_text())
    assert 100 * meter.scores()["mIoU"] == pytest.approx(summary["mIoU"])
    written = (output / "val_0006_mask.png").read_bytes()
    assert main(["predict", str(run), str(folder), "--output", str(output)]) == 0  # its own files: replaced
    assert (output / "val_0006_mask.png").read_bytes() == written
    (output / "val_0007_overlay.png").write_bytes(b"mine")
    capsys.readouterr()
    line = refused(capsys, "predict", str(run), str(folder), "--output", str(output))
    assert "val_0007_overlay.png exists and was not written by tieta" in line
    assert (output / "val_0007_overlay.png").read_bytes() == b"mine"
    assert main(["predict", str(run), str(folder), "--output", str(output), "--overwrite"]) == 0
    capsys.readouterr()
    assert "give --output DIR" in refused(capsys, "predict", str(run), str(folder))
    (tmp_path / "file").write_text("x")
    assert "already exists" in refused(capsys, "predict", str(run), str(folder), "--output", str(tmp_path / "file"))
    assert "is a file; a segmentation model writes a mask and an overlay per image into a folder" in refused(
        capsys, "predict", str(run), str(folder), "--output", str(tmp_path / "file"), "--overwrite")
    assert (tmp_path / "file").read_text() == "x"


def test_a_sweep_of_segmentation_runs_is_reported_by_miou(runs, tmp_path, capsys, monkeypatch):
    from tieta.report import sweep_report

    folder = next(iter(runs.values())).parent
    labels, real = [], sweep_report.save_tradeoff
    monkeypatch.setattr(sweep_report, "save_tradeoff", lambda rows, xs, path, x_label, y_label, *rest: (
        labels.append(y_label), real(rows, xs, path, x_label, y_label, *rest))[1])
    assert main(["report", str(folder), "--output", str(tmp_path / "report"), "--rounds", "1",
                 "--batch-size", "2"]) == 0  # timed on a window of each of 2 test images
    table = (tmp_path / "report" / "report.md").read_text()
    assert "batch 2 of its evaluation images" in table
    assert all(method in table for method in METHODS)
    assert "mIoU (final)" in table and "mAcc % (final)" in table and "top-5" not in table.split("## Reading")[0]
    assert "Highest mIoU" in capsys.readouterr().out
    assert labels == ["mIoU on task (%)"] * 2  # both plots' y axis (the task: its folder, task/)


def test_images_of_one_name_get_their_own_masks(runs, seg_task, tmp_path, capsys):
    image = seg_task / "images" / "validation" / "val_0006.jpg"
    (tmp_path / "other").mkdir()
    shutil.copy(image, tmp_path / "other" / image.name)
    assert main(["predict", str(runs["evit+lora"]), str(image), str(tmp_path / "other"),
                 "--output", str(tmp_path / "masks")]) == 0
    assert sorted(path.name for path in (tmp_path / "masks").glob("*.png")) == [
        "val_0006-2_mask.png", "val_0006-2_overlay.png", "val_0006_mask.png", "val_0006_overlay.png"]

    # an image already named like a numbered one keeps its name; the repeat takes the next free number
    from tieta.deploy.predict_masks import output_names
    named = output_names([Path("a/x.png"), Path("b/x.png"), Path("a/x-2.png")], tmp_path)
    assert [mask.name for mask, _ in named] == ["x_mask.png", "x-3_mask.png", "x-2_mask.png"]


def test_an_output_folder_inside_the_input_folder_is_not_segmented_again(runs, seg_task, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(seg_task / "images" / "validation" / "val_0006.jpg", photos / "val_0006.jpg")
    for _ in range(2):
        assert main(["predict", str(runs["evit+lora"]), str(photos), "--output", str(photos / "masks")]) == 0
    assert sorted(path.name for path in (photos / "masks").iterdir() if path.suffix == ".png") == [
        "val_0006_mask.png", "val_0006_overlay.png"]


def test_a_segmentation_run_trains_in_one_process(seg_task, tmp_path, capsys, monkeypatch):
    from tieta.train import fit as fit_module
    from tieta.train.distributed import Processes

    monkeypatch.setattr(fit_module.distributed, "join", lambda device: (Processes(rank=0, world=2), "cpu"))
    monkeypatch.setattr(fit_module.distributed, "leave", lambda processes: None)
    monkeypatch.setattr(fit_module.distributed, "agree", lambda ok, processes: ok)
    assert "a segmentation run trains in one process" in refused(
        capsys, "train", *TINY, "--data", str(seg_task), "--output", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_segmentation_run_resumes_after_an_interruption(seg_task, tmp_path, quick_throughput):
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        fail_in_epoch(patch, 2)  # Ctrl-C in the second epoch
        assert main(["train", *TINY, "--method", "dyt", "--epochs", "2", "--data", str(seg_task),
                     "--output", str(run)]) == 130
    assert main(["train", "--resume", str(run)]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and all("mIoU" in line for line in lines)


def test_a_list_task_trains_with_whole_image_evaluation_and_the_poly_schedule(seg_task, tmp_path, quick_throughput):
    from tieta.dense.testdata import make_segmentation_task

    lists = make_segmentation_task(tmp_path / "lists", SOURCE, width=80, height=64, layout="lists",
                                   classes_file=False)  # train.txt and val.txt; the classes from the masks
    run = tmp_path / "run"
    assert main(["train", *TINY, "--method", "evit+lora", "--data", str(lists), "--output", str(run),
                 "--set", "segmentation.eval_mode=whole", "--set", "optim.schedule=poly",
                 "--set", "data.kind=segmentation", "--log", "csv"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["mIoU"] <= 100
    header, row = (run / "summary.csv").read_text().splitlines()
    assert float(row.split(",")[header.split(",").index("eval_top1")]) == pytest.approx(summary["mIoU"])


def test_bad_segmentation_input_is_one_sentence(seg_task, tmp_path, capsys):
    broken = shutil.copytree(seg_task, tmp_path / "broken")
    mask = broken / "annotations" / "training" / "train_0001.png"
    Image.new("L", (40, 64), 1).save(mask)
    line = refused(capsys, "train", *TINY, "--method", "dyt", "--data", str(broken), "--output", str(tmp_path / "a"))
    assert "train_0001.png is 40 x 64 pixels but its image" in line and "train_0001.jpg is 80 x 64" in line
    image_task = SOURCE
    line = refused(capsys, "train", *TINY, "--method", "dyt", "--data", str(image_task), "--set",
                   "data.kind=segmentation", "--output", str(tmp_path / "b"))
    assert line == (f"tieta: error: data.kind is segmentation but {image_task} holds no label masks (a segmentation "
                    "task has images/training/ beside annotations/training/, or train.txt of '<image> <mask>' lines); "
                    "set data.kind: image, or leave it out")
    assert f"data.kind is image but {seg_task} is a segmentation task" in refused(
        capsys, "train", *TINY, "--data", str(seg_task), "--set", "data.kind=image", "--output", str(tmp_path / "c"))
    assert "segmentation.head builds a segmentation model, but" in refused(
        capsys, "train", *TINY, "--data", str(image_task), "--set", "segmentation.head=upernet",
        "--output", str(tmp_path / "d"))
    assert "segmentation_data.crop_size is 48 but the model takes 64 px images" in refused(
        capsys, "train", *TINY, "--data", str(seg_task), "--set", "segmentation_data.crop_size=48",
        "--output", str(tmp_path / "e"))
    assert "segmentation.eval_crop is 48 but the model takes 64 px images" in refused(
        capsys, "train", *TINY, "--method", "lora", "--data", str(seg_task), "--set", "segmentation.eval_crop=48",
        "--output", str(tmp_path / "f"))
    assert "dynamicvit trains with its own loss, which has no form for segmentation" in refused(
        capsys, "train", *TINY, "--method", "dynamicvit+lora", "--data", str(seg_task), "--output", str(tmp_path / "g"))
    assert "optim.label_smoothing smooths an image's label" in refused(
        capsys, "train", *TINY, "--smoothing", "0.1", "--data", str(seg_task), "--output", str(tmp_path / "h"))
    assert "segmentation.eval_stride (64) is longer than segmentation.eval_crop (32)" in refused(
        capsys, "train", *TINY, "--data", str(seg_task), "--set", "segmentation.eval_crop=32",
        "--set", "segmentation.eval_stride=64", "--output", str(tmp_path / "i"))
    assert "optim.schedule must be one of cosine, poly" in refused(
        capsys, "train", *TINY, "--data", str(seg_task), "--set", "optim.schedule=step", "--output", str(tmp_path / "j"))
    assert "segmentation.ignore_index (0) and segmentation_data.ignore_index (255) differ" in refused(
        capsys, "train", *TINY, "--data", str(seg_task), "--set", "segmentation.ignore_index=0",
        "--output", str(tmp_path / "k"))
    assert "data.augment timm is for images" in refused(
        capsys, "train", *TINY, "--data", str(seg_task), "--set", "data.augment=timm", "--output", str(tmp_path / "l"))
    assert "data.holdout holds images out of a source without a test split" in refused(
        capsys, "train", *TINY, "--data", str(seg_task), "--set", "data.holdout=0.2", "--output", str(tmp_path / "m"))
    assert [name for name in "abcdefghijklm" if (tmp_path / name).exists()] == []


def test_the_ade20k_sweep_file_holds_dyt_s_recipe():
    from tieta.sweep.plan import read_plan
    from tieta.sweep.runner import cell_config

    plan = read_plan(CONFIGS / "dyt_ade20k.yaml")
    assert [str(task.path) for task in plan.tasks] == ["/path/to/segmentation-tasks/ade20k"]
    assert plan.tasks[0].classes == 150
    configs = {cell.run.name: cell_config(plan, cell) for cell in plan.cells()}  # every run's settings valid
    assert {name: config.method for name, config in configs.items()} == {
        "adaptformer": "adapter", "dyt": "dyt", "tome-adapter": "tome+adapter"}
    for config in configs.values():
        optim, data = config.optim, config.segmentation_data
        assert (config.img_size, config.data.kind, config.segmentation.head, config.dyt.rho) == (
            512, "segmentation", "upernet", 0.5)
        assert (optim.lr, optim.weight_decay, optim.schedule, optim.min_lr, optim.batch_size) == (
            1e-3, 0.05, "poly", 0.0, 16)
        # 160k iterations and 1,500 warm-up ones of 16 images, over ADE20K's 20,210 training images
        steps = -(-20_210 // optim.batch_size)
        assert abs(optim.epochs * steps - 160_000) < steps and abs(optim.warmup_epochs * steps - 1_500) < steps
        assert config.segmentation.window(512) == (512, 341) and config.segmentation.eval_mode == "slide"
        assert (data.crop_size, list(data.scale), data.reduce_zero_label) == (512, [2048, 512], True)


def test_the_ade20k_sweep_file_trains_a_segmentation_task_under_its_root(seg_task, tmp_path, quick_throughput,
                                                                          capsys):
    root = tmp_path / "segmentation-tasks"
    root.mkdir()
    (root / "ade20k").symlink_to(seg_task)
    tiny = ["model=test_vit", "weights=random", "img_size=64", "segmentation.channels=16",
            "segmentation.aux_channels=8", "segmentation.eval_crop=64", "segmentation.eval_stride=42",
            "segmentation_data.crop_size=64", "segmentation_data.scale=[128, 64]", "optim.epochs=1",
            "optim.warmup_epochs=0", "optim.batch_size=2", "adapter.dim=2", "dyt.adapter_dim=2"]
    sweep_file = tmp_path / "dyt_ade20k.yaml"  # the shipped file, for a task of 4 classes
    sweep_file.write_text((CONFIGS / "dyt_ade20k.yaml").read_text().replace("classes: 150", f"classes: {CLASSES}"))
    argv = ["sweep", str(sweep_file), "--root", str(root), "--runs", "dyt", "--output", str(tmp_path / "sweep")]
    for setting in tiny:
        argv += ["--set", setting]
    assert main(argv) == 0
    summaries = list((tmp_path / "sweep").rglob("summary.json"))
    assert len(summaries) == 1 and json.loads(summaries[0].read_text())["metric"] == "mIoU"
    written = summaries[0].stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0  # run again: the finished run is this cell's
    assert "0 runs to train, 1 finished before" in capsys.readouterr().out and summaries[0].stat().st_mtime_ns == written


def test_flops_compares_a_segmentation_model_with_its_heads_on_the_plain_backbone(capsys):
    assert main(["flops", "--model", "test_vit", "--weights", "random", "--img-size", "64", "--method", "tome",
                 "--schedule", "2", "--set", "segmentation.head=upernet", "--set", "segmentation.channels=16"]) == 0
    out = capsys.readouterr().out
    assert "timm + UPerNet (no method)" in out
    line = [line for line in out.splitlines() if "test_vit + tome" in line][-1]  # its row, after the title
    assert float(line.split()[-1]) < 1.0  # the merge's saving, against the same heads


@pytest.mark.parametrize("method", ["dyt", "evit+lora"])
def test_show_tokens_draws_a_segmentation_run_s_decisions_on_its_test_images(method, runs, tmp_path):
    assert main(["show-tokens", str(runs[method]), "--output", str(tmp_path / "tokens"), "--count", "2"]) == 0
    for name in ("activation_rates.png", "active_tokens.png"):
        with Image.open(tmp_path / "tokens" / name) as picture:
            picture.verify()
            assert picture.format == "PNG"
