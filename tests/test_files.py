"""The one writer and the readers every file of tieta goes through (tieta.files)."""

from __future__ import annotations

import json
import os

import pytest

from conftest import fill_disk
from tieta import TietaError
from tieta.files import (MANIFEST, WriteError, append_line, parse_json, read_json, read_regular, swap_folders,
                         write_file, write_owned)


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text("precious")
    return path


def test_write_file_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_file(target, "one")
    write_file(target, b"two")
    assert target.read_text() == "two" and os.listdir(tmp_path) == ["a.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("writer", [lambda p: write_file(p, "x"), lambda p: write_owned(p, "x"),
                                    lambda p: append_line(p, "x")], ids=["write_file", "write_owned", "append_line"])
def test_no_writer_follows_a_planted_link(tmp_path, victim, writer):
    target = tmp_path / "out.txt"
    target.symlink_to(victim)
    with pytest.raises(WriteError, match="symbolic link"):
        writer(target)
    assert victim.read_text() == "precious" and target.is_symlink()


def test_a_planted_temporary_name_is_neither_followed_nor_destroyed(tmp_path, victim):
    (tmp_path / "p.csv.partial").symlink_to(victim)  # where a fixed-name writer would have written
    (tmp_path / ".p.csv.tieta-partial").write_text("the user's")
    write_file(tmp_path / "p.csv", "rows")
    assert victim.read_text() == "precious" and (tmp_path / ".p.csv.tieta-partial").read_text() == "the user's"


def test_a_target_that_is_not_a_regular_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(WriteError, match="not a regular file"):
        write_file(tmp_path / "fifo", "x")


def test_write_owned_replaces_only_what_tieta_wrote_unchanged(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("the user's own notes")
    with pytest.raises(WriteError, match="was not written by tieta"):
        write_owned(target, "report")
    assert target.read_text() == "the user's own notes"
    target.unlink()
    write_owned(target, "report 1")
    write_owned(target, "report 2")  # its own file, unchanged: replaced
    assert target.read_text() == "report 2" and MANIFEST in os.listdir(tmp_path)
    target.write_text("report 2, edited by hand")  # now the user's
    with pytest.raises(WriteError, match="changed since"):
        write_owned(target, "report 3")
    assert target.read_text() == "report 2, edited by hand"


def test_a_real_full_disk_is_one_sentence_and_keeps_the_old_file(small_disk):
    target = small_disk / "sweep.yaml"
    write_owned(target, "old plan")
    fill_disk(small_disk)
    with pytest.raises(WriteError, match="No space left on device.*previous one is intact"):
        write_owned(target, "new plan " * 10_000)
    assert target.read_text() == "old plan"
    assert sorted(os.listdir(small_disk)) == sorted([MANIFEST, "filler.bin", "sweep.yaml"])


def test_swap_folders_exchanges_whole_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2").write_text("b")
    swap_folders(tmp_path / "a", tmp_path / "b")
    assert os.listdir(tmp_path / "a") == ["2"] and os.listdir(tmp_path / "b") == ["1"]


def test_read_regular_refuses_fifos_devices_and_oversized_files_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "summary.json")  # a reader that opened it plainly would wait for a writer forever
    with pytest.raises(TietaError, match="not a regular file"):
        read_regular(tmp_path / "summary.json", "run summary", 1 << 20)
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    with pytest.raises(TietaError, match="not a regular file"):
        read_json(tmp_path / "zero.json", "run summary")
    (tmp_path / "big.json").write_text("[" + "1," * 1000 + "1]")
    with pytest.raises(TietaError, match="more than the 100 tieta reads"):
        read_regular(tmp_path / "big.json", "run summary", 100)


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "levels deep"),
    ("[" * 40 + "]" * 40, "levels deep"),
    ('{"acc": NaN}', "not valid JSON"),
    ('{"acc": 1e999}', "not valid JSON"),
    ("{torn", "not valid JSON"),
    (b"\xff", "not UTF-8"),
])
def test_parse_json_refuses_what_tieta_never_writes_in_one_sentence(text, message):
    with pytest.raises(TietaError, match=message) as refused:
        parse_json(text, "a summary")
    assert "\n" not in str(refused.value)


def test_parse_json_reads_what_tieta_writes():
    value = {"acc": 92.5, "nested": [[1, 2], {"a": None}], "name": "pyra+lora"}
    assert parse_json(json.dumps(value), "a summary") == value
