"""Choosing by budget: for each token-reduction method, the setting of its knob that meets a speed or
cost target (:mod:`tieta.measure.target`) on this device, measured.

Every method declares one knob in the registry (``tieta.methods.knob.Knob``: its range, which end is
cheaper, how a scalar becomes a setting). For a ``gmacs`` target the knob is bisected on counted
FLOPs (deterministic, as :mod:`tieta.measure.matched` does); for a timed target (speedup, latency,
throughput) each probe is timed side by side with the unmodified model, in interleaved rounds
(:func:`tieta.measure.benchmark.interleaved_rates`), and the bisection keeps the dearest setting
whose median meets the target. Cost falls monotonically towards the knob's cheap end, so the
search needs no more than ``2 + steps`` timings per method; the chosen setting's row carries the
per-round spread of its own timing, so the table shows how sure the measurement is.

Methods whose cost follows what they learn (``Method.trained_decisions``: DyT's dispatchers) are
counted and timed with the decisions their training drives toward (a share rho of the tokens active
in every layer), on the timed images; the row says so. A method whose cheapest setting does not meet
the target gets one sentence saying so, with what that setting measured.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from tieta.backbone import load_backbone
from tieta.device import resolve_device
from tieta.errors import TietaError
from tieta.measure.benchmark import Progress, interleaved_rates
from tieta.measure.flops import count_flops
from tieta.measure.matched import accepted_range, attached_at, knob_of
from tieta.measure.target import Target, parse_target
from tieta.methods import registry

# (models: name -> model on the device, progress) -> name -> calls per second in each round, the
# models timed in turn within each round (tests give a deterministic one)
Rates = Callable[[dict[str, nn.Module], Optional[Progress]], dict[str, list[float]]]
SPEED_STEPS = 6  # timed bisection steps: 1/64 of a continuous knob's range, a whole step of a count
FLOPS_STEPS = 20  # counted bisection steps (cheap, exact)
DECIMALS = 4  # a continuous knob's probes are rounded to this many decimals (readable settings)
BASELINE = "unmodified"
SIMULATED = "timed with its decisions at the rate its training aims for (no trained model yet)"


def model_rates(images: torch.Tensor, dtype: Optional[torch.dtype], rounds: int) -> Rates:
    """Evaluation forward passes of ``images`` (B, 3, H, W, on the device) timed side by side."""
    device = images.device
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def rates(models: dict[str, nn.Module], progress: Optional[Progress]) -> dict[str, list[float]]:
        def step(model: nn.Module) -> Callable[[], None]:
            model.eval()

            def run() -> None:
                with torch.inference_mode(), autocast:
                    model(images)

            return run

        return interleaved_rates({name: step(model) for name, model in models.items()}, device, rounds,
                                 progress=progress)

    return rates


def timing(rates: list[float], baseline: list[float], batch_size: int) -> dict[str, Any]:
    """One candidate's timing beside the unmodified model's (calls/s per round, the same rounds).

    Returns:
        speedup (median of per-round ratios), round_speedups, speedup_spread (their min, max),
        latency_ms (median milliseconds per forward pass of the batch), latency_spread,
        images_per_s (median), baseline_latency_ms, baseline_images_per_s.
    """
    ratios = [mine / theirs for mine, theirs in zip(rates, baseline)]
    latencies = [1000.0 / rate for rate in rates]
    return {"speedup": statistics.median(ratios), "round_speedups": ratios,
            "speedup_spread": (min(ratios), max(ratios)), "latency_ms": statistics.median(latencies),
            "latency_spread": (min(latencies), max(latencies)),
            "images_per_s": statistics.median(rates) * batch_size,
            "baseline_latency_ms": statistics.median(1000.0 / rate for rate in baseline),
            "baseline_images_per_s": statistics.median(baseline) * batch_size}


def dearest_meeting(knob: Any, cheap: float, dear: float, meets: Callable[[float], bool],
                    steps: int) -> Optional[float]:
    """The dearest knob scalar between ``cheap`` and ``dear`` that meets the target (cost being
    monotone in the scalar), by bisection; None where even ``cheap`` does not meet it."""
    if not meets(cheap):
        return None
    if meets(dear):
        return dear
    for _ in range(steps):  # invariant: cheap meets, dear does not
        middle = round((cheap + dear) / 2) if knob.integer else round((cheap + dear) / 2, DECIMALS)
        if middle in (cheap, dear):
            break
        if meets(middle):
            cheap = middle
        else:
            dear = middle
    return cheap


def rounded(value: Any) -> Any:
    """A setting with its numbers to DECIMALS decimals (a geometric list's 0.44903401000000004 as
    0.449), as a sweep file shows it."""
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item) for item in value]
    return round(value, DECIMALS) if isinstance(value, float) else value


def short_setting(value: Any) -> str:
    """A setting as the table shows it: numbers to 3 significant digits."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {short_setting(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(short_setting(item) for item in value) + "]"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def chosen_methods(methods: Optional[list[str]]) -> list[str]:
    """The named methods (default: every token-reduction method of the registry), each checked."""
    known = registry.methods()
    reducers = [name for name, method in known.items() if method.reduces_tokens]
    if not methods:
        return reducers
    for name in methods:
        if name not in known:
            raise TietaError(f"unknown method {name!r}; the token-reduction methods are {', '.join(reducers)}")
        if name not in reducers:
            raise TietaError(f"{name} does not reduce tokens, so it has no setting to trade for speed; "
                             f"plan among {', '.join(reducers)}")
    return list(dict.fromkeys(methods))


