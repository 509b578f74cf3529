"""One block's merge on its own: the native call vs the tensor code, with and without PYRA, timed side
by side in interleaved rounds (ViT-S/16 shapes: 197 tokens, 6 heads, width 384, r = 16, batch 1).
Warm caches: inside a forward pass every variant runs slower, the tensor code most.

    python benchmarks/merge_call.py --output benchmarks/results/merge_call_cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tieta.measure.benchmark import interleaved_rates
from tieta.methods.pyra import PyraModulation
from tieta.methods.tome import bipartite_soft_matching, merge_wavg
from tieta.native.tome_merge import native_merge
from tieta.report.bench_report import section, write_report
from tieta.report.tables import format_table

TOKENS, HEADS, WIDTH, R, ROUNDS = 197, 6, 384, 16, 15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="path without suffix for .md and .json")
    args = parser.parse_args()
    torch.manual_seed(0)
    qkv = torch.randn(1, TOKENS, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)  # timm's layout
    keys, x = qkv[1], torch.randn(1, TOKENS, WIDTH)
    pyra = PyraModulation(R, WIDTH)
    with torch.no_grad():
        pyra.token_weight.normal_()  # away from the identity, so that the re-activation runs in full

    def tensor(modulation):
        return lambda: merge_wavg(bipartite_soft_matching(keys.sum(dim=1), R, 1), x, None, modulation)

    steps = {
        "native": lambda: native_merge(keys, x, None, R, 1),
        "native + PYRA": lambda: native_merge(keys, x, None, R, 1, pyra),
        "tensor": tensor(None),
        "tensor + PYRA": tensor(pyra),
    }
    started = time.perf_counter()
    with torch.inference_mode():
        rates = interleaved_rates(steps, torch.device("cpu"), ROUNDS)
    rows = [{"name": name, "microseconds": 1e6 / statistics.median(rates[name]),
             "vs_native": statistics.median(n / v for n, v in zip(rates["native"], rates[name]))}
            for name in steps]
    table = format_table(rows, [("name", "merge", ""), ("microseconds", "us per call", ".1f"),
                                ("vs_native", "time / native", ".3f")])
    sections = [section("one merge, batch 1", table, ROUNDS, time.perf_counter() - started)]
    print(sections[0])
    write_report(args.output, "Merge call: native vs tensor code, cpu", (
        "us per call: median over rounds. time / native: median over rounds of the call's time / the "
        "plain native call's time in the same round."), sections, {"one merge, batch 1": rows})


if __name__ == "__main__":
    main()
