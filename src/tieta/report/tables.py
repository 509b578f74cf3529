"""Plain-text tables for the terminal."""

from __future__ import annotations

from typing import Any, Sequence


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, fmt)
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Render rows as an aligned table.

    Args:
        rows: one dict per row.
        columns: (key, header, float format) triples, e.g. ("acc", "acc %", ".2f").
    """
    cells = [[header for _, header, _ in columns]]
    cells += [[_cell(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(width) if i else text.ljust(width) for i, (text, width) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


SUMMARY_COLUMNS = (
    ("method", "method", ""),
    ("acc", "acc %", ".2f"),
    ("best_acc", "best %", ".2f"),
    ("trainable_percent", "trainable %", ".3f"),
    ("gmacs", "GMACs", ".3f"),
    ("eval_images_per_s", "eval img/s", ".1f"),
)
DEMO_COLUMNS = SUMMARY_COLUMNS + (("speedup", "speedup", ".2f"), ("activation_rate", "active tokens", ".2f"))
# an evaluation has no best epoch to report; it shows top-5 ("n/a" under 5 classes) and balanced accuracy
EVAL_COLUMNS = tuple(column for column in SUMMARY_COLUMNS if column[0] != "best_acc")
EVAL_COLUMNS = EVAL_COLUMNS[:2] + (("top5", "top-5 %", ".2f"), ("balanced_acc", "balanced %", ".2f")) + EVAL_COLUMNS[2:]

# a segmentation run's (summary "metric": "mIoU"): its headline "acc" is the mIoU, beside mAcc and aAcc
SEGMENTATION_COLUMNS = SUMMARY_COLUMNS[:1] + (("acc", "mIoU %", ".2f"), ("best_acc", "best mIoU %", ".2f"),
                                              ("mAcc", "mAcc %", ".2f"), ("aAcc", "aAcc %", ".2f")) + SUMMARY_COLUMNS[3:]
SEGMENTATION_EVAL_COLUMNS = tuple(column for column in SEGMENTATION_COLUMNS if column[0] != "best_acc")


def is_segmentation_result(row: dict[str, Any]) -> bool:
    """Whether a run's summary (or evaluation) scores segmentation: its headline is the mIoU."""
    return row.get("metric") == "mIoU"


def summary_columns(rows: Sequence[dict[str, Any]], evaluation: bool = False) -> tuple[tuple[str, str, str], ...]:
    """The columns of a run's table: a classifier's (top-1), or a segmentation run's (mIoU, mAcc,
    aAcc) where every row is one; ``evaluation``: without the best epoch (and with top-5)."""
    if rows and all(is_segmentation_result(row) for row in rows):
        return SEGMENTATION_EVAL_COLUMNS if evaluation else SEGMENTATION_COLUMNS
    return EVAL_COLUMNS if evaluation else SUMMARY_COLUMNS


# `tieta predict`: the best class of each image, its probability, and the next ones
PREDICT_COLUMNS = (
    ("image", "image", ""),
    ("class", "class", ""),
    ("probability", "p", ".3f"),
    ("next", "next classes", ""),
)

# `tieta predict` with a segmentation model: each image's mask file and its largest classes
MASK_COLUMNS = (
    ("image", "image", ""),
    ("mask", "mask", ""),
    ("classes", "largest classes (share of pixels)", ""),
)

# the one name of the PYRA paper's unit wherever it is shown (GMACs, MACs / 1e9, everywhere else)
PYRA_UNIT = "MACs/2^30 (PYRA paper's GFLOPs)"

# `tieta flops`: the unmodified model, then with the method, and the cost ratio between them
FLOPS_COLUMNS = (
    ("name", "model", ""),
    ("gmacs", "GMACs (MACs/1e9)", ".3f"),
    ("pyra_gflops", PYRA_UNIT, ".3f"),
    ("ratio", "ratio", ".3f"),
)

BENCH_COLUMNS = (
    ("name", "model", ""),
    ("gmacs", "GMACs", ".3f"),
    ("flops_ratio", "FLOPs ratio", ".3f"),
    ("images_per_s", "img/s", ".1f"),
    ("speedup", "speedup", ".3f"),
    ("speedup_range", "per round", ""),
    ("efficiency", "efficiency", ".3f"),
    ("vs_tome", "PYRA / ToMe", ".3f"),
    ("vs_free_merge", "ToMe / free", ".3f"),
    ("ceiling_speedup", "ceiling speedup", ".3f"),
    ("ceiling_efficiency", "ceiling efficiency", ".3f"),
)
_OPTIONAL_BENCH_KEYS = {"speedup_range", "vs_tome", "vs_free_merge", "ceiling_speedup", "ceiling_efficiency"}


def bench_columns(rows: Sequence[dict[str, Any]], efficiency: bool = True) -> list[tuple[str, str, str]]:
    """The benchmark table's columns: the fixed ones (without efficiency where it means nothing, as
    for training steps), then the optional ones that some row fills."""
    return [column for column in BENCH_COLUMNS
            if (efficiency or column[0] != "efficiency")
            and (column[0] not in _OPTIONAL_BENCH_KEYS or any(column[0] in row for row in rows))]


# what the methods' facts (Method.describe) mean, for the terminal
FACT_LABELS = {
    "schedule": "merge schedule (r per block)",
    "token_counts": "tokens entering each block, then leaving the last",
    "mlp_token_counts": "tokens entering each block's MLP",
    "block_token_counts": "tokens entering each block (evaluation)",
}


def fact_label(key: str) -> str:
    """A readable name for a fact key of a run summary."""
    return FACT_LABELS.get(key, key.replace("_", " "))
