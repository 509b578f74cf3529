"""Video task folders: open_video_task on train.txt / test.txt of random lines, and is_video_task on
the same folders; a task whose splits name clips inside it, or one sentence (detection: a yes or
a no, never an error)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tieta.data.vtab import Task
from tieta.errors import TietaError
from tieta.video.dataset import is_video_task, open_video_task

from .conftest import FUZZ_FEW, parsed_or_refused

PATHS = st.text(max_size=10) | st.sampled_from([
    "clips/a.mp4", "b.webm", "c.MKV", "d.avi", "e.jpg", "../a.mp4", "clips/../../a.mp4", "/etc/a.mp4", "//x.mp4",
    "clips/./a.mp4", "clips//a.mp4", "a\x00b.mp4", "a\x1bb.mp4", "é.mp4", "\ufeffa.mp4", "~/x.mp4", "..", ".mp4",
    "x" * 300 + ".mp4", "link/out.mp4"])
LABELS = st.integers(min_value=0, max_value=3).map(str) | st.text(max_size=4) | st.sampled_from(
    ["-1", "+1", "1.0", "²", "٣", "9" * 18, "9" * 19, "", "01"])
LINE = (st.tuples(PATHS, st.sampled_from([" ", "\t", "  "]), LABELS).map(
            lambda parts: "".join(parts).encode("utf-8", "surrogatepass"))
        | st.binary(max_size=20)
        | st.sampled_from([b"", b"a.mp4 0 extra", b"\xef\xbb\xbfa.mp4 0", b"a.mp4\xff 0", b"a.mp4 0\r"]))
GOOD_LINE = st.builds(lambda index, label: f"clips/{index}.mp4 {label}".encode(), st.integers(0, 30),
                      st.integers(0, 2))
LINES = st.tuples(st.lists(GOOD_LINE, max_size=6), st.lists(LINE, max_size=2)).flatmap(
    lambda parts: st.permutations(parts[0] + parts[1]))
LISTS = st.dictionaries(st.sampled_from(["train.txt", "test.txt", "val.txt"]), LINES, min_size=1, max_size=3)


@FUZZ_FEW
@given(LISTS)
def test_random_lists_give_a_task_or_one_sentence(lists):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "task"
        root.mkdir()
        (root / "link").symlink_to(folder)  # a way out of the task
        for name, lines in lists.items():
            (root / name).write_bytes(b"\n".join(lines))
        detected = is_video_task(root)
        assert detected in (True, False)
        found = parsed_or_refused(open_video_task, root)
        if isinstance(found, TietaError):
            return
        assert isinstance(found, Task) and found.num_classes >= 1 and "train.txt" in lists
        for split in ("train", "test", "val"):
            items = parsed_or_refused(found.split, split)
            if isinstance(items, TietaError):
                continue
            for path, label in items:
                assert 0 <= label < found.num_classes
                inside = os.path.relpath(os.path.realpath(path), os.path.realpath(found.root))
                assert inside != os.pardir and not inside.startswith(os.pardir + os.sep), path
