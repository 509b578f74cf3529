"""Write the clip task of benchmarks/video_dtd10.yaml: vtab-mini's dtd10 photographs as 16-frame
clips that pan or zoom across each one (tieta.video.testdata.make_clip_task), 20 training and 10
test clips for each of the 10 texture classes, 128 x 128 pixels, MPEG-4.

    python benchmarks/make_clip_task.py [--source ../shared/data/vtab-mini/dtd10]
                                        [--output benchmarks/runs/clip_tasks/dtd10_clips]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tieta.errors import TietaError
from tieta.video.testdata import make_clip_task


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("../shared/data/vtab-mini/dtd10"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/runs/clip_tasks/dtd10_clips"))
    args = parser.parse_args()
    try:
        task = make_clip_task(args.output, args.source, classes=10, clips_per_class=20, test_clips_per_class=10,
                              frames=16, size=128)
    except TietaError as error:
        print(f"make_clip_task: {error}", file=sys.stderr)
        return 2
    print(f"wrote the clip task {task}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
