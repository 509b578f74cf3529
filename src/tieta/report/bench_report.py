"""Benchmark reports: Markdown with the exact command and the machine, plus the raw rows as JSON."""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch import nn

from tieta.files import write_file
from tieta.measure.benchmark import benchmark
from tieta.report.tables import bench_columns, format_table


def invoked_command() -> str:
    """The command line that is running, as a user would retype it."""
    return "python " + " ".join(shlex.quote(argument) for argument in sys.argv)


def section(title: str, table: str, rounds: int, seconds: float) -> str:
    """One Markdown section: a heading and the table, with how it was timed."""
    return f"## {title}\n\n```\n{table}\n```\n({rounds} interleaved rounds, {seconds:.0f} s)\n"


def evaluation_sections(settings: list[tuple[str, int, int]],
                        make_models: Callable[[str, int], dict[str, nn.Module]]) -> tuple[list[str], dict[str, Any]]:
    """Benchmark evaluation throughput for each (model name, batch size, rounds), models side by
    side; prints each section as it is done. Returns (Markdown sections, raw rows by title).

    Args:
        make_models: (model name, batch size) -> name -> model, the first the baseline.
    """
    sections, raw = [], {}
    for model, batch_size, rounds in settings:
        started = time.perf_counter()
        rows = benchmark(make_models(model, batch_size), batch_size=batch_size, rounds=rounds)
        title = f"{model}, evaluation, batch {batch_size}"
        sections.append(section(title, format_table(rows, bench_columns(rows)), rounds, time.perf_counter() - started))
        raw[title] = rows
        print(sections[-1], flush=True)
    return sections, raw


def write_report(output: Path, title: str, explanation: str, sections: list[str], raw: dict[str, Any],
                 device: str = "cpu") -> None:
    """Write ``output``.md (title, command, machine, explanation, sections) and ``output``.json."""
    machine = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    header = (
        f"# {title}\n\n"
        f"Command: `{invoked_command()}`\n\n"
        f"Machine: {machine}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"timm {timm.__version__}; {time.strftime('%Y-%m-%d')}\n\n"
        f"{explanation}\n\n"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    write_file(output.with_suffix(".md"), header + "\n".join(sections))
    write_file(output.with_suffix(".json"), json.dumps({"command": invoked_command(), "results": raw}, indent=2) + "\n")
