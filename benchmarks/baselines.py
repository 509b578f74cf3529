"""The token-reduction baselines beside ToMe, PYRA and DyT at matched cost, on this machine.

ViT-S/16 (224 px, fp32, CPU) in evaluation: ToMe and PYRA at the PYRA paper's "low" schedule, EViT
(keep 0.49), DynamicViT (geometric rho 0.517) and DiffRate (its published 8.7-GMACs ViT-B schedule)
at the same cost (those settings reach PYRA's "low" 8.77 GMACs on ViT-B/16 and the same token
counts on any depth-12, 196-patch ViT), and DyT (MLP dispatch, rho 0.5, dispatchers calibrated),
each measured side by side in one interleaved run at batch 32 and batch 1.

    python benchmarks/baselines.py --output benchmarks/results/baselines_cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tieta.measure.bench_suite import baseline_models
from tieta.report.bench_report import evaluation_sections, write_report

SETTINGS = [  # (model, batch size, rounds)
    ("vit_small_patch16_224", 32, 5),
    ("vit_small_patch16_224", 1, 15),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="path without suffix for .md and .json")
    args = parser.parse_args()
    sections, raw = evaluation_sections(SETTINGS, lambda model, batch_size: baseline_models(model, None, batch_size=batch_size))
    write_report(args.output, "Token-reduction baselines beside ToMe, PYRA and DyT at matched cost, fp32, cpu", (
        "GMACs: the executed path (DyT's averaged over the benchmark batch). speedup: median over rounds of "
        "(img/s / timm's img/s), measured in turn within each round. efficiency = speedup x FLOPs ratio (1.0: "
        "every saved FLOP became time)."), sections, raw)


if __name__ == "__main__":
    main()
