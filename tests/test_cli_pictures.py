"""What the pictures draw follows what the methods declare: ``show-merges`` paints the merges of
the methods that merge tokens, ``show-tokens`` the token decisions of the methods that have them;
any other method is refused in one sentence that names what can be drawn (never replaced)."""

import re

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
    listed = set(re.split(r", | and ", message.rpartition("those of ")[2]))
    assert {"dyt", "evit", "dynamicvit", "spvit", "diffrate", "tofu"} <= listed
    assert not (tmp_path / "pictures" / "activation_rates.png").exists()


@pytest.mark.parametrize("name", [method.name for method in registry.METHODS.values() if method.shows_merges])
def test_every_method_that_declares_merges_draws_them(tmp_path, capsys, name):
    task = write_vtab_task(tmp_path / "task")
    tiny_64 = [*TINY[:4], "--img-size", "64", "--lora-rank", "2"]  # 64 patches: room for every method to merge
    assert main(["show-merges", *tiny_64, "--method", f"{name}+lora", "--data", str(task), "--count", "2",
                 "--output", str(tmp_path)]) == 0
    assert (tmp_path / "merges.png").read_bytes()[:4] == b"\x89PNG"


def test_show_tokens_draws_the_patches_a_trained_evit_run_keeps(tmp_path, capsys, monkeypatch):
    task, run, pictures = write_vtab_task(tmp_path / "task"), tmp_path / "run", tmp_path / "pictures"
    tiny_64 = [*TINY[:4], "--img-size", "64", "--lora-rank", "2"]  # 16 patches
    assert main(["train", *tiny_64, "--method", "evit+lora", "--set", "evit.keep_rate=0.5", "--data", str(task),
                 "--output", str(run), "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4"]) == 0
    capsys.readouterr()
    drawn = _watch_panels(monkeypatch)
    assert main(["show-tokens", str(run), "--count", "2", "--output", str(pictures)]) == 0
    assert "tokens are merged" not in capsys.readouterr().out
    for name in ("activation_rates.png", "active_tokens.png"):
        with Image.open(pictures / name) as picture:
            picture.load()  # a whole, readable PNG
            assert picture.format == "PNG" and min(picture.size) > 100
    # one panel per location (16 -> 8 -> 5 or 4 -> 3 or 2 patches kept), the method's note in the caption
    assert drawn["layers"] == [0, 1, 2] and drawn["words"] == ("location", "kept")
    assert [int(mask.sum(dim=1).max()) for mask in drawn["masks"]][0] == 8
    assert "keep rate 0.5; grey: fused or dropped" in drawn["caption"]


def test_show_tokens_draws_four_of_tofus_six_locations(tmp_path, capsys, monkeypatch):
    task, run, pictures = write_vtab_task(tmp_path / "task"), tmp_path / "run", tmp_path / "pictures"
    tiny_64 = [*TINY[:4], "--img-size", "64", "--lora-rank", "2"]
    assert main(["train", *tiny_64, "--method", "tofu+lora", "--schedule", "[2, 2, 2, 2, 2, 2]", "--data", str(task),
                 "--output", str(run), "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4"]) == 0
    drawn = _watch_panels(monkeypatch)
    assert main(["show-tokens", str(run), "--count", "1", "--output", str(pictures)]) == 0
    assert [int(mask.sum()) for mask in drawn["masks"]] == [14, 12, 10, 8, 6, 4]
    assert drawn["layers"] == [0, 2, 3, 5]  # at most four panels, evenly spaced
    assert drawn["rates"] == [kept / 16 for kept in (14, 12, 10, 8, 6, 4)]  # the chart: every location's share
    assert "pruned (early blocks) or fused away (later blocks)" in drawn["caption"]


def _watch_panels(monkeypatch) -> dict:
    """What show-tokens hands the active-token picture (masks, panels, caption, words), still drawn."""
    from tieta.report import visualize

    drawn, draw, chart = {}, visualize.save_active_tokens, visualize.save_rate_chart

    def watched(images, masks, grid, path, layers, caption="", *words):
        drawn.update(masks=masks, layers=list(layers), caption=caption, words=words)
        return draw(images, masks, grid, path, layers, caption, *words)

    def watched_chart(rates, path, caption="", *words):
        drawn.update(rates=list(rates))
        return chart(rates, path, caption, *words)

    monkeypatch.setattr(visualize, "save_active_tokens", watched)
    monkeypatch.setattr(visualize, "save_rate_chart", watched_chart)
    return drawn
