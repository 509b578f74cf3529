"""Paired differences between runs of a sweep: run A minus run B on the same task and seed.

Two runs of one seed share the head's initialisation and the order of the training batches, so
their difference cancels much of what varies between seeds; its spread over seeds says whether an
effect is resolved. Used for ``benchmarks/results/vtab_mini_cpu.md``:

    python benchmarks/vtab_mini_paired.py benchmarks/runs/vtab_mini \\
        pyra-lora-low:tome-lora-low pyra-lora-high:tome-lora-high tome-lora-low:lora tome-lora-high:lora
"""

from __future__ import annotations

import argparse
import statistics
import sys

from tieta.report.collect import collect


def paired_rows(folder: str, pairs: list[tuple[str, str]]) -> list[str]:
    results = collect(folder)
    lines = ["| A - B | " + " | ".join(results.tasks) + " | mean over tasks |", "|---" * (len(results.tasks) + 2) + "|"]
    for a, b in pairs:
        cells, per_seed_means = [], []
        for seed in results.seeds:
            diffs = []
            for task in results.tasks:
                ra, rb = results.record(task, a, seed), results.record(task, b, seed)
                if ra is not None and rb is not None:
                    diffs.append(ra.summary["acc"] - rb.summary["acc"])
            if len(diffs) == len(results.tasks):
                per_seed_means.append(statistics.fmean(diffs))
        for task in results.tasks:
            diffs = [results.record(task, a, s).summary["acc"] - results.record(task, b, s).summary["acc"]
                     for s in results.seeds if results.record(task, a, s) and results.record(task, b, s)]
            cells.append(_spread(diffs))
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + f" | {_spread(per_seed_means)} |")
    return lines


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.2f} (1 seed)"
    text = ", ".join(f"{v:+.1f}" for v in values)
    return f"{statistics.fmean(values):+.2f} ± {statistics.stdev(values):.2f} ({text})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("pairs", nargs="+", help="A:B, run names")
    args = parser.parse_args()
    pairs = [tuple(pair.split(":", 1)) for pair in args.pairs]
    print("\n".join(paired_rows(args.folder, pairs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
