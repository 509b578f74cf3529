"""Segmentation task folders: open_segmentation_task on train.txt / val.txt / test.txt of random
lines, and is_segmentation_task on the same folders; a task whose pairs name images and masks inside
it (by their paths' text, as for image tasks), or one sentence (detection: a yes or a no, never an
error)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from tieta.dense.dataset import SegmentationTask, is_segmentation_task, open_segmentation_task
from tieta.errors import TietaError

from .conftest import FUZZ_FEW, parsed_or_refused

PATHS = st.text(max_size=10) | st.sampled_from([
    "images/0.jpg", "images/1.jpg", "masks/0.png", "masks/1.png", "masks/small.png", "masks/rgb.png",
    "images/0.JPG", "../images/0.jpg", "images/../../a.png", "/etc/a.png", "//x.png", "images/./0.jpg",
    "masks//0.png", "a\x00b.png", "a\x1bb.png", "é.png", "\ufeffmasks/0.png", "~/x.png", "..", ".png",
    "x" * 300 + ".png", "link/out.png", "masks", "images/missing.jpg"])
LINE = (st.tuples(PATHS, st.sampled_from([" ", "\t", "  "]), PATHS).map(
            lambda parts: "".join(parts).encode("utf-8", "surrogatepass"))
        | st.binary(max_size=20)
        | st.sampled_from([b"", b"images/0.jpg masks/0.png extra", b"\xef\xbb\xbfimages/0.jpg masks/0.png",
                           b"images/0.jpg\xff masks/0.png", b"images/0.jpg masks/0.png\r",
                           b"images/0.jpg masks/" + b"x" * 300 + b".png"]))
GOOD_LINE = st.builds(lambda index: f"images/{index}.jpg masks/{index}.png".encode(), st.integers(0, 1))
LINES = st.tuples(st.lists(GOOD_LINE, max_size=4), st.lists(LINE, max_size=2)).flatmap(
    lambda parts: st.permutations(parts[0] + parts[1]))
LISTS = st.dictionaries(st.sampled_from(["train.txt", "test.txt", "val.txt"]), LINES, min_size=1, max_size=3)


def _pictures(root: Path) -> None:
    """Two 8 x 6 images with their masks, a mask of another size and a colour one."""
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for index in range(2):
        Image.new("RGB", (8, 6), (index * 90, 20, 30)).save(root / "images" / f"{index}.jpg")
        Image.fromarray(np.full((6, 8), index + 1, np.uint8)).save(root / "masks" / f"{index}.png")
    Image.new("L", (4, 4), 1).save(root / "masks" / "small.png")
    Image.new("RGB", (8, 6)).save(root / "masks" / "rgb.png")


@FUZZ_FEW
@given(LISTS)
def test_random_lists_give_a_task_or_one_sentence(lists):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "task"
        root.mkdir()
        _pictures(root)
        (root / "link").symlink_to(folder)  # a link out: followed, as for image tasks
        for name, lines in lists.items():
            (root / name).write_bytes(b"\n".join(lines))
        assert is_segmentation_task(root) in (True, False)
        found = parsed_or_refused(open_segmentation_task, root)
        if isinstance(found, TietaError):
            return
        assert isinstance(found, SegmentationTask) and found.num_classes >= 1 and "train.txt" in lists
        for split in ("train", "test", "val"):
            pairs = parsed_or_refused(found.split, split)
            if isinstance(pairs, TietaError):
                continue
            for image, mask in pairs:
                for path in (image, mask):
                    inside = os.path.normpath(os.path.relpath(path, found.root))
                    assert inside != os.pardir and not inside.startswith(os.pardir + os.sep), path
                    assert path.is_file()
