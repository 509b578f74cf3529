"""Token-merging throughput on this machine: unpatched timm vs ToMe vs PYRA (evaluation, batch 32
and 1) and LoRA vs ToMe+LoRA vs PYRA+LoRA (training steps), each measured side by side in one
interleaved run. Writes a Markdown report (and the raw rows as JSON) with the command that made it.

    python benchmarks/token_merging.py --output benchmarks/results/token_merging_cpu
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tieta.measure.bench_suite import run_suite
from tieta.report.bench_report import section, write_report
from tieta.report.tables import bench_columns, format_table

SETTINGS = [
    # (title, batch size, train, rounds)
    ("evaluation, batch 32", 32, False, 7),
    ("evaluation, batch 1 (latency)", 1, False, 25),  # short rounds: more of them for a steady median
    ("training steps (forward, backward, AdamW), batch 32", 32, True, 5),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, required=True, help="path without suffix for .md and .json")
    args = parser.parse_args()
    sections, raw = [], {}
    for title, batch_size, train, rounds in SETTINGS:
        started = time.perf_counter()
        rows = run_suite(args.model, None, batch_size, args.dtype, ["low", "high"], rounds, train, args.device,
                         merge_variants=not train)
        table = format_table(rows, bench_columns(rows, efficiency=not train))
        sections.append(section(title, table, rounds, time.perf_counter() - started))
        raw[title] = rows
        print(sections[-1], flush=True)
    write_report(args.output, f"Token merging throughput: {args.model}, {args.dtype}, {args.device}", (
        "speedup: median over rounds of (model img/s / first row's img/s), measured in turn within each round. "
        "efficiency = speedup x FLOPs ratio (1.0: every saved FLOP became time). PYRA / ToMe: median over "
        "rounds of PYRA's img/s / ToMe's at the same schedule. \"tensor merge\": ToMe with the merge done "
        "as tensor operations instead of the native call (what the native merge saves). \"free merge\": ToMe "
        "whose blocks drop their last r tokens instead of merging (no merge, no proportional attention); "
        "ToMe / free: median over rounds of ToMe's img/s / the free merge's, so 1 - ToMe / free is what "
        "merging costs. ceiling: the model's own "
        "attention and MLP timed at the token counts the schedule leaves, with merging free; it shows what "
        "the hardware gives for small token counts."), sections, raw, args.device)


if __name__ == "__main__":
    main()
