"""DyT throughput on this machine: the dense model with the same adapter vs DyT (rho 0.5, MLP
dispatch, real skipping) vs DyT + ToMe, evaluation at batch 32 and 1, on ViT-S/16 and ViT-B/16
shapes, each measured side by side in one interleaved run. Dispatchers are calibrated so that
half of the tokens are active in every layer (random weights otherwise).

    python benchmarks/dyt.py --output benchmarks/results/dyt_cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tieta.measure.bench_suite import dyt_models
from tieta.report.bench_report import evaluation_sections, write_report

SETTINGS = [  # (model, batch size, rounds)
    ("vit_small_patch16_224", 32, 5),
    ("vit_small_patch16_224", 1, 9),
    ("vit_base_patch16_224", 32, 3),
    ("vit_base_patch16_224", 1, 7),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="path without suffix for .md and .json")
    args = parser.parse_args()
    sections, raw = evaluation_sections(SETTINGS, lambda model, batch_size: dyt_models(model, None))
    write_report(args.output, "DyT throughput, fp32, cpu", (
        "GMACs: the executed path (inactive tokens skip the MLP), averaged over the benchmark batch. "
        "speedup: median over rounds of (img/s / the dense adapter model's img/s), measured in turn within "
        "each round. efficiency = speedup x FLOPs ratio."), sections, raw)


if __name__ == "__main__":
    main()
