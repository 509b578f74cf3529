"""Sizes and numbers that pass their type but could not work are refused by name, with their limit,
before anything is allocated: in a run's settings (config.validate) and in tieta bench."""

from __future__ import annotations

import pytest

from tieta import TietaError
from conftest import refused
from tieta.measure import bench_suite
from tieta.methods.method import MAX_EXPERTS, MAX_WIDTH
from tieta.train.config import (MAX_BATCH_SIZE, MAX_CLIP_GRAD, MAX_EPOCHS, MAX_IMG_SIZE, MAX_LR, MAX_WEIGHT_DECAY,
                                MAX_WORKERS, load_config)

FLOPS = ["flops", "--model", "test_vit", "--weights", "random", "--img-size", "32"]


@pytest.mark.parametrize("overrides, message", [
    ({"img_size": 2**62}, f"img_size must be at most {MAX_IMG_SIZE} px"),
    ({"optim.batch_size": 10**9}, "optim.batch_size must be at most 65,536, got 1,000,000,000"),
    ({"eval_batch_size": MAX_BATCH_SIZE + 1}, "eval_batch_size must be at most 65,536"),
    ({"optim.epochs": 10**12}, "optim.epochs must be at most 10,000"),
    ({"optim.warmup_epochs": MAX_EPOCHS + 1}, "optim.warmup_epochs must be at most 10,000"),
    ({"optim.lr": 1e308}, "optim.lr must be at most 10, got 1e+308"),
    ({"optim.min_lr": 11.0}, "optim.min_lr must be at most 10"),
    ({"optim.lr_groups.head": 1e30}, "optim.lr_groups.head must be at most 10"),
    ({"method": "pyra+lora", "pyra.lr": 1e30}, "the pyra parameters' learning rate must be at most 10"),
    ({"optim.weight_decay": 1e12}, "optim.weight_decay must be at most 10"),
    ({"optim.lr": 1.0, "optim.weight_decay": 1.0}, "optim.lr x optim.weight_decay must be below 1"),
    ({"optim.lr_groups.head": 2.0, "optim.weight_decay": 0.5},
     "the head parameters' learning rate x optim.weight_decay must be below 1"),
    ({"optim.clip_grad": 1e300}, "optim.clip_grad must be at most 1e+06"),
    ({"data.num_workers": 10**6}, "data.num_workers must be at most 256"),
    ({"lora.rank": 10**9}, "lora.rank must be at most 4,096"),
    ({"adapter.dim": MAX_WIDTH + 1}, "adapter.dim must be at most 4,096"),
    ({"dyt.adapter_dim": 10**6}, "dyt.adapter_dim must be at most 4,096"),
    ({"dyt.experts": 10**9}, "dyt.experts must be at most 64"),
])
def test_a_size_or_number_past_its_limit_is_named_with_the_limit(overrides, message):
    with pytest.raises(TietaError, match=message.replace("+", r"\+")):
        load_config(overrides=overrides)


def test_every_limit_itself_is_accepted():
    config = load_config(overrides={
        "img_size": MAX_IMG_SIZE, "optim.batch_size": MAX_BATCH_SIZE, "eval_batch_size": MAX_BATCH_SIZE,
        "optim.epochs": MAX_EPOCHS, "optim.warmup_epochs": MAX_EPOCHS, "optim.lr": MAX_LR, "optim.min_lr": MAX_LR,
        "optim.weight_decay": 0.05, "optim.clip_grad": MAX_CLIP_GRAD, "data.num_workers": MAX_WORKERS,
        "lora.rank": MAX_WIDTH, "adapter.dim": MAX_WIDTH, "dyt.adapter_dim": MAX_WIDTH, "dyt.experts": MAX_EXPERTS})
    assert config.lora.rank == MAX_WIDTH and config.optim.lr == MAX_LR
    assert load_config(overrides={"optim.lr": 1e-6, "optim.weight_decay": MAX_WEIGHT_DECAY}).optim.weight_decay == 10


@pytest.mark.parametrize("args, message", [
    (["--img-size", str(2**62)], "img_size must be at most 4096 px"),
    (["--img-size", str(2**63)], "img_size"),
    (["--set", "optim.lr=1e308"], "optim.lr must be at most 10"),
    (["--lora-rank", str(10**9)], "lora.rank must be at most 4,096"),
])
def test_the_command_line_refuses_them_in_one_sentence(capsys, args, message):
    assert message in refused(capsys, *FLOPS, *args)


def test_train_refuses_a_huge_learning_rate_before_it_makes_the_run_folder(vtab_task, tmp_path, capsys):
    run = tmp_path / "run"
    message = refused(capsys, "train", *FLOPS[1:], "--data", str(vtab_task), "--output", str(run), "--lr", "1e308")
    assert "optim.lr must be at most 10" in message and not run.exists()


# --- tieta bench -------------------------------------------------------------------------------------

@pytest.fixture
def no_timing(monkeypatch):
    """run_suite fails the test if reached: a refusal must come before any model is timed."""
    monkeypatch.setattr(bench_suite, "run_suite", lambda *args, **kwargs: pytest.fail("timed a refused size"))


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "1000000000"], "the batch size must be at most 65,536, got 1,000,000,000"),
    (["--img-size", str(2**63)], "the image size must be at most 4096 px"),
    (["--img-size", "4096", "--batch-size", "65536"], "GiB for test_vit's activations"),
])
def test_bench_refuses_a_size_that_cannot_fit_before_allocating(capsys, no_timing, args, message):
    assert message in refused(capsys, "bench", "--model", "test_vit", *args)


def test_bench_compares_its_estimate_with_the_memory_free(capsys, monkeypatch, no_timing):
    monkeypatch.setattr(bench_suite, "free_bytes", lambda device: 1 << 20)
    message = refused(capsys, "bench", "--model", "test_vit", "--batch-size", "8")
    assert "a batch of 8 images of 160 px needs at least" in message and "GiB free on cpu" in message


def test_the_activation_estimate_grows_with_the_batch_and_with_training():
    model = bench_suite._vit("test_vit", 32)
    evaluation = bench_suite.activation_values(model, 1, train=False)
    assert bench_suite.activation_values(model, 4, train=False) == 4 * evaluation
    # 4 patches and a class token, width 64, MLP 192, one block at a time; plus the 3 x 32 x 32 input
    assert evaluation == 3 * 32 * 32 + 5 * (4 * 64 + 192)
    assert bench_suite.activation_values(model, 1, train=True) == 3 * 32 * 32 + 6 * 5 * (4 * 64 + 192)
