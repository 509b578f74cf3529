"""Data-parallel training: ``torchrun`` with 2 CPU processes (gloo) against one process, same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_vtab_task
from tieta import TietaError, shard
from tieta.train.distributed import Processes, ShardedBatches, global_batch_sizes, join

# no dropout or drop-path: those draw per process, so only their distribution matches one process
DETERMINISTIC = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--epochs", "2",
                 "--warmup-epochs", "1", "--set", "drop_path=0", "--set", "lora.dropout=0", "--set", "adapter.dropout=0",
                 "--set", "eval_batch_size=4"]


def _train(command: list[str], task: Path, output: Path, method: str, batch: int) -> list[dict]:
    args = [*command, "-m", "tieta", "train", *DETERMINISTIC, "--data", str(task), "--method", method,
            "--batch-size", str(batch), "--output", str(output)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, batch", [
    ("lora", 5),        # global batches 5, 5, 2: shards 3+2, 3+2, 1+1
    ("tome+lora", 11),  # 11, 1: the second process holds a placeholder that must not count
    ("pyra+lora", 5),
    ("dyt", 5),         # Gumbel noise drawn for the global batch; the rate loss over the global batch
])
def test_two_processes_train_as_one(tmp_path, method, batch):
    task = write_vtab_task(tmp_path / "task")  # 12 training images
    one = _train([sys.executable], task, tmp_path / "one", method, batch)
    two = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], task,
                 tmp_path / "two", method, batch)
    assert [r["epoch"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        for key in ("loss", "acc", "eval_loss", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
    single, parallel = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two"))
    assert parallel["processes"] == 2 and single["processes"] == 1
    assert parallel["acc"] == pytest.approx(single["acc"])
    state = json.loads((tmp_path / "two" / "state.json").read_text())
    assert state["state"] == "finished"


def test_shards_cover_each_global_batch_once():
    batches = [list(range(0, 5)), list(range(5, 10)), [10]]
    shards = [list(ShardedBatches(batches, Processes(rank, 2))) for rank in (0, 1)]
    assert shards[0] == [[0, 1, 2], [5, 6, 7], [10]]
    assert shards[1] == [[3, 4], [8, 9], [10]]  # the last: a placeholder (its shard counts 0 images)
    assert global_batch_sizes(11, 5) == [5, 5, 1]
    assert shard.shard_of(1, 1, 2, lambda t: None).count == 0


def test_batch_mean_gives_each_shard_its_share_of_the_gradient():
    values = torch.arange(5.0, requires_grad=True)
    totals = iter([torch.tensor(10.0)])  # what the other processes' sum would bring: 0+1+2 here, +3+4 there

    def reduce(tensor):
        tensor.copy_(next(totals))

    with shard.sharded(shard.Shard(global_count=5, start=0, count=3, reduce=reduce)):
        mean = shard.batch_mean(values[:3])
    assert mean.item() == pytest.approx(2.0)
    mean.backward()
    assert values.grad.tolist() == pytest.approx([0.2, 0.2, 0.2, 0.0, 0.0])
    assert shard.batch_mean(values).item() == 2.0  # no shard: the plain mean


def test_batch_rand_takes_the_shards_rows_of_the_global_draw():
    torch.manual_seed(0)
    whole = torch.rand(2, 6, 3)
    torch.manual_seed(0)
    with shard.sharded(shard.Shard(global_count=6, start=4, count=2, reduce=lambda t: None)):
        part = shard.batch_rand((2, 2, 3), batch_dim=1)
    assert torch.equal(part, whole[:, 4:6])


def test_a_refusal_in_one_process_stops_all_without_touching_the_folder(tmp_path):
    task = write_vtab_task(tmp_path / "task")
    _train([sys.executable], task, tmp_path / "run", "lora", 5)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tieta",
            "train", *DETERMINISTIC, "--data", str(task), "--output", str(tmp_path / "run")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stdout.splitlines() + done.stderr.splitlines() if line.startswith("tieta: error")]
    assert any("already exists" in line for line in errors)
    assert any("another of the training processes could not start" in line for line in errors)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


def test_a_process_without_its_gpu_is_refused(monkeypatch):
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TietaError, match="wants GPU 1"):
        join("cuda")
