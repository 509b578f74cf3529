"""Throughput for a report: the sweep's models timed side by side in one benchmark.

Throughput in run summaries is timed run by run, each at whatever else the machine was doing; only
ratios taken side by side hold. So a report loads one trained model per run name (all from the
same task, where the dispatchers' decisions are real) and times them interleaved on real images
of that task. The result is kept in the sweep folder (throughput.json) and reused while the
same models (the same run folders, each checkpoint still the one timed: its checksum), device,
batch size and rounds are asked for. A kept file that is not what tieta writes is timed again.

Each run keeps its per-round speedups (their range says what the timing can tell apart, see
:mod:`tieta.report.speed`), and the measurement keeps the machine's load before and after the
timing (:mod:`tieta.measure.load`), so that a report can say when the machine was busy.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from tieta.data.transforms import Normalize
from tieta.train.record import normalization_of
from tieta.data.vtab import ImageDataset
from tieta.errors import TietaError
from tieta.files import WriteError, is_number, read_json, write_owned
from tieta.measure.benchmark import benchmark
from tieta.measure.load import valid as valid_load, watched_load
from tieta.report.collect import RunRecord, SweepResults
from tieta.train.checkpoint import CHECKSUM_KEY, read_metadata
from tieta.device import resolve_device
from tieta.train.model import image_size_of
from tieta.train.run_model import load_run_model
from tieta.train.segmentation_run import cost_crops, is_segmentation_run, segmentation_eval_dataset
from tieta.train.video_run import open_run_task
from tieta.video.dataset import VideoDataset
from tieta.train.rundir import CHECKPOINT

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
         "load": the machine's load (:func:`tieta.measure.load.watched_load`),
         "rows": {run: {"images_per_s", "speedup", "round_speedups", "speedup_spread"}}}, or None
        where no task has every run finished (nothing comparable to time).
    """
    device = str(resolve_device(device))  # "foo" or "cuda:7": one sentence before any model is loaded
    chosen = benchmark_records(results, runs)
    if chosen is None:
        log("throughput: no task has every run finished, so none is timed")
        return None
    folders = {record.run: str(record.folder.resolve()) for record in chosen}
    models = {record.run: checkpoint_checksum(record.folder) for record in chosen}
    cache = folder / THROUGHPUT_FILE
    kept, tieta_wrote = read_kept(cache, log)
    if kept is not None and not rebench and None not in models.values() and kept.get("models") == models \
            and kept["folders"] == folders and kept["device"] == device and kept["batch_size"] == batch_size \
            and kept["rounds"] == rounds:
        log(f"throughput: measured before ({cache}; --rebench to time again)")
        return kept
    with watched_load() as load:
        measured = _measure(chosen, device, batch_size, rounds, log)
    measured.update(load=load, folders=folders, models=models, device=device, machine=_machine(device),
                    batch_size=batch_size, rounds=rounds, task=chosen[0].task, date=time.strftime("%Y-%m-%d"))
    try:
        write_owned(cache, json.dumps(measured, indent=2) + "\n", adopt=tieta_wrote)
    except WriteError as error:
        log(f"throughput: could not keep the measurement: {error}")
    return measured


def checkpoint_checksum(folder: Path) -> Optional[str]:
    """The checksum in the header of a run's checkpoint (it changes whenever the run is trained
    again), read without the tensors; None where there is none to read."""
    try:
        value = read_metadata(folder / CHECKPOINT).get(CHECKSUM_KEY)
    except TietaError:
        return None
    return value if isinstance(value, str) else None


def read_kept(cache: Path, log: Callable[[str], None] = print) -> tuple[Optional[dict[str, Any]], bool]:
    """(the kept measurement, whether the file is recognisably tieta's): (None, False) where there
    is none, and where the file is not what tieta writes (it is then timed again)."""
    if not os.path.lexists(cache):
        return None, False
    try:
        kept = read_json(cache, "kept throughput", limit=16 << 20)
    except TietaError as error:
        log(f"throughput: {error}; timing again")
        return None, False
    problem = cache_problem(kept)
    if problem:
        log(f"throughput: {cache} is not what tieta writes ({problem}); timing again")
        return None, False
    return kept, True


def cache_problem(kept: Any) -> Optional[str]:
    """Why a throughput.json is not a measurement tieta wrote (None where it is one)."""
    if not isinstance(kept, dict):
        return "not a mapping"
    for key in ("device", "machine", "task"):
        if not isinstance(kept.get(key), str):
            return f"no {key}"
    for key in ("batch_size", "rounds"):
        if type(kept.get(key)) is not int:
            return f"no whole-number {key}"
    folders, rows, models = kept.get("folders"), kept.get("rows"), kept.get("models", {})
    if not isinstance(folders, dict) or not all(isinstance(v, str) for v in folders.values()):
        return "no run folders"
    if not isinstance(models, dict) or not all(isinstance(v, str) for v in models.values()):
        return "no checkpoint checksums"
    if not isinstance(rows, dict) or set(rows) != set(folders):
        return "not one row per run"
    for run, row in rows.items():
        spread = row.get("speedup_spread") if isinstance(row, dict) else None
        rounds = row.get("round_speedups", []) if isinstance(row, dict) else None  # an older tieta kept none
        if not (isinstance(row, dict) and is_number(row.get("images_per_s")) and is_number(row.get("speedup"))
                and isinstance(spread, list) and all(is_number(v) for v in spread)
                and isinstance(rounds, list) and all(is_number(v) for v in rounds)):
            return f"an unreadable row for {run}"
    if "load" in kept and kept["load"] != {} and not valid_load(kept["load"]):
        return "an unreadable machine load"
    return None


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
    task = open_run_task(config)
    items = task.split(config.data.eval_split)[:batch_size]
    normalize = Normalize(normalization_of(config, models[chosen[0].run]))  # as the runs were trained
    if is_segmentation_run(config):  # one window (the model's input) of each evaluation image
        size = sizes.pop()
        pairs = segmentation_eval_dataset(config, task, config.data.eval_split, normalization_of(config)["mean"])
        images = normalize(cost_crops(pairs, list(range(min(batch_size, len(pairs)))), size, limit=batch_size))
    elif task.layout == "video":  # clips: the first evaluation view of each, (B, T, 3, S, S)
        clips = VideoDataset(items, task.num_classes, config.video_data, sizes.pop(), training=False)
        images = normalize(torch.stack([clips[i][0][0] for i in range(len(clips))]))
    else:
        dataset = ImageDataset(items, sizes.pop(), task.num_classes, cache=True)
        images = normalize(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    log(f"throughput: timing {', '.join(models)} side by side, batch {len(images)}, {rounds} interleaved rounds "
        f"on {device}")
    started = time.perf_counter()

    def progress(done: int, total: int, left: float) -> None:
        if done < total:
            log(f"throughput: round {done + 1} of {total}, about {left:.0f} s left")

    rows = benchmark(models, device=device, rounds=rounds, images=images, progress=progress)
    log(f"throughput: timed in {time.perf_counter() - started:.0f} s")
    return {"timed_batch": len(images),
            "rows": {row["name"]: {"images_per_s": row["images_per_s"], "speedup": row["speedup"],
                                   "round_speedups": list(row["round_speedups"]),
                                   "speedup_spread": list(row["speedup_spread"])} for row in rows}}
