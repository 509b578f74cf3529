"""Notes on a run that has barely learned, for the reading of ``train``, ``eval`` and ``report``.

A short run can end at chance without a word: the table shows an accuracy, and nothing says that
always answering the most frequent class would score about the same. Two notes say it, one line
each:

- the run's final accuracy is within ``NEAR_MAJORITY_POINTS`` (5) points of the majority-class
  accuracy of its eval split (or below it): it has barely learned;
- the learning rate never reached its base value: the warm-up (``optim.warmup_epochs``) is longer
  than the run (:func:`tieta.train.config.warmup_warning` says so when it starts).

A run's summary.json records both facts (``majority_acc``, ``lr_reached_base``); runs of an older
tieta without them are read from their task folder and settings instead.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Optional, Sequence

from tieta.files import is_number

# a final accuracy less than this many points above the majority class's is "barely learned"
NEAR_MAJORITY_POINTS = 5.0
LEARN_ADVICE = "train longer or raise the learning rate (see README: a short run that learns)"
WARMUP_ADVICE = ("give fewer warm-up epochs (optim.warmup_epochs), or leave them out for the default, "
                 "min(10, epochs // 10) (see README: Training)")
MAX_NAMED_TASKS = 4  # tasks a report's note names before it says how many more


def majority_accuracy(labels: Iterable[int]) -> Optional[float]:
    """Top-1 (%) of always answering the most frequent of ``labels`` (None where there are none)."""
    counts = Counter(int(label) for label in labels)
    if not counts:
        return None
    return 100.0 * counts.most_common(1)[0][1] / sum(counts.values())


def lr_reached_base(warmup_epochs: Optional[int], epochs: int) -> bool:
    """Whether the schedule (``tieta.train.optim.lr_multiplier``) reaches the base learning rate: its
    linear warm-up ends at the base value, and ends within the run only if it is no longer than it
    (None: the warm-up rule's, which always is)."""
    return warmup_epochs is None or warmup_epochs <= epochs


def near_majority(acc: Any, majority: Any) -> bool:
    """Whether a final accuracy is within ``NEAR_MAJORITY_POINTS`` of the majority class's, or below
    it (a split of one class, where the majority is 100%, has nothing to tell apart: never)."""
    return _percentage(acc) and _percentage(majority) and majority < 100 and acc < majority + NEAR_MAJORITY_POINTS


def _percentage(value: Any) -> bool:
    return is_number(value) and 0 <= value <= 100


def _majority_note(name: str, acc: float, majority: float, where: str = "") -> str:
    gap = acc - majority
    how = f"within {gap:.1f} points of" if gap >= 0 else f"{-gap:.1f} points below"
    return (f"note: {name} is {how} always answering the majority class ({majority:.1f}%){where}: it has barely "
            f"learned; {LEARN_ADVICE}")


def _lr_note(name: str, warmup: Optional[int] = None, epochs: Optional[int] = None) -> str:
    length = f" ({warmup} warm-up epochs in a {epochs}-epoch run)" if warmup is not None and epochs else ""
    return f"note: the learning rate of {name} never reached its base value{length}; {WARMUP_ADVICE}"


def run_notes(name: str, acc: Any, majority: Any, lr_reached: Any = True) -> list[str]:
    """The notes on one run or evaluation (none where it has learned): its final accuracy ``acc``
    against the majority class's ``majority`` (%), and whether its learning rate reached its base
    value. ``name`` is how the output names the run (its method)."""
    notes = []
    if near_majority(acc, majority):
        notes.append(_majority_note(name, float(acc), float(majority)))
    if lr_reached is False:
        notes.append(_lr_note(name))
    return notes


def summary_notes(summary: Mapping[str, Any]) -> list[str]:
    """The notes on a run's summary (``tieta train``'s reading)."""
    return run_notes(str(summary.get("method", "the run")), summary.get("acc"), summary.get("majority_acc"),
                     summary.get("lr_reached_base", True))


def _schedule(config: Mapping[str, Any]) -> tuple[Optional[int], Optional[int]]:
    """(warm-up epochs, epochs) of a run's config.yaml settings, None where they are not whole numbers."""
    optim = config.get("optim") if isinstance(config, Mapping) else None
    optim = optim if isinstance(optim, Mapping) else {}
    warmup, epochs = optim.get("warmup_epochs"), optim.get("epochs")
    whole = [value if type(value) is int else None for value in (warmup, epochs)]
    return whole[0], whole[1]


def _reached(record: Any) -> bool:
    """Whether a report record's learning rate reached its base value: its summary's word, else its
    settings' schedule (an older run), else assumed."""
    said = record.summary.get("lr_reached_base")
    if isinstance(said, bool):
        return said
    warmup, epochs = _schedule(record.config)
    return warmup is None or epochs is None or lr_reached_base(warmup, epochs)


def sweep_notes(records: Sequence[Any], majority: Mapping[str, float]) -> list[str]:
    """The notes of a report's reading, one line per run name (in the order of ``records``) whose
    final accuracy, the mean over its seeds, is near the majority class on some task, then one per
    run whose learning rate never reached its base value.

    Args:
        records: finished runs (``tieta.report.collect.RunRecord``: ``task``, ``run``, ``summary``,
            ``config``).
        majority: task -> majority-class accuracy (%) of its eval split, for runs whose summary does
            not record it (an older tieta's).
    """
    runs = list(dict.fromkeys(record.run for record in records))
    notes = []
    for run in runs:
        mine = [record for record in records if record.run == run]
        near = []
        for task in dict.fromkeys(record.task for record in mine):
            cells = [record for record in mine if record.task == task]
            accs = [record.summary.get("acc") for record in cells]
            shares = [record.summary.get("majority_acc") for record in cells]
            share = shares[0] if all(_percentage(s) for s in shares) and len(set(shares)) == 1 else majority.get(task)
            if all(_percentage(acc) for acc in accs) and accs:
                acc = sum(accs) / len(accs)
                if near_majority(acc, share):
                    near.append((task, acc, share))
        if len(near) == 1:
            task, acc, share = near[0]
            notes.append(_majority_note(run, acc, share, f" on {task}"))
        elif near:
            named = ", ".join(f"{task} ({acc:.1f}% vs {share:.1f}%)" for task, acc, share in near[:MAX_NAMED_TASKS])
            more = f" and {len(near) - MAX_NAMED_TASKS} more" if len(near) > MAX_NAMED_TASKS else ""
            notes.append(f"note: {run} is within {NEAR_MAJORITY_POINTS:g} points of always answering the majority "
                         f"class on {len(near)} task{'s' if len(near) != 1 else ''}, {named}{more}: it has barely "
                         f"learned there; {LEARN_ADVICE}")
    for run in runs:
        short = [record for record in records if record.run == run and not _reached(record)]
        if short:
            warmup, epochs = _schedule(short[0].config)
            notes.append(_lr_note(run, warmup, epochs))
    return notes
