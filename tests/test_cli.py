"""The command line: every subcommand's happy path, and bad input as one sentence with exit 2."""

import json
import subprocess
import sys

import pytest

from tieta.cli import main

TINY = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--lora-rank", "2"]


def _run(*args):
    """Run the CLI in a subprocess, as a user would (to see tracebacks, if any)."""
    return subprocess.run([sys.executable, "-m", "tieta.cli", *args], capture_output=True, text=True)


def test_train_then_eval(vtab_task, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(vtab_task), "--output", str(run), "--epochs", "2",
                 "--warmup-epochs", "1", "--batch-size", "4", "--set", "optim.lr=3e-3"]) == 0
    out = capsys.readouterr().out
    assert "acc %" in out and "lora" in out
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert result["acc"] == pytest.approx(summary["acc"])


def test_flops(capsys):
    assert main(["flops", "--model", "vit_base_patch16_224", "--method", "lora", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "17.6" in out and "16.4" in out and "0.351%" in out


def test_config_file_and_help(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("model: test_vit\nweights: random\nimg_size: 32\nmethod: tome+lora\n")
    assert main(["flops", "--config", str(tmp_path / "c.yaml")]) == 0
    assert "test_vit + tome+lora at 32 px, per image:" in capsys.readouterr().out  # the file's settings counted
    own_flags = {"train": ("--method", "--resume", "--output"), "eval": ("--best", "--json", "--split"),
                 "flops": ("--num-classes", "--method"), "demo": ("--epochs", "--output")}
    for command, flags in own_flags.items():
        result = _run(command, "--help")
        assert result.returncode == 0 and result.stdout.startswith(f"usage: tieta {command}")
        assert all(flag in result.stdout for flag in flags), command


@pytest.mark.parametrize("args,message", [
    (["train", *TINY, "--data", "/no/such/task", "--output", "{tmp}/r"], "does not exist"),
    (["train", "--model", "no_such_vit", "--weights", "random", "--data", "{task}", "--output", "{tmp}/r"], "no model named"),
    (["train", *TINY[:2], "--weights", "{tmp}/w.safetensors", "--data", "{task}", "--output", "{tmp}/r"], "does not exist"),
    (["train", *TINY, "--data", "{task}", "--output", "{tmp}/r", "--method", "lora+nope"], "unknown method"),
    (["train", *TINY, "--data", "{task}", "--output", "{tmp}/r", "--set", "optim.nope=1"], "unknown config key"),
    (["eval", "{tmp}/missing"], "does not exist"),
    (["flops", "--model", "resnet18", "--weights", "random"], "VisionTransformer"),
])
def test_bad_input_is_one_sentence_and_exit_2(vtab_task, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, task=vtab_task) for a in args]
    result = _run(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr and result.stderr.startswith("tieta: error: ")


def test_malformed_task_and_wrong_weights(vtab_task, tmp_path):
    (vtab_task / "test.txt").write_text("images/test/000000.jpg\n")
    result = _run("train", *TINY, "--data", str(vtab_task), "--output", str(tmp_path / "r"))
    assert result.returncode == 2 and "test.txt:1" in result.stderr and "Traceback" not in result.stderr
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("test_vit2").state_dict(), str(tmp_path / "w.safetensors"))
    result = _run("flops", "--model", "test_vit", "--weights", str(tmp_path / "w.safetensors"))
    assert result.returncode == 0  # flops never loads weights
    result = _run("train", "--model", "test_vit", "--weights", str(tmp_path / "w.safetensors"),
                  "--data", str(tmp_path / "absent"), "--output", str(tmp_path / "r"))
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_existing_run_folder_is_refused(vtab_task, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("x")
    result = _run("train", *TINY, "--data", str(vtab_task), "--output", str(tmp_path / "r"))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (tmp_path / "r" / "keep.txt").read_text() == "x"


def test_bench_prints_and_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "test_vit", "--img-size", "64", "--batch-size", "2", "--rounds", "1",
                 "--schedules", "low", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "efficiency" in text and "pyra low" in text and "ceiling" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["timm", "tome r=0", "tome low", "pyra low"]
    assert rows[0]["speedup"] == 1.0 and rows[2]["flops_ratio"] < 1


def test_show_merges_writes_a_png_and_keeps_existing_files(vtab_task, tmp_path):
    png = tmp_path / "m.png"
    args = ["show-merges", "--model", "test_vit", "--weights", "random", "--img-size", "64", "--schedule", "[3, 2]",
            "--data", str(vtab_task), "--count", "2", "--output", str(png)]
    assert main(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = _run(*args)
    assert result.returncode == 2 and "already exists" in result.stderr


def test_train_with_merging_flags(vtab_task, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--img-size", "64", "--data", str(vtab_task), "--output", str(run),
                 "--epochs", "1", "--batch-size", "4", "--method", "pyra+lora", "--schedule", "[3, 2]",
                 "--pyra-lr", "paper"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["schedule"][:2] == [3, 2] and summary["token_counts"][:3] == [17, 14, 12]


def test_schedule_too_large_is_refused(vtab_task, tmp_path):
    result = _run("flops", "--model", "test_vit", "--img-size", "64", "--method", "tome", "--schedule", "9")
    assert result.returncode == 2 and "at most 8" in result.stderr and "Traceback" not in result.stderr


def test_dyt_train_then_show_tokens(vtab_task, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--img-size", "64", "--data", str(vtab_task), "--output", str(run),
                 "--epochs", "1", "--batch-size", "4", "--method", "dyt", "--rho", "0.4",
                 "--dyt-variant", "layer", "--experts", "2"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "dyt" and len(summary["activation_rates"]) == 6
    pictures = tmp_path / "pictures"
    assert main(["show-tokens", str(run), "--count", "2", "--output", str(pictures)]) == 0
    for name in ("activation_rates.png", "active_tokens.png"):
        assert (pictures / name).read_bytes()[:4] == b"\x89PNG"
    result = _run("show-tokens", str(run), "--output", str(pictures))
    assert result.returncode == 2 and "already exists" in result.stderr
