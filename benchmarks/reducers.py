"""Every token-reduction method of the registry beside timm at matched FLOPs, on this machine.

ViT-S/16 (224 px, fp32, CPU) in evaluation: each method at the setting of its knob
(``tieta.methods.knob``) whose FLOPs come closest to 0.50 and to 0.29 of timm's
(``tieta.measure.matched.setting_for_flops``); a method whose knob cannot reach a ratio is listed
with the nearest it reaches and left out of that ratio's timing. DyT's cost follows what its
dispatchers learn, so its rho is searched here with the dispatchers calibrated to the rate (a share
rho of the tokens active in every layer, on 8 random images, as in ``benchmarks/baselines.py``)
instead of as attached untrained. All of a ratio's models
are timed side by side in one interleaved run, at batch 32 and batch 1.

Training (at the 0.50 setting): every method as users train it, with LoRA rank 8 on qkv
("method+lora", the backbone frozen) and its own objective where it has one (``Method.objective``:
DyT's, DynamicViT's, SPViT's, MCTF's losses), beside LoRA alone (the baseline) and timm fully
fine-tuned: one optimizer step (forward, loss, backward, AdamW step) at batch 32, timed side by
side in interleaved rounds, and the peak tensor memory of one step of each
(``tieta.measure.peak_memory.training_step_peak_bytes``: torch's allocator, not the process's
memory).

    python benchmarks/reducers.py --output benchmarks/results/reducers_cpu

``--quick``: a tiny ViT (64 px), one round, to check that the script runs.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from types import SimpleNamespace

import timm
import torch

from tieta.errors import TietaError
from tieta.measure.bench_suite import calibrate_dispatchers, stage_progress
from tieta.measure.benchmark import benchmark
from tieta.measure.matched import setting_for_flops, settings_with
from tieta.measure.peak_memory import cross_entropy_loss, training_step_peak_bytes
from tieta.methods import registry
from tieta.methods.method import LossFn
from tieta.methods.params import freeze_backbone
from tieta.report.bench_report import evaluation_sections, section, write_report
from tieta.report.speed import spread_text
from tieta.report.tables import bench_columns, format_table

RATIOS = (0.50, 0.29)
FULL = {"model": "vit_small_patch16_224", "img_size": 224, "settings": [32, 1], "rounds": {32: 5, 1: 15},
        "train_batch": 32, "train_rounds": 5}
QUICK = {"model": "vit_tiny_patch16_224", "img_size": 64, "settings": [4, 1], "rounds": {4: 1, 1: 1},
         "train_batch": 4, "train_rounds": 1}
TRAIN_RATIO = 0.50  # the ratio every method reaches but FPET (and DiffRate, which has no knob)
LORA_RANK = 8  # on every block's qkv: how the token reducers are trained ("method+lora")
# the training table: the benchmark's columns (no efficiency: a training step is not the FLOPs'
# forward pass), then the step's peak memory, alone and over LoRA's
MEMORY_COLUMNS = (("peak_mib", "peak MiB", ".1f"), ("memory_ratio", "memory / LoRA", ".2f"))
TRAINING_READING = (
    "Speedup: median over rounds of (steps/s / LoRA alone's steps/s), measured in turn within each round; "
    "\"per round\" is its range. Peak MiB: the most tensor bytes alive at once in one step (weights, "
    "gradients, AdamW's moments, the batch, the activations kept for backward), from torch's allocator, not "
    "the process's memory. The FLOPs ratio is the evaluation path's, over LoRA's. Methods whose training "
    "differs from their evaluation do not save in training what they save in evaluation, and that is what "
    "this table measures: DynamicViT and SPViT train with masks over all tokens (SPViT's objective adds a "
    "pass of the all-tokens network without gradient), DTEM merges softly (every token stays), DyT trains "
    "masked (every token through the skipped module, the output masked) and its objective adds a full pass "
    "with gradient, and MCTF's objective runs the model twice (a teacher with fewer tokens fused).")


def _vit(plan: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    if plan is QUICK:
        return timm.create_model(plan["model"], img_size=64, patch_size=8, embed_dim=32, depth=4,
                                 num_heads=2, num_classes=10)
    return timm.create_model(plan["model"], pretrained=False)


def find_settings(plan: dict) -> dict[float, dict[str, tuple]]:
    """ratio -> method name -> (config value, ratio reached, reachable)."""
    base = _vit(plan)
    found: dict[float, dict[str, tuple]] = {}
    for ratio in RATIOS:
        found[ratio] = {}
        for name, method in registry.methods().items():
            if not method.reduces_tokens or method.knob is None:
                continue
            try:
                search = _calibrated_setting if method.data_dependent_cost else setting_for_flops
                value, reached = search(name, base, plan["img_size"], ratio)
                found[ratio][name] = (value, reached, True)
            except TietaError as error:
                found[ratio][name] = (str(error), None, False)
            print(f"ratio {ratio}: {name} {found[ratio][name]}", flush=True)
    return found


def _calibrated_setting(name: str, base: torch.nn.Module, img_size: int, ratio: float) -> tuple[float, float]:
    """rho whose calibrated dispatchers (a share rho active in every layer) give the FLOPs ratio,
    by bisection; one sentence where no rho in (0, 1] reaches it."""
    from tieta.measure.flops import count_flops

    method = registry.methods()[name]
    images = torch.randn(8, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    plain = count_flops(copy.deepcopy(base).eval(), images)["gmacs"]

    def ratio_at(rho: float) -> float:
        model = method.attach(copy.deepcopy(base), settings_with(method, method.knob.key, rho))
        return count_flops(calibrate_dispatchers(model, images, rho), images)["gmacs"] / plain

    low, high = 0.01, 1.0
    if ratio_at(low) > ratio:
        raise TietaError(f"{name} cannot reach a FLOPs ratio of {ratio:.2f}: its nearest is {ratio_at(low):.3f}")
    for _ in range(12):
        middle = (low + high) / 2
        low, high = (middle, high) if ratio_at(middle) < ratio else (low, middle)
    rho = round((low + high) / 2, 3)
    return rho, ratio_at(rho)


def models_at(plan: dict, settings: dict[str, tuple], batch_size: int) -> dict[str, torch.nn.Module]:
    """timm first, then every method that reaches the ratio at its setting."""
    base = _vit(plan)
    images = torch.randn(batch_size, 3, plan["img_size"], plan["img_size"])
    models = {"timm": base}
    for name, (value, _, reachable) in settings.items():
        if not reachable:
            continue
        method = registry.methods()[name]
        model = method.attach(copy.deepcopy(base), settings_with(method, method.knob.key, value))
        if name == "dyt":
            model = calibrate_dispatchers(model, images, value)
        models[f"{name} {method.knob.key}={_short(value)}"] = model.eval()
    return models


def training_models(plan: dict, settings: dict[str, tuple]) -> tuple[dict[str, torch.nn.Module], dict[str, LossFn]]:
    """LoRA alone first (the baseline), timm fully fine-tuned, then every method that reaches the
    ratio at its setting, with LoRA on qkv (its default config, rank 8) and the backbone frozen, as
    ``tieta train --method NAME+lora`` builds it; and the training loss of each method that has its
    own objective (the others train with cross-entropy)."""
    base = _vit(plan)
    images = torch.randn(plan["train_batch"], 3, plan["img_size"], plan["img_size"])
    lora = registry.methods()["lora"]
    lora_settings = settings_with(lora, "lora.rank", LORA_RANK)
    models = {f"lora r={LORA_RANK}": freeze_backbone(lora.attach(copy.deepcopy(base), lora_settings)),
              "timm, full fine-tuning": copy.deepcopy(base)}
    losses: dict[str, LossFn] = {}
    for name, (value, _, reachable) in settings.items():
        if not reachable:
            continue
        method = registry.methods()[name]
        # one run config: the method's sections and LoRA's
        config = SimpleNamespace(**vars(settings_with(method, method.knob.key, value)), **vars(lora_settings))
        model = method.attach(copy.deepcopy(base), config)
        if name == "dyt":
            model = calibrate_dispatchers(model, images, value)
        label = f"{name}+lora {method.knob.key}={_short(value)}"
        models[label] = freeze_backbone(lora.attach(model, config))
        if method.objective is not None:
            losses[label] = method.objective(config)
    return models, losses


def training_section(plan: dict, settings: dict[str, tuple]) -> tuple[str, list[dict]]:
    """Time one training step of every model of :func:`training_models` side by side, then measure
    each one's peak memory; prints the section. Returns (Markdown section, rows)."""
    started = time.perf_counter()
    models, losses = training_models(plan, settings)
    batch, rounds = plan["train_batch"], plan["train_rounds"]
    progress = stage_progress(print, 1, 2, f"timing training steps of {len(models)} models side by side")
    rows = benchmark(models, batch_size=batch, rounds=rounds, train=True, losses=losses, progress=progress)
    images = torch.randn(batch, 3, plan["img_size"], plan["img_size"], generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(batch, dtype=torch.long)
    for index, row in enumerate(rows):
        row["speedup_range"] = spread_text(row)
        print(f"[2/2] peak memory of a training step: {row['name']} ({index + 1} of {len(rows)})", flush=True)
        row["peak_bytes"] = training_step_peak_bytes(models[row["name"]], images, labels,
                                                     losses.get(row["name"], cross_entropy_loss))
        row["peak_mib"] = row["peak_bytes"] / 2**20
        row["memory_ratio"] = row["peak_bytes"] / rows[0]["peak_bytes"]
    title = (f"FLOPs ratio {TRAIN_RATIO:.2f}: {plan['model']}, training step (LoRA rank {LORA_RANK}, AdamW), "
             f"batch {batch}")
    table = format_table(rows, bench_columns(rows, efficiency=False) + list(MEMORY_COLUMNS))
    reading = TRAINING_READING + left_out(settings)
    text = section(title, table, rounds, time.perf_counter() - started) + "\n" + reading + "\n"
    print(text, flush=True)
    return text, rows


def left_out(settings: dict[str, tuple]) -> str:
    """A sentence naming the token reducers the training table lacks, and why (none: empty)."""
    unreachable = [name for name, (_, _, reachable) in settings.items() if not reachable]
    knobless = [name for name, method in registry.methods().items() if method.reduces_tokens and method.knob is None]
    reasons = []
    if unreachable:
        reasons.append(f"{', '.join(unreachable)} (the knob cannot reach {TRAIN_RATIO:.2f})")
    if knobless:
        reasons.append(f"{', '.join(knobless)} (no knob: its rates are searched or published per block)")
    return f" Not in this table: {'; '.join(reasons)}." if reasons else ""


def _short(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def settings_table(found: dict[float, dict[str, tuple]]) -> str:
    lines = ["| ratio | method | knob | setting | FLOPs ratio reached |", "|---|---|---|---|---|"]
    for ratio, settings in found.items():
        for name, (value, reached, reachable) in settings.items():
            key = registry.methods()[name].knob.key
            if reachable:
                lines.append(f"| {ratio:.2f} | {name} | {key} | {_short(value)} | {reached:.3f} |")
            else:
                lines.append(f"| {ratio:.2f} | {name} | {key} | not reachable: {value} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="path without suffix for .md and .json")
    parser.add_argument("--quick", action="store_true", help="a tiny ViT and one round: check that it runs")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    found = find_settings(plan)
    sections = ["## Settings found\n\n" + settings_table(found) + "\n"]
    raw: dict = {"settings": {str(r): {n: list(v[:2]) if v[2] else v[0] for n, v in s.items()} for r, s in found.items()}}
    for ratio in RATIOS:
        settings = [(plan["model"], batch, plan["rounds"][batch]) for batch in plan["settings"]]
        more, rows = evaluation_sections(settings, lambda model, batch: models_at(plan, found[ratio], batch))
        sections += [text.replace("## ", f"## FLOPs ratio {ratio:.2f}: ", 1) for text in more]
        raw.update({f"ratio {ratio:.2f}, {title}": value for title, value in rows.items()})
    text, rows = training_section(plan, found[TRAIN_RATIO])
    sections.append(text)
    raw[f"ratio {TRAIN_RATIO:.2f}, {plan['model']}, training, batch {plan['train_batch']}"] = rows
    write_report(args.output, "Every token-reduction method beside timm at matched FLOPs, fp32, cpu", (
        "Each method at its knob's setting closest to the FLOPs ratio (executed path on one random image). "
        "speedup: median over rounds of (img/s / timm's img/s), measured in turn within each round. "
        "efficiency = speedup x FLOPs ratio (1.0: every saved FLOP became time)."), sections, raw)


if __name__ == "__main__":
    main()
