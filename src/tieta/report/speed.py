"""Reading speeds timed side by side: which is fastest, and whether the timing tells them apart.

One definition everywhere (``tieta report``, ``tieta bench``, the demo): the fastest is the row of
the highest measured throughput, the img/s column of the table and the x axis of the plot. Each
row also has its per-round speedups (to the first row); two rows whose ranges of per-round speedups
overlap are not told apart by this timing, and the reading says "not resolved" instead of naming
one. With fewer than :data:`MIN_ROUNDS` rounds the range says too little, and nothing is ranked.
A busy machine (:func:`tieta.measure.load.busy`) is said too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from tieta.files import is_number
from tieta.measure.load import busy_note

MIN_ROUNDS = 5  # the fewest interleaved rounds whose range of speedups can rank two rows


def spread(row: Mapping[str, Any]) -> Optional[tuple[float, float]]:
    """(lowest, highest) per-round speedup of a row: from ``round_speedups``, else ``speedup_spread``
    (a kept measurement); None where it has neither."""
    for key in ("round_speedups", "speedup_spread"):
        values = row.get(key)
        if isinstance(values, (list, tuple)) and values and all(is_number(v) for v in values):
            return min(values), max(values)
    return None


def spread_text(row: Mapping[str, Any]) -> str:
    """The per-round speedups' range, "1.62-1.81x" ("-" where unknown)."""
    found = spread(row)
    return f"{found[0]:.2f}-{found[1]:.2f}x" if found else "-"


def overlap(first: Mapping[str, Any], second: Mapping[str, Any]) -> bool:
    """Whether two rows' per-round speedups overlap (or either is unknown): not told apart."""
    a, b = spread(first), spread(second)
    return a is None or b is None or (a[0] <= b[1] and b[0] <= a[1])


@dataclass
class Ranking:
    """The row of the highest throughput, and the rows this timing does not tell apart from it."""

    fastest: str
    unresolved: list[str] = field(default_factory=list)
    too_few_rounds: bool = False


def rank(rows: Mapping[str, Mapping[str, Any]], rounds: int) -> Optional[Ranking]:
    """Rank rows (name -> images_per_s, speedup, round_speedups or speedup_spread) by throughput.

    A row is not told apart from the fastest where their per-round speedups overlap, or where its
    median speedup is not below the fastest's (the two medians disagree); with fewer than
    :data:`MIN_ROUNDS` rounds, no row is. None where fewer than two rows have a throughput.
    """
    timed = {name: row for name, row in rows.items() if is_number(row.get("images_per_s"))}
    if len(timed) < 2:
        return None
    top = max(timed, key=lambda name: timed[name]["images_per_s"])
    others = [name for name in timed if name != top]
    if rounds < MIN_ROUNDS:
        return Ranking(top, others, too_few_rounds=True)
    mine = timed[top].get("speedup")
    unresolved = [name for name in others if overlap(timed[top], timed[name])
                  or not (is_number(mine) and is_number(timed[name].get("speedup")) and timed[name]["speedup"] < mine)]
    return Ranking(top, unresolved)


def fastest_text(rows: Mapping[str, Mapping[str, Any]], rounds: int, baseline: str,
                 label: Callable[[str], str] = str, per_s: str = "img/s") -> Optional[tuple[Optional[str], str]]:
    """(the fastest row, or None where it is not resolved; what to say of it), e.g.
    ("pyra low", "pyra low (512.3 img/s, 1.84x timm; per-round speedups 1.79-1.90x, clear of every
    other row's)"); None where fewer than two rows were timed. ``label`` names a row as the reading
    does; ``per_s``: the throughput's unit ("clips/s" for video runs)."""
    ranking = rank(rows, rounds)
    if ranking is None:
        return None
    if ranking.too_few_rounds:
        return None, (f"not resolved: only {rounds} round{'s' if rounds != 1 else ''} timed, and at least "
                      f"{MIN_ROUNDS} are needed to tell speeds apart by their spread (--rounds)")
    top = rows[ranking.fastest]
    if not ranking.unresolved:
        return ranking.fastest, (f"{label(ranking.fastest)} ({top['images_per_s']:.1f} {per_s}, {top['speedup']:.2f}x "
                                 f"{label(baseline)}; per-round speedups {spread_text(top)}, clear of every "
                                 "other's)")
    contenders = [ranking.fastest] + ranking.unresolved
    names = ", ".join(label(name) for name in contenders[:-1]) + f" and {label(contenders[-1])}"
    shown = "; ".join(f"{label(name)} {rows[name]['images_per_s']:.1f} {per_s}, per round {spread_text(rows[name])}"
                      for name in contenders)
    return None, f"not resolved between {names}: their per-round speedups overlap ({shown})"


def pair_text(first: str, second: str, rows: Mapping[str, Mapping[str, Any]], rounds: int) -> str:
    """Whether the timing tells two rows apart: "resolved (...)" or "not resolved (...)"."""
    ranges = f"per-round speedups {spread_text(rows[first])} and {spread_text(rows[second])}"
    if rounds < MIN_ROUNDS:
        return f"not resolved (only {rounds} rounds; {ranges})"
    return f"not resolved ({ranges} overlap)" if overlap(rows[first], rows[second]) else f"resolved ({ranges})"


EFFICIENCY_LINE = ("Efficiency = speedup / (the first row's GMACs / the row's GMACs), the speedup its FLOPs promise: "
                   "1.00 means every saved FLOP became time.")
CEILING_LINE = ("Ceiling: the same for timm's own layers timed at the merged token counts (merging for free), "
                "what this hardware allows.")


def bench_reading(rows: list[dict[str, Any]], rounds: int, load: Optional[Mapping[str, float]] = None,
                  efficiency: bool = True) -> list[str]:
    """``tieta bench``'s reading, one line each: the fastest row (or that it is not resolved), PYRA
    against ToMe at each schedule, what efficiency and the ceiling mean, and a busy machine."""
    by_name = {row["name"]: row for row in rows if "name" in row}
    lines = []
    if rows:
        found = fastest_text(by_name, rounds, rows[0]["name"])
        if found is not None:
            lines.append(f"Fastest: {found[1]}.")
    for name, row in by_name.items():
        partner = name.replace("pyra", "tome", 1)
        if name.startswith("pyra") and partner in by_name and is_number(row.get("vs_tome")):
            schedule = name.split(" ")[-1]
            lines.append(f"At {schedule}, PYRA runs at {row['vs_tome']:.2f}x ToMe's speed (median of per-round "
                         f"ratios): {pair_text(name, partner, by_name, rounds)}.")
    if efficiency and any("efficiency" in row for row in rows):
        lines.append(EFFICIENCY_LINE)
    if any("ceiling_speedup" in row for row in rows):
        lines.append(CEILING_LINE)
    note = busy_note(load)
    if note:
        lines.append(note)
    return lines


def timed_batch(throughput: Mapping[str, Any]) -> int:
    """The batch the runs were timed at: the asked ``batch_size``, or fewer where the task has fewer
    evaluation images (a latency is a pass of this batch)."""
    return int(throughput.get("timed_batch", throughput["batch_size"]))
