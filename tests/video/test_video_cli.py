"""A folder of clips through the CLI, as an image task goes: ``tieta train`` detects it (or is told
``data.kind: video``), evaluates each clip by its views' mean logits, and ``tieta eval``, ``report``,
``export`` + ``tieta.load``, ``predict CLIP.mp4`` and ``show-tokens --clip`` work on the runs."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import tieta
from tieta.cli import main
from tieta.video.model import VideoModel
from tests.conftest import fail_in_epoch, refused, train_side_by_side
from tests.video.clipdata import SOURCE

pytest.importorskip("av")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# a tiny random ViT on 48 px frames; 2 of each clip's 4 frames, 2 temporal views at evaluation
TINY = ["--model", "test_vit", "--weights", "random", "--img-size", "48", "--lora-rank", "2", "--adapter-dim", "2",
        "--epochs", "1", "--batch-size", "2", "--set", "video_data.frames=2", "--set", "video_data.sampling_rate=2",
        "--set", "video_data.temporal_views=2", "--set", "eval_batch_size=2"]
METHODS = {"dyt": [], "tome+lora": ["--schedule", "1"], "evit+lora": []}


@pytest.fixture(scope="module")
def clip_task(tmp_path_factory) -> Path:
    """2 classes x 2 training and 2 test clips of 4 frames, 48 x 48, from dtd10's images."""
    from tieta.video.testdata import make_clip_task

    if not SOURCE.is_dir():
        pytest.skip(f"vtab-mini data not found at {SOURCE}")
    return make_clip_task(tmp_path_factory.mktemp("video") / "task", SOURCE, classes=2, clips_per_class=2,
                          frames=4, size=48)


