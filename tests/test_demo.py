"""The built-in default job, shrunk so that it runs in seconds (the real one takes minutes)."""

import pytest

from tieta import demo


@pytest.mark.download
def test_demo_runs_end_to_end_on_the_offline_assets(home, tmp_path, monkeypatch):
    monkeypatch.setitem(demo.DEMO_SETTINGS, "img_size", 28)  # 2 x 2 patches of 14 px
    monkeypatch.setitem(demo.DEMO_SETTINGS, "eval_batch_size", 256)
    lines = []
    report = demo.run_demo(tmp_path / "demo", epochs=1, rounds=1, log=lines.append)
    assert lines[0].startswith("tieta demo: fine-tunes lora, tome+lora, pyra+lora, dyt")  # said before it starts
    summaries = report["summaries"]
    assert [s["method"] for s in summaries] == [method for _, method in demo.DEMO_RUNS]
    for summary in summaries:
        assert summary["num_classes"] == 4 and summary["img_size"] == 28
        assert 0 < summary["trainable_percent"] < 1
        assert summary["speedup"] > 0
    assert summaries[0]["speedup"] == 1.0
    assert (tmp_path / "demo" / "elpv" / "lora" / "seed0" / "checkpoint.safetensors").is_file()
    for name in ("report.md", "report.csv", "accuracy_vs_throughput.png", "accuracy_vs_gflops.png"):
        assert (tmp_path / "demo" / name).is_file()
    assert report["reading"].startswith("Most accurate: ")
    assert report["rows"][-1].run == "majority class"
