"""The sweep file ``tieta plan --output`` writes: one run per method that met the target, at its
setting, beside the unmodified model's (LoRA alone), ready for ``tieta sweep plan.yaml --data ...``.

Each method trains as the comparisons here train token reducers: with LoRA on qkv
(``METHOD+lora``). Runs are named by method and setting, e.g. ``evit-keep_rate0.453``. The file has
no tasks: ``tieta sweep`` takes them from ``--data`` (or add ``tasks:`` to it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from tieta.measure.target import Target
from tieta.sweep.plan import plan_from_dict, task_spec

BASELINE_RUN = "lora"
TRAINED_WITH = "lora"


def run_name(row: dict[str, Any]) -> str:
    """"evit-keep_rate0.453": the method, its knob's field and the scalar the setting came from."""
    field = str(row["knob"]).rsplit(".", 1)[-1]
    return f"{row['method']}-{field}{row['scalar']:g}"


def plan_sweep(rows: list[dict[str, Any]], model: str, weights: Optional[str], img_size: Optional[int]) -> dict:
    """The sweep file's values: base (model, weights, img_size where given), seeds [0], and the runs:
    LoRA alone, then every row that met the target."""
    base: dict[str, Any] = {"model": model}
    if weights is not None:
        base["weights"] = weights
    if img_size is not None:
        base["img_size"] = img_size
    runs: dict[str, Any] = {BASELINE_RUN: {"method": TRAINED_WITH}}
    for row in rows:
        if row.get("met") and row.get("knob") is not None:
            runs[run_name(row)] = {"method": f"{row['method']}+{TRAINED_WITH}", row["knob"]: row["setting"]}
    return {"seeds": [0], "base": base, "runs": runs}


def sweep_text(values: dict, target: Target, where: str, command: str) -> str:
    """The file's text: a header saying what made it, then the values (checked to read back as a sweep
    file, with a task standing in for those ``--data`` will give)."""
    plan_from_dict(values, "the plan", given_tasks=[task_spec("task", Path("task"))])
    header = (f"# tieta plan: each method at the setting that met {target.text()} on {where}\n"
              f"# made by: {command}\n"
              "# train every run on your tasks: tieta sweep THIS_FILE --data TASK_DIR... --output SWEEP_DIR\n")
    return header + yaml.safe_dump(values, sort_keys=False)
