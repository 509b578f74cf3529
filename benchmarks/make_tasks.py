"""Write the made-up tasks of the video and segmentation benchmarks from vtab-mini's dtd10
photographs, their labels known by construction:

- ``clips`` (benchmarks/video_dtd10.yaml): 16-frame clips that pan or zoom across one photograph
  each (tieta.video.testdata.make_clip_task), 20 training and 10 test clips for each of the 10
  texture classes, 128 x 128 pixels, MPEG-4;
- ``segmentation`` (benchmarks/segmentation_dtd10.yaml): 224 x 224 pictures, one photograph as the
  background with a disc, a square and a triangle cut from three others pasted on it
  (tieta.dense.testdata.make_segmentation_task): 4 classes, 160 training and 40 validation
  pictures, ADE20K's layout.

    python benchmarks/make_tasks.py clips|segmentation [--source ../shared/data/vtab-mini/dtd10]
                                    [--output benchmarks/runs/made_tasks/<dtd10_clips|dtd10_shapes>]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tieta.dense.testdata import make_segmentation_task
from tieta.errors import TietaError
from tieta.video.testdata import make_clip_task

MADE = {
    "clips": ("dtd10_clips", lambda output, source: make_clip_task(
        output, source, classes=10, clips_per_class=20, test_clips_per_class=10, frames=16, size=128)),
    "segmentation": ("dtd10_shapes", lambda output, source: make_segmentation_task(
        output, source, train_images=160, test_images=40, width=224, height=224)),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=list(MADE))
    parser.add_argument("--source", type=Path, default=Path("../shared/data/vtab-mini/dtd10"))
    parser.add_argument("--output", type=Path, help="default: benchmarks/runs/made_tasks/<the task's name>")
    args = parser.parse_args()
    name, make = MADE[args.kind]
    try:
        task = make(args.output or Path("benchmarks/runs/made_tasks") / name, args.source)
    except TietaError as error:
        print(f"make_tasks: {error}", file=sys.stderr)
        return 2
    print(f"wrote the {args.kind} task {task}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
