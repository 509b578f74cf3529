"""JSON that tieta reads back: parse_json / read_json, a run's state.json, an export's tieta_export.json."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tieta.deploy.export import INFO_FILE, ExportInfo, read_info
from tieta.errors import TietaError
from tieta.files import MAX_JSON_DEPTH, parse_json, read_json
from tieta.train.config import RunConfig
from tieta.train.rundir import STATE, RunState, read_state

from .conftest import FUZZ, FUZZ_FEW, check_sentence, parsed_or_refused

JSON_PIECES = ["[", "]", "{", "}", ",", ":", '"', '"a"', "0", "-", "1e999", "-1e999", "1e-999", "NaN", "Infinity",
               "-Infinity", "true", "null", "\\u0000", '"\\ud800"', '"\\x"', "1" * 5000, " ", "\n", "\ufeff",
               "\x00", "01", ".5", "1.", "[" * 40, "]" * 40]
JSON_TEXT = st.text(max_size=80) | st.lists(st.sampled_from(JSON_PIECES) | st.text(max_size=2), max_size=20).map(
    "".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=15,
)
HOSTILE = {
    "deep arrays": "[" * 100_000,
    "deep closed arrays": "[" * 10_000 + "]" * 10_000,
    "deep objects": '{"a":' * 50_000,
    "just past the depth limit": "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1),
    "an overflowing number": "1e999",
    "NaN": "NaN",
    "-Infinity": "[-Infinity]",
    "5000 digits": "1" * 5000,
    "a lone surrogate": '"\\ud800"',
    "many values": "[" + "0," * 1_000_001 + "0]",
    "empty": "",
    "a BOM": "\ufeff{}",
}


def _parse(text, allow_nan: bool = False):
    found = parsed_or_refused(parse_json, text, "the file", allow_nan=allow_nan)
    if not isinstance(found, TietaError) and not allow_nan:  # strict: only finite numbers
        for number in _numbers(found):
            assert math.isfinite(number)
    return found


def _numbers(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)


@pytest.mark.parametrize("allow_nan", [False, True])
@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_json_is_a_value_or_one_sentence(text, allow_nan):
    _parse(text, allow_nan)
    _parse(text.encode("utf-8", "surrogatepass"), allow_nan)


@FUZZ
@given(JSON_TEXT, st.booleans())
def test_random_text_is_a_value_or_one_sentence(text, allow_nan):
    _parse(text, allow_nan)


@FUZZ
@given(st.binary(max_size=80))
@example(b'{"a": "\xff"}')
@example(b"\xef\xbb\xbf{}")
def test_random_bytes_are_a_value_or_one_sentence(data):
    _parse(data)


@FUZZ
@given(JSON_VALUES)
def test_what_json_writes_reads_back(value):
    text = json.dumps(value)
    found = _parse(text, allow_nan=True)
    if not isinstance(found, TietaError):
        assert json.dumps(found) == text


def _in_a_file(name: str, data: bytes, read):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / name).write_bytes(data)
        return read(Path(folder))


@FUZZ_FEW
@given(JSON_TEXT)
def test_json_files_are_a_value_or_one_sentence(text):
    _in_a_file("values.json", text.encode("utf-8", "surrogatepass"),
               lambda folder: parsed_or_refused(read_json, folder / "values.json", "the file"))


def test_json_that_is_not_a_readable_file_is_one_sentence(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 101)
    for path, limit in ((tmp_path / "missing.json", 100), (tmp_path, 100), (big, 100)):
        with pytest.raises(TietaError) as caught:
            read_json(path, "the file", limit=limit)
        check_sentence(caught.value)


# state.json: what tieta writes, and everything else
STATE_VALUES = st.fixed_dictionaries({}, optional={
    "state": st.sampled_from(["running", "finished", "failed", "interrupted", "empty", ""]) | JSON_VALUES,
    "reason": st.text(max_size=10) | JSON_VALUES,
    "epoch": st.integers() | JSON_VALUES,
    "epochs": st.integers() | JSON_VALUES,
}) | JSON_VALUES


def _state(data: bytes) -> RunState:
    state = _in_a_file(STATE, data, read_state)  # never raises: an unreadable state is a failed run
    assert isinstance(state, RunState) and isinstance(state.state, str) and isinstance(state.reason, str)
    state.describe()
    return state


@FUZZ_FEW
@given(STATE_VALUES)
@example({"state": "running", "epoch": 1e999})
@example({"state": "finished", "epoch": True})
@example({"state": ["finished"]})
@example({"state": {"a": 1}})
def test_any_state_json_is_a_run_state(values):
    _state(json.dumps(values).encode())


@FUZZ_FEW
@given(JSON_TEXT)
@example("[" * 100_000)
@example('{"state": "finished", "epoch": 1' + "0" * 5000 + "}")
@example('{"state": "finished", "epoch": NaN}')
def test_any_state_text_is_a_run_state(text):
    _state(text.encode("utf-8", "surrogatepass"))


# tieta_export.json
INFO_VALUES = st.fixed_dictionaries({}, optional={
    "format": st.integers(min_value=-1, max_value=3) | st.integers() | JSON_VALUES,
    # a version of two lines is a known case of its own (test_hostile_export_records_are_one_sentence)
    "tieta_version": (st.text(max_size=8) | JSON_VALUES).filter(
        lambda version: not isinstance(version, str) or not {"\n", "\r"} & set(version)),
    "model": st.just("vit_tiny_patch16_224") | JSON_VALUES,
    "method": st.just("lora") | JSON_VALUES,
    "num_classes": st.integers() | st.floats() | JSON_VALUES,
    "img_size": st.integers() | st.floats() | JSON_VALUES,
    "normalization": st.just("imagenet") | JSON_VALUES,
    "class_names": st.lists(JSON_VALUES, max_size=3) | JSON_VALUES,
    "config": st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3) | JSON_VALUES,
}) | JSON_VALUES
VALID_INFO = {"format": 1, "tieta_version": "0.1.0", "model": "vit_base_patch16_224", "method": "lora",
              "num_classes": 3, "img_size": 224, "normalization": "imagenet", "class_names": ["a", "b", "c"],
              "config": RunConfig().to_dict()}


def _info(data: bytes):
    found = _in_a_file(INFO_FILE, data, lambda folder: parsed_or_refused(read_info, folder))
    assert isinstance(found, (ExportInfo, TietaError))
    return found


@FUZZ_FEW
@given(INFO_VALUES)
@example(VALID_INFO)
@example({**VALID_INFO, "class_names": {"a": 1}})
@example({**VALID_INFO, "config": [["a", 1]]})
@example({**VALID_INFO, "config": "ab"})
def test_any_export_record_is_an_export_or_one_sentence(values):
    _info(json.dumps(values).encode())


@FUZZ_FEW
@given(JSON_TEXT | st.binary(max_size=40).map(lambda data: data.decode("latin-1")))
def test_any_export_text_is_an_export_or_one_sentence(text):
    _info(text.encode("utf-8", "surrogatepass"))


@FUZZ_FEW
@given(st.sampled_from(sorted(VALID_INFO)), JSON_VALUES | st.just("<removed>"))
def test_an_export_record_with_one_entry_changed_is_an_export_or_one_sentence(key, value):
    record = {**VALID_INFO, key: value}
    if value == "<removed>":
        del record[key]
    _info(json.dumps(record).encode())


@FUZZ_FEW
@given(st.dictionaries(st.sampled_from(["model", "method", "img_size", "data.normalization", "seed", "optim.lr"]),
                       JSON_VALUES, min_size=1, max_size=2))
def test_an_export_record_with_other_settings_is_an_export_or_one_sentence(changes):
    config = json.loads(json.dumps(VALID_INFO["config"]))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    _info(json.dumps({**VALID_INFO, "config": config}).encode())


def test_a_valid_export_record_reads():
    assert isinstance(_info(json.dumps(VALID_INFO).encode()), ExportInfo)


@pytest.mark.parametrize("text", [
    "[" * 100_000,
    json.dumps({**VALID_INFO, "num_classes": 1e999}),
    json.dumps({**VALID_INFO, "img_size": float("inf")}),
    json.dumps({**VALID_INFO, "format": 2, "tieta_version": "9\nnine"}),
], ids=["deep nesting", "infinite classes", "infinite size", "a version of two lines"])
def test_hostile_export_records_are_one_sentence(text):
    _info(text.encode())
