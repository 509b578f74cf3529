"""Deployed evaluation on the CPU: PyTorch eager vs onnxruntime vs torch.compile, side by side.

ViT-S/16 at 224 px (random weights: throughput does not depend on them, except DyT's, whose
dispatchers are calibrated to half of the tokens): plain timm, ToMe "low", PYRA "low" and DyT (rho
0.5, MLP dispatch), at batch 1 and 32. For ToMe and PYRA, eager runs twice: with the native merge
(what evaluation uses on the CPU) and with the tensor merge (what the ONNX file and the compiled
graph hold). All runtimes of one batch size are timed in the same interleaved rounds.

    python benchmarks/deploy_cpu.py --output benchmarks/results/deploy_cpu
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tieta.deploy.compiled import compile_model
from tieta.deploy.onnx import export_onnx, onnx_session
from tieta.backbone import load_backbone
from tieta.measure.bench_suite import TensorMerge, calibrate_dispatchers
from tieta.measure.benchmark import interleaved_rates
from tieta.methods.dyt import add_dyt
from tieta.methods.pyra import add_pyra
from tieta.methods.tome import add_tome
from tieta.report.bench_report import section, write_report
from tieta.report.tables import format_table

MODEL, SIZE = "vit_small_patch16_224", 224
BASELINE = "timm, eager"


def vit() -> nn.Module:
    torch.manual_seed(0)
    return load_backbone(MODEL, weights="random", num_classes=1000).eval()


def models() -> dict[str, nn.Module]:
    """name -> evaluation model."""
    calibration = torch.randn(32, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return {
        "timm": vit(),
        "tome low": add_tome(vit(), "low"),
        "pyra low": add_pyra(vit(), "low"),
        "dyt rho 0.5": calibrate_dispatchers(add_dyt(vit(), rho=0.5), calibration, 0.5),
    }


def runtimes(name: str, model: nn.Module, images: torch.Tensor, folder: Path) -> dict[str, dict]:
    """'<model>, <runtime>' -> {"run": () -> logits, "setup_s": export or compile seconds}."""
    merging = name.startswith(("tome", "pyra"))
    found = {f"{name}, eager": {"run": lambda: model(images), "setup_s": 0.0}}
    if merging:
        tensor_merge = TensorMerge(model)
        found[f"{name}, eager, tensor merge"] = {"run": lambda: tensor_merge(images), "setup_s": 0.0}
    started = time.perf_counter()
    path = export_onnx(model, folder / f"{name.replace(' ', '_')}_{len(images)}.onnx", len(images), SIZE)
    session = onnx_session(path, threads=torch.get_num_threads())  # the threads torch has
    feed = {"images": images.numpy()}
    found[f"{name}, onnxruntime"] = {"run": lambda: torch.from_numpy(session.run(["logits"], feed)[0]),
                                     "setup_s": time.perf_counter() - started}
    started = time.perf_counter()
    compiled = compile_model(model)
    with torch.inference_mode():
        compiled(images)  # compiles
    found[f"{name}, compiled"] = {"run": lambda: compiled(images), "setup_s": time.perf_counter() - started}
    return found


def timed_section(evaluated: dict[str, nn.Module], batch_size: int, rounds: int, folder: Path
                  ) -> tuple[str, list[dict]]:
    """One batch size: every model in every runtime, in the same interleaved rounds."""
    images = torch.randn(batch_size, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch_size))
    steps: dict[str, dict] = {}
    for name, model in evaluated.items():
        steps.update(runtimes(name, model, images, folder))
        print(f"  set up {name} at batch {batch_size}", flush=True)
    with torch.inference_mode():
        reference = {name: model(images) for name, model in evaluated.items()}
        errors = {name: float((step["run"]() - reference[name.split(", ")[0]]).abs().max())
                  for name, step in steps.items()}

    def no_grad(run: Callable) -> Callable[[], None]:
        def step() -> None:
            with torch.inference_mode():
                run()
        return step

    started = time.perf_counter()
    rates = interleaved_rates({name: no_grad(step["run"]) for name, step in steps.items()}, torch.device("cpu"), rounds)
    seconds = time.perf_counter() - started
    rows = []
    for name, step in steps.items():
        own_eager = f"{name.split(', ')[0]}, eager"
        rows.append({
            "name": name,
            "images_per_s": statistics.median(rates[name]) * batch_size,
            "vs_eager": statistics.median(a / b for a, b in zip(rates[name], rates[own_eager])),
            "vs_timm": statistics.median(a / b for a, b in zip(rates[name], rates[BASELINE])),
            "max_abs_diff": errors[name],
            "setup_s": step["setup_s"],
            "round_rates": rates[name],
        })
    columns = [("name", "model, runtime", ""), ("images_per_s", "img/s", ".1f"), ("vs_eager", "x own eager", ".2f"),
               ("vs_timm", "x timm eager", ".2f"), ("max_abs_diff", "max |logits - eager|", ".1e"),
               ("setup_s", "export/compile s", ".0f")]
    return section(f"{MODEL}, evaluation, batch {batch_size}", format_table(rows, columns), rounds, seconds), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="path without suffix for .md and .json")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", help="only these, beside timm (default: all)")
    args = parser.parse_args()
    sections, raw = [], {}
    evaluated = {name: model for name, model in models().items() if not args.models or name in {"timm", *args.models}}
    with tempfile.TemporaryDirectory() as folder:
        for batch_size in args.batch_sizes:
            text, rows = timed_section(evaluated, batch_size, args.rounds, Path(folder))
            print(text, flush=True)
            sections.append(text)
            raw[f"batch {batch_size}"] = rows
    write_report(args.output, "Deployed evaluation: eager vs onnxruntime vs torch.compile, fp32, cpu", (
        "img/s: median over rounds. x own eager: median over rounds of the runtime's img/s / the same model's "
        "eager img/s in the same round (eager: the native merge for ToMe and PYRA); x timm eager: the same, "
        "against plain timm in eager mode. max |logits - eager|: against the same model in eager mode. "
        "export/compile s: torch.onnx export + session creation, or the first compiled call."), sections, raw)


if __name__ == "__main__":
    main()