class _Search:
    """One plan's shared parts: the unmodified model (on the CPU, for attaching and counting; a copy
    on the device for timing), the timed images, the rate function and the log."""

    def __init__(self, model: nn.Module, target: Target, batch_size: int, device: torch.device,
                 rates: Rates, log: Callable[[str], None]) -> None:
        self.model, self.target, self.batch_size, self.device = model.eval(), target, batch_size, device
        self.rates, self.log = rates, log
        size = int(model.patch_embed.img_size[0])
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch_size, 3, size, size, generator=generator)  # (B, 3, S, S), CPU
        self.timed_base = model if device.type == "cpu" else copy.deepcopy(model).to(device)
        self.base_gmacs = count_flops(model, self.images[:1])["gmacs"]
        self.baseline_rounds: list[float] = []

    def gmacs(self, name: str, scalar: float) -> float:
        one = self.images[:1]  # the count's image: a learned rate is set on it (Method.trained_decisions)
        return count_flops(attached_at(name, self.model, scalar, one), one)["gmacs"]

    def time(self, name: str, scalar: float, progress: Optional[Progress]) -> dict[str, Any]:
        candidate = attached_at(name, self.model, scalar, self.images).to(self.device)
        found = self.rates({BASELINE: self.timed_base, name: candidate}, progress)
        self.baseline_rounds += found[BASELINE]
        return timing(found[name], found[BASELINE], self.batch_size)


def _method_row(search: _Search, name: str, index: int, count: int, steps: int) -> dict[str, Any]:
    """Search one method's knob; its row (see :func:`plan`)."""
    method = registry.methods()[name]
    row: dict[str, Any] = {"method": name, "knob": None, "setting": None, "met": False,
                           "simulated": method.trained_decisions is not None}
    try:
        knob = knob_of(name)
    except TietaError:
        row["note"] = f"{name} declares no knob to search (its rates are set per block), so it is left out"
        search.log(f"[{index}/{count}] {name}: no knob, left out")
        return row
    row["knob"] = knob.key
    counted: dict[float, float] = {}

    def gmacs(scalar: float) -> float:
        if scalar not in counted:
            counted[scalar] = search.gmacs(name, scalar)
        return counted[scalar]

    cheap, dear = accepted_range(knob, gmacs)
    timed: dict[float, dict[str, Any]] = {}
    most = 2 + steps if search.target.timed else 1  # a counted target times its one setting once

    def measured(scalar: float) -> dict[str, Any]:
        if scalar not in timed:
            setting = f"{knob.key}={short_setting(knob.to_value(scalar))}"
            what = f"[{index}/{count}] {name}: {setting} (probe {len(timed) + 1} of at most {most})"

            def progress(done: int, rounds: int, left: float) -> None:
                if done < rounds:
                    search.log(f"{what}: round {done + 1} of {rounds}, about {left:.0f} s left")

            timed[scalar] = {"gmacs": gmacs(scalar), **search.time(name, scalar, progress)}
        return timed[scalar]

    if search.target.timed:
        chosen = dearest_meeting(knob, cheap, dear, lambda scalar: search.target.met(measured(scalar)), steps)
    else:
        chosen = dearest_meeting(knob, cheap, dear, lambda scalar: search.target.met({"gmacs": gmacs(scalar)}),
                                 FLOPS_STEPS)
    shown = cheap if chosen is None else chosen
    found = measured(shown)
    row.update({"setting": rounded(knob.to_value(shown)), "scalar": shown, **found,
                "flops_ratio": found["gmacs"] / search.base_gmacs, "met": chosen is not None,
                "probes": len(timed)})
    if chosen is None:
        row["note"] = (f"{name} cannot reach {search.target.text()} at any {knob.key}: its cheapest setting "
                       f"({short_setting(knob.to_value(cheap))}) measures {_measured_text(found, search.target)}")
    elif row["simulated"]:
        row["note"] = SIMULATED
    search.log(f"[{index}/{count}] {name}: {'met at' if chosen is not None else 'not reachable; cheapest'} "
               f"{knob.key}={short_setting(row['setting'])} ({_measured_text(found, search.target)})")
    return row


