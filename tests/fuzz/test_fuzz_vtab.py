"""Task folders: open_task and Task.split on VTAB-1k list files of random lines, and on image folders
with random class names; a task whose splits name images inside it, or one sentence."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from tieta.data.vtab import VTAB_SPLITS, Task, open_task
from tieta.errors import TietaError

from .conftest import FUZZ_FEW, parsed_or_refused

LIST_FILES = sorted(set(VTAB_SPLITS.values()))
PATHS = st.text(max_size=10) | st.sampled_from([
    "images/train800val200/0.jpg", "images/test/1.png", "a.jpg", "../a.jpg", "images/../../a.jpg", "/etc/passwd",
    "//x", "images/./x.jpg", "images//x.jpg", "a\x00b", "a\x1bb", "a\x7fb", "é.jpg", "\u200b.jpg", "\ufeffa.jpg",
    "C:\\x.jpg", "~/x.jpg", "..", ".", "x" * 300])
LABELS = st.integers(min_value=0, max_value=4).map(str) | st.text(max_size=4) | st.sampled_from(
    ["-1", "-0", "+1", "1.0", "1e3", "²", "٣", "0x1", "9" * 18, "9" * 19, "9" * 5000, "", "one", "1_0", "01"])
LINE = (st.tuples(PATHS, st.sampled_from([" ", "\t", "  ", " \x0b "]), LABELS).map(
            lambda parts: "".join(parts).encode("utf-8", "surrogatepass"))
        | st.binary(max_size=20)
        | st.sampled_from([b"", b"   ", b"a.jpg 0 extra", b"\xef\xbb\xbfa.jpg 0", b"a.jpg\xff 0", b"\xc3\x28 0",
                           b"a.jpg 0\r", b"\x00 0"]))
# mostly lines tieta writes ("images/3.jpg 1"), a few of them replaced by anything
GOOD_LINE = st.builds(lambda index, label: f"images/{index}.jpg {label}".encode(), st.integers(0, 30),
                      st.integers(0, 2))
LINES = st.tuples(st.lists(GOOD_LINE, max_size=6), st.lists(LINE, max_size=2)).flatmap(
    lambda parts: st.permutations(parts[0] + parts[1]))
LISTS = st.dictionaries(st.sampled_from(LIST_FILES), LINES, min_size=1, max_size=4)
ENDINGS = st.sampled_from([b"\n", b"\r\n", b"\r"])


def _check_task(found, root: Path) -> None:
    """A task's every split: (path inside the task folder, label below the class count) pairs, or one sentence."""
    if isinstance(found, TietaError):
        return
    assert isinstance(found, Task) and found.num_classes >= 1
    for split in [*VTAB_SPLITS, "train", "test", "val", "", "../x"]:
        items = parsed_or_refused(found.split, split)
        if isinstance(items, TietaError):
            continue
        assert items
        for path, label in items:
            assert 0 <= label < found.num_classes
            inside = os.path.relpath(os.path.normpath(path), found.root)
            assert inside != os.pardir and not inside.startswith(os.pardir + os.sep), path


def _open(root: Path):
    found = parsed_or_refused(open_task, root)
    _check_task(found, root)
    return found


@FUZZ_FEW
@given(LISTS, ENDINGS)
@example({"train800val200.txt": [b"images/a.jpg 0", b"images/b.jpg 1"], "test.txt": [b"images/c.jpg 1"]}, b"\n")
@example({"train800val200.txt": [b"a.jpg 0", b"b.jpg 2"]}, b"\n")
@example({"train800val200.txt": [b"a.jpg 1"]}, b"\n")
@example({"train800.txt": [b"a.jpg 0"], "test.txt": [b"../../etc/passwd 0"]}, b"\n")
@example({"train800.txt": [b"a.jpg 0"], "val200.txt": [b"a.jpg \xc2\xb2"]}, b"\n")
@example({"train800val200.txt": [b"a.jpg " + b"9" * 5000]}, b"\n")
@example({"train800val200.txt": [b""]}, b"\n")
def test_list_files_of_random_lines_are_a_task_or_one_sentence(lists, ending):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "task"
        root.mkdir()
        for name, lines in lists.items():
            (root / name).write_bytes(ending.join(lines))
        _open(root)


@FUZZ_FEW
@given(st.lists(st.sampled_from(LIST_FILES), min_size=1, max_size=3, unique=True), st.sampled_from(LIST_FILES))
def test_a_folder_or_a_link_where_a_list_file_should_be_is_one_sentence(files, odd):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "task"
        root.mkdir()
        for name in files:
            (root / name).write_text("images/a.jpg 0\n")
        if (root / odd).exists():
            (root / odd).unlink()
        (root / odd).mkdir()
        _open(root)
        (root / odd).rmdir()
        (root / odd).symlink_to(root / "missing.txt")
        _open(root)


CLASS_NAMES = st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=12).filter(
    lambda name: name not in (".", "..") and len(name.encode()) < 200)


def _png(path: Path) -> None:
    Image.new("RGB", (2, 2), (255, 0, 0)).save(path)


@FUZZ_FEW
@given(st.lists(CLASS_NAMES, min_size=1, max_size=3, unique=True),
       st.lists(CLASS_NAMES, max_size=2, unique=True),
       st.lists(st.sampled_from(["a.png", "b.JPG", "c.txt", ".hidden.png", "d"]), max_size=2, unique=True))
def test_image_folders_with_random_class_names_are_a_task_or_one_sentence(classes, test_classes, files):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "task"
        for split, names in (("train", classes), ("test", test_classes)):
            for name in names:
                (root / split / name).mkdir(parents=True)
                for file in files:
                    (root / split / name / file).write_bytes(b"not an image")
                _png(root / split / name / "real.png")
        found = _open(root)
        if isinstance(found, Task):
            assert found.layout == "folder" and set(found.class_names) <= set(classes)


@FUZZ_FEW
@given(st.text(max_size=20) | st.sampled_from(["cifar", "oxford_pet", "", ".", "..", "/", "\x00"]))
def test_any_task_path_is_a_task_or_one_sentence(name):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "cifar100").mkdir()
        (Path(folder) / "a file").write_text("x")
        _open(Path(folder) / name)  # a NUL can come from a config file's data.path: "task\0"
