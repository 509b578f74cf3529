"""Every token-reduction method of the registry beside timm at matched FLOPs, on this machine.

ViT-S/16 (224 px, fp32, CPU) in evaluation: each method at the setting of its knob
(``tieta.methods.knob``) whose FLOPs come closest to 0.50 and to 0.29 of timm's
(``tieta.measure.matched.setting_for_flops``); a method whose knob cannot reach a ratio is listed
with the nearest it reaches and left out of that ratio's timing. DyT's cost follows what its
dispatchers learn, so its rho is searched here with the dispatchers calibrated to the rate (a share
rho of the tokens active in every layer, on 8 random images, as in ``benchmarks/baselines.py``)
instead of as attached untrained. All of a ratio's models
are timed side by side in one interleaved run, at batch 32 and batch 1.

    python benchmarks/reducers.py --output benchmarks/results/reducers_cpu

``--quick``: a tiny ViT (64 px), one round, to check that the script runs. Training step time and
peak memory are not measured here: the training suite (``tieta bench --train``) times LoRA and ToMe
models only.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import timm
import torch

from tieta.errors import TietaError
from tieta.measure.bench_suite import calibrate_dispatchers
from tieta.measure.matched import setting_for_flops, settings_with
from tieta.methods import registry
from tieta.report.bench_report import evaluation_sections, write_report

RATIOS = (0.50, 0.29)
FULL = {"model": "vit_small_patch16_224", "img_size": 224, "settings": [32, 1], "rounds": {32: 5, 1: 15}}
QUICK = {"model": "vit_tiny_patch16_224", "img_size": 64, "settings": [4, 1], "rounds": {4: 1, 1: 1}}


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
    write_report(args.output, "Every token-reduction method beside timm at matched FLOPs, fp32, cpu", (
        "Each method at its knob's setting closest to the FLOPs ratio (executed path on one random image). "
        "speedup: median over rounds of (img/s / timm's img/s), measured in turn within each round. "
        "efficiency = speedup x FLOPs ratio (1.0: every saved FLOP became time)."), sections, raw)


if __name__ == "__main__":
    main()
