"""Throughput for a report: the sweep's models timed side by side in one benchmark.

Throughput in run summaries is timed run by run, each at whatever else the machine was doing; only
ratios taken side by side hold. So a report loads one trained model per run name (all from the
same task, where the dispatchers' decisions are real) and times them interleaved on real images
of that task. The result is kept in the sweep folder (throughput.json) and reused while the
same models, device and batch size are asked for.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from tieta.data.transforms import Normalize
from tieta.data.vtab import ImageDataset, open_task
from tieta.errors import TietaError
from tieta.measure.benchmark import benchmark
from tieta.report.collect import RunRecord, SweepResults
from tieta.train.fit import image_size_of, load_run_model, resolve_device

THROUGHPUT_FILE = "throughput.json"


def benchmark_records(results: SweepResults, runs: list[str]) -> Optional[list[RunRecord]]:
    """One finished run per run name, all of one task (the first task where every run has one)."""
    for task in results.tasks:
        chosen = []
        for run in runs:
            found = sorted((r for r in results.records if r.task == task and r.run == run), key=lambda r: r.seed)
            if not found:
                break
            chosen.append(found[0])
        else:
            return chosen
    return None


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def sweep_throughput(results: SweepResults, folder: Path, runs: list[str], device: str = "cpu",
                     batch_size: int = 32, rounds: int = 7, rebench: bool = False,
                     log: Callable[[str], None] = print) -> Optional[dict[str, Any]]:
    """Images/s and speedup (to the first run) of each run name, side by side.

    Returns:
        {"device", "machine", "batch_size", "rounds", "task", "folders": {run: folder},
         "rows": {run: {"images_per_s", "speedup", "speedup_spread"}}}, or None where no task has
        every run finished (nothing comparable to time).
    """
    device = str(resolve_device(device))  # "foo" or "cuda:7": one sentence before any model is loaded
    chosen = benchmark_records(results, runs)
    if chosen is None:
        log("throughput: no task has every run finished, so none is timed")
        return None
    folders = {record.run: str(record.folder.resolve()) for record in chosen}
    cache = folder / THROUGHPUT_FILE
    if cache.is_file() and not rebench:
        try:
            kept = json.loads(cache.read_text())
        except (OSError, ValueError):
            kept = None
        if isinstance(kept, dict) and kept.get("folders") == folders and kept.get("device") == device \
                and kept.get("batch_size") == batch_size and kept.get("rounds") == rounds:
            log(f"throughput: measured before ({cache}; --rebench to time again)")
            return kept
    measured = _measure(chosen, device, batch_size, rounds, log)
    measured.update(folders=folders, device=device, machine=_machine(device), batch_size=batch_size, rounds=rounds,
                    task=chosen[0].task, date=time.strftime("%Y-%m-%d"))
    try:
        cache.write_text(json.dumps(measured, indent=2) + "\n")
    except OSError as error:
        log(f"throughput: could not keep the measurement in {cache} ({error.strerror})")
    return measured


def _measure(chosen: list[RunRecord], device: str, batch_size: int, rounds: int,
             log: Callable[[str], None]) -> dict[str, Any]:
    log(f"throughput: loading {len(chosen)} trained models of task {chosen[0].task}")
    models, configs = {}, {}
    for record in chosen:
        models[record.run], configs[record.run], num_classes = load_run_model(record.folder)
    sizes = {image_size_of(model) for model in models.values()}
    if len(sizes) > 1:
        raise TietaError(f"the runs take different input sizes ({sorted(sizes)}), so they cannot be timed side by "
                         "side; report them separately (--runs)")
    config = configs[chosen[0].run]
    task = open_task(config.data.path)
    items = task.split(config.data.eval_split)[:batch_size]
    dataset = ImageDataset(items, sizes.pop(), task.num_classes, cache=True)
    images = Normalize(config.data.normalization)(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    log(f"throughput: timing {', '.join(models)} side by side, batch {len(images)}, {rounds} interleaved rounds "
        f"on {device}")
    started = time.perf_counter()
    rows = benchmark(models, device=device, rounds=rounds, images=images)
    log(f"throughput: timed in {time.perf_counter() - started:.0f} s")
    return {"rows": {row["name"]: {"images_per_s": row["images_per_s"], "speedup": row["speedup"],
                                   "speedup_spread": list(row["speedup_spread"])} for row in rows}}
