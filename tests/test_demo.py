"""The built-in default job, shrunk so that it runs in seconds (the real one takes minutes)."""

import pytest

from tieta import demo


@pytest.mark.download
def test_demo_runs_end_to_end_on_the_offline_assets(home, tmp_path, monkeypatch):
    monkeypatch.setitem(demo.DEMO_SETTINGS, "img_size", 28)  # 2 x 2 patches of 14 px
    monkeypatch.setitem(demo.DEMO_SETTINGS, "merge.schedule", 0)  # 5 tokens: nothing to merge at this size
    monkeypatch.setitem(demo.DEMO_SETTINGS, "eval_batch_size", 256)
    monkeypatch.setitem(demo.DEMO_SETTINGS, "data.train_split", "val200")  # 200 images: the path, not the accuracy
    lines = []
    report = demo.run_demo(tmp_path / "demo", epochs=1, rounds=1, log=lines.append)
    assert lines[0].startswith("tieta demo: fine-tunes lora, tome+lora, pyra+lora, dyt")  # said before it starts
    assert lines[1].startswith("  what it trades for time: 28 px instead of 224")
    summaries = report["summaries"]
    assert [s["method"] for s in summaries] == [method for _, method in demo.DEMO_RUNS]
    for summary in summaries:
        assert summary["num_classes"] == 4 and summary["img_size"] == 28
        assert 0 < summary["trainable_percent"] < 1
        assert summary["speedup"] > 0
    assert summaries[0]["speedup"] == 1.0
    assert (tmp_path / "demo" / "elpv" / "lora" / "seed0" / "checkpoint.safetensors").is_file()
    for name in ("report.md", "report.csv", "accuracy_vs_throughput.png", "accuracy_vs_gmacs.png"):
        assert (tmp_path / "demo" / name).is_file()
    assert report["reading"].startswith("Most accurate: ")
    assert report["rows"][-1].run == "majority class"


def test_the_demo_merges_where_there_is_something_left_to_merge():
    """At the demo's size and schedule ToMe and PYRA still hold a few dozen tokens at the last
    block, at a real saving: the comparison is made where merging means something."""
    import timm
    import torch

    import tieta
    from conftest import tokens_entering
    from tieta.measure.flops import count_flops

    size = demo.DEMO_SETTINGS["img_size"]
    plain = timm.create_model(demo.DEMO_SETTINGS["model"], pretrained=False, num_classes=4, img_size=size).eval()
    merged = timm.create_model(demo.DEMO_SETTINGS["model"], pretrained=False, num_classes=4, img_size=size).eval()
    tieta.add_tome(merged, r=demo.DEMO_SETTINGS["merge.schedule"])
    images = torch.randn(1, 3, size, size)
    assert tokens_entering(merged, images)[-1] >= 24
    assert count_flops(merged, images)["gmacs"] / count_flops(plain, images)["gmacs"] <= 0.8
