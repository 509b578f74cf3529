"""What the pictures draw follows what the methods declare: ``show-merges`` paints the merges of
the methods that merge tokens, ``show-tokens`` the token decisions of the methods that have them;
any other method is refused in one sentence that names what can be drawn (never replaced)."""

import pytest
from PIL import Image

from conftest import refused, write_vtab_task
from tieta.cli import main
from tieta.methods import registry

TINY = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--lora-rank", "2"]


def test_the_methods_declare_what_can_be_drawn():
    merging = [method.name for method in registry.METHODS.values() if method.shows_merges]
    assert merging[:2] == ["tome", "pyra"] and not {"lora", "adapter", "evit", "dyt"} & set(merging)
    drawn = [method.name for method in registry.METHODS.values() if method.token_masks is not None]
    assert {"dyt", "evit", "dynamicvit", "spvit", "diffrate", "tofu"} <= set(drawn)
    assert not {"lora", "adapter", "tome", "atc"} & set(drawn)


def test_show_merges_refuses_methods_without_merges_instead_of_replacing_them(tmp_path, capsys):
    task = write_vtab_task(tmp_path / "task")
    message = refused(capsys, "show-merges", *TINY, "--method", "evit+lora", "--data", str(task),
                      "--output", str(tmp_path))
    merging = [method.name for method in registry.METHODS.values() if method.shows_merges]
    assert message == ("tieta: error: --method (evit+lora) merges no tokens to show; show-merges draws the merges "
                       f"of {', '.join(merging[:-1])} and {merging[-1]}")
    assert not (tmp_path / "merges.png").exists()


def test_show_merges_draws_the_merging_method_named_among_others(tmp_path, capsys):
    task = write_vtab_task(tmp_path / "task")
    assert main(["show-merges", *TINY, "--method", "lora+pyra", "--schedule", "[1, 1]", "--data", str(task),
                 "--count", "2", "--output", str(tmp_path)]) == 0
    assert (tmp_path / "merges.png").read_bytes()[:4] == b"\x89PNG"


def test_show_tokens_refuses_a_run_without_token_decisions(tmp_path, capsys):
    task, run = write_vtab_task(tmp_path / "task"), tmp_path / "run"
    assert main(["train", *TINY, "--method", "lora", "--data", str(task), "--output", str(run), "--epochs", "1",
                 "--warmup-epochs", "0", "--batch-size", "4"]) == 0
    capsys.readouterr()
    message = refused(capsys, "show-tokens", str(run), "--output", str(tmp_path / "pictures"))
    drawn = [method.name for method in registry.METHODS.values() if method.token_masks is not None]
    assert message == (f"tieta: error: the run {run} (lora) has no token decisions to show; show-tokens draws "
                       f"those of {', '.join(drawn[:-1])} and {drawn[-1]}")
    assert all(f" {name}," in message or message.endswith(f" {name}")
               for name in ("dyt", "evit", "dynamicvit", "spvit", "diffrate", "tofu"))
    assert not (tmp_path / "pictures" / "activation_rates.png").exists()


def test_show_tokens_draws_the_patches_a_trained_evit_run_keeps(tmp_path, capsys):
    task, run, pictures = write_vtab_task(tmp_path / "task"), tmp_path / "run", tmp_path / "pictures"
    assert main(["train", *TINY, "--method", "evit+lora", "--set", "evit.keep_rate=0.5", "--data", str(task),
                 "--output", str(run), "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4"]) == 0
    capsys.readouterr()
    assert main(["show-tokens", str(run), "--count", "2", "--output", str(pictures)]) == 0
    assert "tokens are merged" not in capsys.readouterr().out
    for name in ("activation_rates.png", "active_tokens.png"):
        with Image.open(pictures / name) as picture:
            picture.load()  # a whole, readable PNG
            assert picture.format == "PNG" and min(picture.size) > 100


@pytest.mark.parametrize("name", [method.name for method in registry.METHODS.values() if method.shows_merges])
def test_every_method_that_declares_merges_draws_them(tmp_path, capsys, name):
    task = write_vtab_task(tmp_path / "task")
    tiny_64 = [*TINY[:4], "--img-size", "64", "--lora-rank", "2"]  # 64 patches: room for every method to merge
    assert main(["show-merges", *tiny_64, "--method", f"{name}+lora", "--data", str(task), "--count", "2",
                 "--output", str(tmp_path)]) == 0
    assert (tmp_path / "merges.png").read_bytes()[:4] == b"\x89PNG"