def _measured_text(found: dict[str, Any], target: Target) -> str:
    """What a probe measured, in the target's terms: "1.62x (1.55-1.70 per round)", "4.1 ms (...)"."""
    if target.kind == "gmacs":
        return f"{found['gmacs']:.3f} GMACs"
    if target.kind == "latency":
        low, high = found["latency_spread"]
        return f"{found['latency_ms']:.3g} ms ({low:.3g}-{high:.3g} per round)"
    if target.kind == "throughput":
        return f"{found['images_per_s']:.4g} img/s"
    low, high = found["speedup_spread"]
    return f"{found['speedup']:.2f}x ({low:.2f}-{high:.2f} per round)"


def plan(model: Union[str, nn.Module], target: Union[str, Target], methods: Optional[list[str]] = None,
         batch_size: int = 32, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
         img_size: Optional[int] = None, rounds: int = 5, steps: int = SPEED_STEPS,
         log: Optional[Callable[[str], None]] = None, rates: Optional[Rates] = None) -> list[dict[str, Any]]:
    """Each method's setting that meets ``target`` on ``device``, measured.

    Args:
        model: a timm ViT (not changed: each method goes on a copy), or a timm model name (built with
            random weights: speed does not depend on them).
        target: a :class:`~tieta.measure.target.Target` or its text, e.g. "speedup=2", "latency=5ms",
            "throughput=800", "gmacs=8.8".
        methods: registry names of token-reduction methods (default: all of them).
        batch_size: images per timed forward pass (the latency is of one such pass).
        dtype: None for float32, or an autocast dtype such as torch.bfloat16.
        img_size: the input size where ``model`` is a name (default: the model's).
        rounds: interleaved rounds of each timing.
        steps: timed bisection steps per method (the probes are at most ``2 + steps``).
        log: told what is measured, round by round (default: silent).
        rates: the timing (see :data:`Rates`); default: the models' evaluation passes on random images
            of the batch, side by side (:func:`model_rates`).

    Returns:
        One row per method, after the unmodified model's: method, knob (its ``--set`` key), setting
        (the config value), scalar, gmacs, flops_ratio, speedup, speedup_spread (per-round min, max),
        round_speedups, latency_ms (one forward pass of the batch, median), latency_spread,
        images_per_s, met (bool), simulated (its decisions were set to the rate its training aims
        for), probes (settings timed), note (why not met, or how it was timed). A method that cannot
        meet the target has its cheapest setting's measurement and met False.

    Raises:
        TietaError: a bad target, an unknown method or one that does not reduce tokens.
    """
    target = parse_target(target) if isinstance(target, str) else target
    names = chosen_methods(methods)
    say = log or (lambda text: None)
    device = resolve_device(str(device))
    if isinstance(model, str):
        torch.manual_seed(0)
        model = load_backbone(model, weights="random", img_size=img_size)
    else:  # the user's model stays as it was (its device, its training mode); methods attach on the CPU
        model = copy.deepcopy(model).cpu()
    search = _Search(model, target, batch_size, device, rates or model_rates_for(model, batch_size, device, dtype,
                                                                                 rounds), say)
    rows = [_method_row(search, name, index + 1, len(names), steps) for index, name in enumerate(names)]
    base_rounds = search.baseline_rounds
    baseline: dict[str, Any] = {"method": BASELINE, "knob": None, "setting": None, "gmacs": search.base_gmacs,
                                "flops_ratio": 1.0, "simulated": False}
    if base_rounds:  # every timing's baseline rounds together
        latencies = [1000.0 / rate for rate in base_rounds]
        baseline.update(speedup=1.0, latency_ms=statistics.median(latencies),
                        latency_spread=(min(latencies), max(latencies)),
                        images_per_s=statistics.median(base_rounds) * batch_size)
    baseline["met"] = target.met(baseline)
    return [baseline] + rows


def model_rates_for(model: nn.Module, batch_size: int, device: torch.device, dtype: Optional[torch.dtype],
                    rounds: int) -> Rates:
    """:func:`model_rates` on seeded random images of the model's size, on ``device``."""
    size = int(model.patch_embed.img_size[0])
    images = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return model_rates(images, dtype, rounds)
