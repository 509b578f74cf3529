"""tieta plan's worked example: every token-reduction method's setting for a speedup of 2 and of 3
over timm's ViT-S/16 (224 px, evaluation), measured on this machine at batch 32 and at batch 1,
and whether the settings differ by batch size.

Each (dtype, batch, target) is one ``tieta.plan`` run: every method's knob bisected on timings
taken beside the unmodified model in interleaved rounds (batch 32: 5 rounds; batch 1: 15 shorter
ones, for a steady median), the table and its reading printed as each is done. The last section
sets the two batch sizes' settings side by side. The plan for speedup 2 at batch 32 is also written
as a sweep file (``OUTPUT_speedup2_b32.yaml``; it trains from timm's published weights, so where
the hub is reachable; the README's worked example plans the built-in backbone instead):

    python benchmarks/plan.py --output benchmarks/results/plan_cpu            # about an hour on 2 cores
    python benchmarks/plan.py --device cuda --dtypes fp32 bf16 --output benchmarks/results/plan_gpu
    tieta sweep benchmarks/results/plan_cpu_speedup2_b32.yaml --data ../shared/data/vtab-mini/cifar10 \\
        ../shared/data/vtab-mini/dtd10 ../shared/data/vtab-mini/elpv --output benchmarks/runs/plan --epochs 2
    tieta report benchmarks/runs/plan --budget speedup=2

``--quick``: timm's tiny test ViT at 64 px, one round, one bisection step: checks that the script runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tieta.files import write_file
from tieta.measure.bench_suite import DTYPES
from tieta.measure.plan import BASELINE, plan
from tieta.measure.target import parse_target
from tieta.report.bench_report import write_report
from tieta.report.plan_table import plan_reading, plan_table, setting_text
from tieta.sweep.planned import plan_sweep, sweep_text

TARGETS = ("speedup=2", "speedup=3")
FULL = {"model": "vit_small_patch16_224", "img_size": None, "batches": (32, 1), "rounds": {32: 5, 1: 15},
        "steps": 6}
QUICK = {"model": "test_vit", "img_size": 64, "batches": (4, 1), "rounds": {4: 1, 1: 1}, "steps": 1}


def _log(text: str) -> None:
    print(f"plan: {text}", file=sys.stderr, flush=True)


def by_batch(found: dict[tuple[str, str, int], list[dict]], dtype: str, batches: tuple[int, ...]) -> str:
    """One Markdown table per target: each method's setting at each batch size, and whether they differ."""
    lines = []
    for target in TARGETS:
        lines += [f"### {target}, {dtype}", "", "| method | " + " | ".join(f"batch {b}" for b in batches)
                  + " | differ |", "|---|" + "---|" * (len(batches) + 1)]
        rows = {batch: {row["method"]: row for row in found[(dtype, target, batch)]} for batch in batches}
        for method in rows[batches[0]]:
            if method == BASELINE:
                continue
            cells = []
            for batch in batches:
                row = rows[batch][method]
                cells.append(f"{setting_text(row)} ({row['speedup']:.2f}x)" if row.get("met") else
                             ("not reachable" if row.get("setting") is not None else "no knob"))
            differ = "yes" if len(set(cells)) > 1 and all("x)" in cell for cell in cells) else "-"
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {differ} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="path without suffix for .md, .json and the sweep file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=tuple(DTYPES))
    parser.add_argument("--quick", action="store_true", help="a tiny ViT, one round: check that the script runs")
    args = parser.parse_args()
    setup = QUICK if args.quick else FULL
    sections, raw, found = [], {}, {}
    for dtype in args.dtypes:
        for batch in setup["batches"]:
            for target_text in TARGETS:
                target = parse_target(target_text)
                started = time.perf_counter()
                rows = plan(setup["model"], target, batch_size=batch, device=args.device, dtype=DTYPES[dtype],
                            img_size=setup["img_size"], rounds=setup["rounds"][batch], steps=setup["steps"], log=_log)
                where = f"{args.device}, batch {batch}, {dtype}"
                title = f"{target_text}: {setup['model']}, {where}"
                text = (f"## {title}\n\n```\n{plan_table(rows)}\n```\n({setup['rounds'][batch]} interleaved rounds "
                        f"per probe, {time.perf_counter() - started:.0f} s)\n\n"
                        f"{plan_reading(rows, target, where, setup['rounds'][batch])}\n")
                print(text, flush=True)
                sections.append(text)
                raw[title] = rows
                found[(dtype, target_text, batch)] = rows
                if target_text == "speedup=2" and batch == setup["batches"][0] and dtype == args.dtypes[0]:
                    sweep = Path(f"{args.output}_speedup2_b{batch}.yaml")
                    sweep.parent.mkdir(parents=True, exist_ok=True)
                    write_file(sweep, sweep_text(plan_sweep(rows, setup["model"], None, setup["img_size"]), target,
                                                 where, f"python benchmarks/plan.py (speedup=2, batch {batch})"))
        sections.append(f"## The settings by batch size ({dtype})\n\n"
                        + by_batch(found, dtype, setup["batches"]))
    write_report(args.output, f"tieta plan: each method's setting for a speedup of 2 and 3, {args.device}", (
        "Each method's knob bisected on timings beside the unmodified model (interleaved rounds; speedup: the "
        "median of the per-round ratios, 'per round' their range; latency: one forward pass of the batch). "
        "A method marked * is timed with its decisions at the rate its training aims for. Random weights: speed "
        "does not depend on them."), sections, raw, device=args.device)


if __name__ == "__main__":
    main()
