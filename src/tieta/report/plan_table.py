"""``tieta plan``'s table and its reading: each method's setting for the target, what it measured,
and whether it met the target (:func:`tieta.measure.plan.plan`'s rows)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from tieta.measure.plan import BASELINE, short_setting
from tieta.measure.target import Target
from tieta.report.tables import format_table

PLAN_COLUMNS = (
    ("method", "method", ""),
    ("setting_text", "setting", ""),
    ("gmacs", "GMACs", ".3f"),
    ("flops_ratio", "FLOPs ratio", ".3f"),
    ("speedup", "speedup", ".2f"),
    ("speedup_range", "per round", ""),
    ("latency_ms", "latency ms", ".3g"),
    ("latency_range", "per round", ""),
    ("images_per_s", "img/s", ".1f"),
    ("met_text", "met", ""),
)


def setting_text(row: dict[str, Any]) -> str:
    """"evit.keep_rate=0.453"; "-" for the unmodified model and a method left out."""
    if row.get("knob") is None or row.get("setting") is None:
        return "-"
    return f"{row['knob']}={short_setting(row['setting'])}"


def _range(values: Optional[Sequence[float]], unit: str, digits: str) -> str:
    if not values:
        return "-"
    return f"{format(values[0], digits)}-{format(values[1], digits)}{unit}"


def plan_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned table: method, setting, GMACs, FLOPs ratio, speedup and its per-round
    range, latency (ms per forward pass of the batch) and its range, img/s, met (yes, no, or "left
    out" for a method without a knob; "*" beside it for a method timed with simulated decisions)."""
    shown = []
    for row in rows:
        met = "yes" if row.get("met") else ("no" if row.get("setting") is not None or row["method"] == BASELINE
                                           else "left out")
        shown.append({**row, "setting_text": setting_text(row),
                      "speedup_range": _range(row.get("speedup_spread"), "x", ".2f"),
                      "latency_range": _range(row.get("latency_spread"), "", ".3g"),
                      "met_text": met + (" *" if row.get("simulated") else "")})
    return format_table(shown, PLAN_COLUMNS)


def plan_reading(rows: list[dict[str, Any]], target: Target, where: str, rounds: int) -> str:
    """A few sentences: how many methods meet the target and which keeps the most of the model within
    it (the highest GMACs); each method that cannot, or is left out, in its own sentence; how the
    numbers were measured, and what the asterisk means.

    Args:
        where: the device and batch in words, e.g. "cpu, batch 32, fp32".
    """
    methods = [row for row in rows if row["method"] != BASELINE]
    met = [row for row in methods if row.get("met")]
    text = f"{len(met)} of {len(methods)} methods meet {target.text()} on {where}"
    if met:
        dearest = max(met, key=lambda row: row["gmacs"])
        text += (f"; the one that keeps the most of the model (the highest GMACs within the target) is "
                 f"{dearest['method']} at {setting_text(dearest)} ({dearest['gmacs']:.3f} GMACs), but which loses "
                 "the least accuracy is for training to tell (the sweep file)")
    text += "."
    notes = [row["note"] for row in methods if not row.get("met") and row.get("note")]
    if notes:
        text += " " + " ".join(note.rstrip(".") + "." for note in notes)
    if target.timed:
        text += (f" Timed: each setting beside the unmodified model in {rounds} interleaved rounds; speedup is the "
                 "median of the per-round ratios and 'per round' their range (a setting whose range straddles the "
                 "target may fall either side of it on another run); latency is one forward pass of the batch.")
    else:
        text += " GMACs are counted (the executed path of one image), so the settings meet the target exactly."
    if any(row.get("simulated") for row in methods):
        text += (" *: its cost follows what it learns; counted and timed with its decisions set to the rate its "
                 "training aims for (a trained model's rate varies by image).")
    return text