@pytest.fixture(scope="module")
def runs(clip_task, tmp_path_factory) -> dict[str, Path]:
    """One finished run per method family, side by side in one folder (a sweep's layout)."""
    return train_side_by_side(clip_task, tmp_path_factory.mktemp("sweep"), TINY, METHODS)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_clip_task_trains_evaluates_exports_and_predicts(method, runs, clip_task, tmp_path, capsys):
    run = runs[method]
    config = (run / "config.yaml").read_text()
    assert "kind: video" in config  # detected, and recorded resolved
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_classes"] == 2 and summary["gmacs"] > 0 and 0 <= summary["acc"] <= 100
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    if method != "dyt":  # a path that does not depend on the pixels: the GMACs of any one clip of 2 frames
        from tieta.train.run_model import load_run_model
        from tieta.video.model import example_clips

        trained = load_run_model(run)[0]
        assert summary["gmacs"] == pytest.approx(tieta.count_flops(trained, example_clips(trained))["gmacs"])
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["acc"] == pytest.approx(summary["acc"]) and result["images"] == 4  # the test clips, views averaged
    assert result["input_kind"] == "clip"
    assert main(["eval", str(run)]) == 0
    assert "test split, 4 clips" in capsys.readouterr().out

    assert main(["export", str(run), "--output", str(tmp_path / "export")]) == 0
    model = tieta.load(tmp_path / "export")
    assert isinstance(model, VideoModel) and model.frames == 2
    clip = clip_task / "test" / "class_1" / "test_000.mp4"
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "export"), str(clip), str(clip_task / "test" / "class_0"),
                 "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    assert "test_000.mp4" in out and "class_1" in out and "class_0" in out  # the task's class names
    assert "classified 3 clips" in err
    assert main(["predict", str(run), str(clip), "--output", str(tmp_path / "p.csv")]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(str(clip))


def test_a_sweep_of_video_runs_is_reported(runs, tmp_path, capsys):
    folder = next(iter(runs.values())).parent
    assert main(["report", str(folder), "--output", str(tmp_path / "report"), "--rounds", "2",
                 "--batch-size", "2"]) == 0
    table = (tmp_path / "report" / "report.md").read_text()
    assert all(method in table for method in METHODS)
    # a clip is the unit of cost and of speed: the columns, notes and reading say so
    assert "| clips/s |" in table and "per clip / 1e9" in table and "evaluation clips" in table
    assert "img/s" not in table and "per image" not in table


def test_show_tokens_draws_a_video_run_s_rates_and_frames(runs, clip_task, tmp_path, capsys):
    clip = clip_task / "test" / "class_0" / "test_001.mp4"
    for output, named in ((tmp_path / "named", ["--clip", str(clip)]), (tmp_path / "first", [])):
        assert main(["show-tokens", str(runs["dyt"]), "--output", str(output), *named]) == 0
        for name in ("activation_rates.png", "active_tokens.png"):
            with Image.open(output / name) as picture:
                picture.verify()
                assert picture.format == "PNG" and min(picture.size) > 100
    assert "already exists" in refused(capsys, "show-tokens", str(runs["dyt"]), "--output", str(tmp_path / "named"))


def test_a_video_run_resumes_after_an_interruption(clip_task, tmp_path, quick_throughput):
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        fail_in_epoch(patch, 2)  # Ctrl-C in the second epoch
        assert main(["train", *TINY, "--method", "dyt", "--epochs", "2", "--data", str(clip_task),
                     "--output", str(run)]) == 130
    assert main(["train", "--resume", str(run)]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_corrupt_clip_is_one_sentence(clip_task, tmp_path, capsys):
    broken = shutil.copytree(clip_task, tmp_path / "broken")
    (broken / "train" / "class_1" / "train_001.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    line = refused(capsys, "train", *TINY, "--method", "dyt", "--data", str(broken), "--output", str(tmp_path / "r"))
    assert "train_001.mp4" in line


def test_data_kind_must_match_the_folder(clip_task, tmp_path, capsys):
    image_task = SOURCE
    line = refused(capsys, "train", *TINY, "--method", "dyt", "--data", str(image_task), "--set", "data.kind=video",
                   "--output", str(tmp_path / "a"))
    assert line == (f"tieta: error: data.kind is video but {image_task} holds no clips (a video task has train.txt "
                    "naming clips, or train/<class>/ folders of them); set data.kind: image, or leave it out")
    line = refused(capsys, "train", *TINY, "--method", "dyt", "--data", str(clip_task), "--set", "data.kind=image",
                   "--output", str(tmp_path / "b"))
    assert f"data.kind is image but {clip_task} is a folder of clips" in line
    assert "video.frames (3) and video_data.frames (2) differ" in refused(
        capsys, "train", *TINY, "--method", "dyt", "--data", str(clip_task), "--set", "video.frames=3",
        "--output", str(tmp_path / "c"))
    assert "data.kind must be one of image, video" in refused(
        capsys, "train", *TINY, "--data", str(clip_task), "--set", "data.kind=audio", "--output", str(tmp_path / "d"))
    assert "video_data.frames must be between 1 and 256" in refused(
        capsys, "train", *TINY, "--data", str(clip_task), "--set", "video_data.frames=0",
        "--output", str(tmp_path / "e"))
    assert not any((tmp_path / name).exists() for name in "abcde")


@pytest.mark.parametrize("name, style, views, epochs",
                         [("dyt_k400.yaml", "k400", 3, 12), ("dyt_ssv2.yaml", "ssv2", 3, 50)])
def test_the_video_sweep_files_hold_the_reference_recipe(name, style, views, epochs):
    from tieta.sweep.plan import read_plan
    from tieta.sweep.runner import cell_config

    plan = read_plan(CONFIGS / name)
    # the placeholder root a user replaces with --root
    folder = "kinetics400" if style == "k400" else "ssv2"
    assert [str(task.path) for task in plan.tasks] == [f"/path/to/video-tasks/{folder}"]
    configs = {cell.run.name: cell_config(plan, cell) for cell in plan.cells()}  # every run's settings valid
    assert set(configs) == {"adaptformer", "dyt", "dyt-tome"}
    for config in configs.values():
        data = config.video_data
        assert (data.style, data.frames, data.views, config.video.frames) == (style, 8, views, 8)
        assert data.sampling_rate == (16 if style == "k400" else 0)
        assert (config.optim.epochs, config.optim.warmup_epochs, config.optim.lr, config.optim.weight_decay,
                config.optim.batch_size, config.drop_path, config.dyt.rho, config.data.kind) == (
                    epochs, 2, 1e-3, 0.01, 16, 0.0, 0.5, "video")


def test_evaluation_scores_a_clip_by_its_views_mean_logits():
    import torch
    from torch import nn

    from tieta.train.loop import evaluate

    class ByBrightness(nn.Module):
        """Logits (bright - 1, 1 - bright) of a clip's mean pixel: dark views say class 1."""

        def forward(self, clips):
            bright = clips.mean(dim=(1, 2, 3, 4))
            return torch.stack([3 * (bright - 1), 1 - bright], dim=-1)

    # one clip, two views: a bright one (class 0 by 8) and a dark one (class 1 by 4): their mean says 0
    views = torch.stack([torch.full((2, 3, 4, 4), 3.0), torch.zeros(2, 3, 4, 4)])[None]  # (1, V, T, 3, S, S)
    loader = [(views, torch.tensor([0]))]
    result = evaluate(ByBrightness(), loader, nn.Identity(), torch.device("cpu"))
    assert result["acc"] == 100.0
    assert result["eval_loss"] == pytest.approx(float(nn.functional.cross_entropy(torch.tensor([[1.5, -0.5]]),
                                                                                   torch.tensor([0]))))


def test_the_k400_sweep_file_trains_a_clip_task_under_its_root(clip_task, tmp_path, quick_throughput, capsys):
    root = tmp_path / "video-tasks"
    root.mkdir()
    (root / "kinetics400").symlink_to(clip_task)
    tiny = ["model=test_vit", "weights=random", "img_size=48", "video.frames=2", "video_data.frames=2",
            "video_data.sampling_rate=2", "video_data.temporal_views=1", "optim.epochs=1", "optim.warmup_epochs=0",
            "optim.batch_size=2", "eval_batch_size=2", "adapter.dim=2", "dyt.adapter_dim=2"]
    sweep_file = tmp_path / "dyt_k400.yaml"  # the shipped file, for a task of 2 classes
    sweep_file.write_text((CONFIGS / "dyt_k400.yaml").read_text().replace("classes: 400", "classes: 2"))
    argv = ["sweep", str(sweep_file), "--root", str(root), "--runs", "dyt", "--output", str(tmp_path / "sweep")]
    for setting in tiny:
        argv += ["--set", setting]
    assert main(argv) == 0
    summaries = list((tmp_path / "sweep").rglob("summary.json"))
    assert len(summaries) == 1 and json.loads(summaries[0].read_text())["method"] == "dyt"
    written = summaries[0].stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0  # run again: the finished run (its data.kind and frames resolved) is this cell's
    assert "0 runs to train, 1 finished before" in capsys.readouterr().out and summaries[0].stat().st_mtime_ns == written


def test_an_ssv2_style_run_trains_on_segments_and_spatial_views(clip_task, tmp_path, quick_throughput):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--method", "dyt", "--data", str(clip_task), "--output", str(run),
                 "--set", "video_data.style=ssv2", "--set", "video_data.sampling_rate=0",
                 "--set", "video_data.temporal_views=1", "--set", "video_data.spatial_views=3"]) == 0
    config = (run / "config.yaml").read_text()
    assert "style: ssv2" in config and "spatial_views: 3" in config
    assert json.loads((run / "summary.json").read_text())["num_classes"] == 2


def test_flops_counts_a_clip_of_a_video_config(capsys):
    """``tieta flops`` on a video model's settings: the cost of one clip of its frames, the plain
    model being the same video model without the method."""
    import torch

    from tieta.train.config import load_config
    from tieta.train.model import build_model, build_plain_model

    flags = ["--model", "test_vit", "--img-size", "64", "--method", "tome", "--schedule", "1",
             "--set", "video.frames=3"]
    assert main(["flops", *flags, "--num-classes", "5"]) == 0
    out = capsys.readouterr().out
    assert "per clip of 3 frames" in out
    config = load_config(None, {"model": "test_vit", "img_size": 64, "method": "tome", "merge.schedule": 1,
                                "video.frames": 3})
    clip = torch.randn(1, 3, 3, 64, 64)
    merged = tieta.count_flops(build_model(config, 5, random_weights=True), clip)["gmacs"]
    plain = tieta.count_flops(build_plain_model(config, 5, random_weights=True), clip)["gmacs"]
    assert isinstance(build_plain_model(config, 5, random_weights=True), VideoModel)
    assert f"{merged / plain:.3f}" in out and merged < plain


@pytest.mark.parametrize("suite", ["merging", "dyt"])
def test_bench_times_clips_of_the_frames_asked(suite, capsys):
    """``tieta bench --frames T``: each suite's models on every frame of a clip, pooled; a clip's
    GMACs are T frames' and the pooling's."""
    from tieta.measure.bench_suite import run_suite

    rows = run_suite("test_vit", 32, 2, "fp32", ["low"], 1, False, frames=3, suite=suite)
    names = [row["name"] for row in rows]
    assert names == (["timm", "tome r=0", "tome low", "pyra low"] if suite == "merging"
                     else ["adapter", "dyt", "dyt+tome low", "adapter+tome low"])
    images = run_suite("test_vit", 32, 2, "fp32", ["low"], 1, False, suite=suite)
    assert rows[0]["gmacs"] > 3 * images[0]["gmacs"]  # three frames, and the pooling
    assert all("ceiling_speedup" not in row for row in rows)  # the ceiling is timed on images only
    assert main(["bench", "--model", "test_vit", "--img-size", "32", "--batch-size", "2", "--frames", "3",
                 "--suite", suite, "--rounds", "1"]) == 0
    assert "batch 2 clips of 3 frames" in capsys.readouterr().out


def test_bench_refuses_a_dyt_training_suite_and_too_many_frames(capsys):
    assert main(["bench", "--model", "test_vit", "--suite", "dyt", "--train", "--rounds", "1"]) == 2
    assert "the dyt suite times evaluation" in capsys.readouterr().err
    assert main(["bench", "--model", "test_vit", "--frames", "100000", "--rounds", "1"]) == 2
    assert "frames of a clip must be in 1 .. 256" in capsys.readouterr().err


def test_the_frame_strip_shows_the_layers_that_skip_the_most():
    from tieta.report.video_tokens import shown_layers
    late = [0.99, 1, 1, 1, 1, 1, 1, 0.93, 0.05, 0.15, 0.0, 0.99]  # the paper's K400 shape: late layers skip
    assert shown_layers(late) == [7, 8, 9, 10]
    assert shown_layers([1.0] * 12) == [0, 4, 7, 11]  # nothing skipped: evenly spread
    assert shown_layers([1.0, 0.5] + [1.0] * 10) == [0, 1, 4, 7]  # one skips: it, then the spread
    assert shown_layers([0.5, 0.2]) == [0, 1]  # fewer layers than rows
