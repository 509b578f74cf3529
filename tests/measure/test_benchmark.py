import pytest
import torch

import tieta
from tieta.measure import benchmark
from tieta.measure.benchmark import shape_ceiling
from tests.conftest import make_vit


def test_benchmark_rows_side_by_side():
    models = {"plain": make_vit("plain"), "tome": tieta.add_tome(make_vit("plain"), r=[4, 2, 1])}
    rows = tieta.benchmark(models, batch_size=2, rounds=2, image_size=32)
    assert [r["name"] for r in rows] == ["plain", "tome"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["efficiency"] == 1.0
    assert rows[1]["flops_ratio"] < 1 and rows[1]["images_per_s"] > 0
    assert rows[1]["efficiency"] == rows[1]["speedup"] * rows[1]["flops_ratio"]


def test_training_benchmark_steps_the_trainable_parameters():
    model = tieta.freeze_backbone(tieta.add_lora(make_vit("plain"), rank=2))
    before = model.blocks[0].attn.qkv.lora_B.detach().clone()
    tieta.benchmark({"lora": model}, batch_size=2, rounds=1, image_size=32, train=True)
    assert not torch.equal(before, model.blocks[0].attn.qkv.lora_B)


def test_training_benchmark_steps_each_model_with_its_own_loss():
    calls = []

    def counted(model, images, labels):  # a method's own objective
        calls.append(len(images))
        return torch.nn.functional.cross_entropy(model(images), labels)

    models = {"lora": tieta.freeze_backbone(tieta.add_lora(make_vit("plain"), rank=2)),
              "tome+lora": tieta.freeze_backbone(tieta.add_lora(tieta.add_tome(make_vit("plain"), r=2), rank=2))}
    tieta.benchmark(models, batch_size=2, rounds=1, image_size=32, train=True, losses={"tome+lora": counted})
    assert calls and set(calls) == {2}


def test_shape_ceiling_is_the_full_over_the_merged_time_of_a_forward_pass(monkeypatch):
    """The ceiling times the blocks at the schedule's token counts against the full count (what
    each timed step runs is checked here, the timing is given), patch embedding and head added to both."""
    model = make_vit("plain")
    attended = {}  # step name -> tokens entering each block's attention when the step runs

    def given_rates(steps, device, rounds, progress=None):
        for name, step in steps.items():
            counts = []
            hooks = [block.attn.register_forward_hook(lambda m, args, out: counts.append(args[0].shape[1]))
                     for block in model.blocks]
            step()
            for hook in hooks:
                hook.remove()
            attended[name] = counts
        # calls per second in two rounds: the whole model, the blocks at the full and at the merged counts
        return {"model": [10.0, 8.0], "full": [12.0, 9.0], "merged": [24.0, 20.0]}

    monkeypatch.setattr(benchmark, "interleaved_rates", given_rates)
    ceiling = shape_ceiling(model, [4, 2, 1], batch_size=2, rounds=2)
    assert attended == {"model": [17, 17, 17], "full": [17, 17, 17], "merged": [17, 13, 11]}  # 16 patches + class
    ratios = []
    for whole, full, merged in ((10.0, 12.0, 24.0), (8.0, 9.0, 20.0)):
        rest = 1 / whole - 1 / full  # patch embedding and head
        ratios.append((rest + 1 / full) / (rest + 1 / merged))
    assert ceiling == pytest.approx(sum(ratios) / 2) and ceiling > 1  # the median of two rounds


def test_shape_ceiling_runs_on_an_eva_block():  # gamma_1 / gamma_2 LayerScale, no ls1 / ls2
    model = make_vit("eva02")
    assert shape_ceiling(model, [4] * len(model.blocks), batch_size=2, rounds=1) > 0


def test_merge_variants_keep_the_token_counts_and_pair_with_tome():
    from tieta.measure.bench_suite import TensorMerge, _paired_ratios, free_merge

    x = torch.randn(1, 3, 32, 32)
    tome = tieta.add_tome(make_vit("plain"), r=[4, 2, 1])
    free = free_merge(tieta.add_tome(make_vit("plain"), r=[4, 2, 1]))
    with torch.no_grad():
        features = free.forward_features(x)
        torch.testing.assert_close(TensorMerge(tome)(x), tome(x), rtol=1e-5, atol=1e-5)
    assert features.shape[1] == 17 - 4 - 2 - 1
    rows = [{"name": "tome low", "round_rates": [2.0, 3.0, 4.0]},
            {"name": "pyra low", "round_rates": [1.0, 3.0, 2.0]},
            {"name": "tome low, free merge", "round_rates": [4.0, 3.0, 4.0]}]
    _paired_ratios(rows)
    assert rows[1]["vs_tome"] == 0.5 and rows[0]["vs_free_merge"] == 1.0 and "vs_free_merge" not in rows[2]


def test_rows_keep_their_per_round_speedups_and_their_range(monkeypatch):
    from tieta.measure import benchmark as module

    rates = {"plain": [10.0, 10.0, 20.0], "tome": [15.0, 20.0, 24.0]}  # calls/s per round, fixed
    monkeypatch.setattr(module, "interleaved_rates", lambda steps, device, rounds, progress=None: rates)
    models = {"plain": make_vit("plain"), "tome": tieta.add_tome(make_vit("plain"), r=[4, 2, 1])}
    rows = tieta.benchmark(models, batch_size=2, rounds=3, image_size=32)
    assert rows[1]["round_speedups"] == [1.5, 2.0, 1.2]
    assert rows[1]["speedup"] == 1.5 and rows[1]["speedup_spread"] == (1.2, 2.0)
    assert rows[1]["images_per_s"] == 40.0 and rows[0]["round_speedups"] == [1.0, 1.0, 1.0]


def test_interleaved_rounds_report_their_progress():
    from tieta.measure.benchmark import interleaved_rates

    heard = []
    rates = interleaved_rates({"a": lambda: None, "b": lambda: None}, torch.device("cpu"), rounds=3,
                              min_round_seconds=1e-4, progress=lambda *told: heard.append(told))
    assert [len(values) for values in rates.values()] == [3, 3]
    assert [(done, total) for done, total, _ in heard] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert all(left >= 0 for _, _, left in heard) and heard[-1][2] == 0
