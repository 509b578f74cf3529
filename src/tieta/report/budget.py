"""``tieta report --budget``: the most accurate run that meets a speed or cost budget
(:mod:`tieta.measure.target`), on the device where the report timed the runs, and where the budget
falls on each plot's x axis.

The report's timing is of the trained models side by side (:mod:`tieta.report.sweep_bench`), so
its numbers are what a budget is read against: speedup is to the report's first run (the plan's
LoRA-alone run, the unmodified model's cost), latency is one forward pass of the timed batch
(batch / img/s), throughput the img/s column, GMACs the runs' counted cost.
"""

from __future__ import annotations

from typing import Any, Optional

from tieta.measure.target import Target, rate_unit
from tieta.report.aggregate import RunRow, run_label
from tieta.report.speed import timed_batch


def measured_of(row: RunRow, throughput: Optional[dict[str, Any]]) -> dict[str, float]:
    """What a run measured, in the keys a budget reads: gmacs, and where the report timed it
    speedup, images_per_s and latency_ms (one forward pass of the report's batch)."""
    found: dict[str, float] = {}
    if "gmacs" in row.facts:
        found["gmacs"] = row.facts["gmacs"]
    timed = ((throughput or {}).get("rows") or {}).get(row.run)
    if timed:
        found["speedup"] = timed["speedup"]
        found["images_per_s"] = timed["images_per_s"]
        found["latency_ms"] = 1000.0 * timed_batch(throughput) / timed["images_per_s"]
    return found


def _value_text(target: Target, measured: dict[str, float], unit: str = "image") -> str:
    value = measured[target.key]
    return {"speedup": f"{value:.2f}x", "latency": f"{value:.3g} ms", "throughput": f"{value:.1f} {rate_unit(unit)}",
            "gmacs": f"{value:.3f} GMACs"}[target.kind]


def budget_reading(rows: list[RunRow], throughput: Optional[dict[str, Any]], target: Target, headline: str,
                   unit: str = "image") -> str:
    """One paragraph: the most accurate run that meets ``target`` (with how many do), or why none is
    named: the budget needs a timing the report did not make, or no run meets it (the nearest named).
    ``unit``: what one input of the runs is ("image", or "clip": clips/s, GMACs per clip)."""
    rated = [row for row in rows if row.headline is not None]
    if target.timed and not (throughput or {}).get("rows"):
        return (f"Budget {target.flag()}: not read, since throughput was not measured (the report was made with "
                "--no-bench, or no task has every run finished); time the runs, or give a gmacs= budget.")
    measured = {row.run: measured_of(row, throughput) for row in rated}
    known = [row for row in rated if target.key in measured[row.run]]
    if not known:
        return f"Budget {target.flag()}: no run has a {target.key.replace('_', ' ')} to read it against."
    where = ""
    if target.timed:
        first = next(iter(throughput["rows"]))
        where = (f" on {throughput['machine']} ({throughput['device']}, batch {timed_batch(throughput)}"
                 + (f", speedup to {first}" if target.kind == "speedup" else "") + ")")
    meeting = [row for row in known if target.met(measured[row.run])]
    if not meeting:
        nearest = (max if target.higher_meets else min)(known, key=lambda row: measured[row.run][target.key])
        return (f"Budget {target.text(unit)}{where}: no run meets it; the nearest is {run_label(nearest)}, at "
                f"{_value_text(target, measured[nearest.run], unit)}.")
    best = max(meeting, key=lambda row: row.headline.mean)
    text = (f"Budget {target.text(unit)}{where}: {len(meeting)} of {len(known)} runs meet it; the most accurate of "
            f"them is {run_label(best)}, at {headline} {best.headline.text()}% and "
            f"{_value_text(target, measured[best.run], unit)}.")
    if target.kind == "speedup":
        timed = throughput["rows"][best.run]
        low, high = min(timed["speedup_spread"]), max(timed["speedup_spread"])
        if low < target.value:
            text += (f" Its per-round speedups ({low:.2f}-{high:.2f}x) reach below the budget, so another timing "
                     "may put it just under.")
    over = [row for row in known if row not in meeting and row.headline.mean > best.headline.mean]
    if over:
        top = max(over, key=lambda row: row.headline.mean)
        text += (f" More accurate but over the budget: {run_label(top)}, {top.headline.mean - best.headline.mean:.2f} "
                 f"points higher at {_value_text(target, measured[top.run], unit)}.")
    return text


def budget_x(target: Target, throughput: Optional[dict[str, Any]]) -> Optional[tuple[str, float]]:
    """Where the budget falls on a plot: ("throughput", img/s) or ("gmacs", GMACs); None where the
    report has no timing to place a speed budget on."""
    if target.kind == "gmacs":
        return "gmacs", target.value
    rows = (throughput or {}).get("rows") or {}
    if not rows:
        return None
    if target.kind == "throughput":
        return "throughput", target.value
    if target.kind == "latency":
        return "throughput", 1000.0 * timed_batch(throughput) / target.value
    first = next(iter(rows.values()))
    return "throughput", target.value * first["images_per_s"]
