"""safetensors files tieta reads back: checkpoints (read_tensors, read_checkpoint) and progress records
(read_record), from random bytes, from valid files with bits flipped, cut or re-headed, and from files
re-written by safetensors itself with other metadata, with and without a matching checksum."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import save

from tieta.errors import TietaError
from tieta.train.checkpoint import (CHECKSUM_KEY, CONFIG_KEY, NUM_CLASSES_KEY, checksum, read_checkpoint,
                                    read_tensors, write_tensors)
from tieta.train.progress import FORMAT, Progress, read_record

from .conftest import FUZZ, FUZZ_FEW, parsed_or_refused

TENSORS = {"head.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "head.bias": torch.ones(2),
           "step": torch.tensor(3, dtype=torch.int64), "mask": torch.tensor([True, False])}
CHECKPOINT_METADATA = {CONFIG_KEY: json.dumps({"model": "vit_tiny_patch16_224", "optim": {"lr": 1e-3}}),
                       NUM_CLASSES_KEY: "2"}
PROGRESS_METADATA = {"tieta_format": FORMAT, "epoch": "3", "best": json.dumps({"acc": 0.5, "epoch": 2}),
                     "records": json.dumps([{"epoch": 1}, {"epoch": 2}]), "settings": json.dumps({"seed": 0}),
                     "data": "2 classes, 4 images, sha256 0123456789abcdef"}


def _valid(metadata: dict[str, str]) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "file.safetensors"
        write_tensors(TENSORS, path, metadata)
        return path.read_bytes()


VALID_CHECKPOINT = _valid(CHECKPOINT_METADATA)
VALID_PROGRESS = _valid(PROGRESS_METADATA)


def _read_all(data: bytes):
    """Every reader on one file's bytes: each gives its value or one sentence."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "file.safetensors"
        path.write_bytes(data)
        found = parsed_or_refused(read_tensors, path)
        if not isinstance(found, TietaError):
            tensors, metadata = found
            assert all(isinstance(key, str) and isinstance(value, str) for key, value in metadata.items())
        parsed_or_refused(read_tensors, path, require_checksum=False)
        parsed_or_refused(read_checkpoint, path)
        record = parsed_or_refused(read_record, path)
        assert isinstance(record, (Progress, TietaError))
        if isinstance(record, Progress):
            assert record.epoch >= 0 and isinstance(record.data, str)
        return found


def test_the_valid_files_read():
    assert isinstance(_read_all(VALID_CHECKPOINT), tuple)
    assert _read_all(VALID_PROGRESS)[1]["tieta_format"] == FORMAT


@FUZZ
@given(st.binary(max_size=200))
@example(b"")
@example(struct.pack("<Q", 2) + b"{}")
@example(struct.pack("<Q", 2**64 - 1) + b"{}")
@example(struct.pack("<Q", 100_000) + b"[" * 100_000)
@example(struct.pack("<Q", 30) + b'{"__metadata__": {"a": 1}}   ')
@example(struct.pack("<Q", 26) + b'{"__metadata__": ["a", 1]}')
@example(struct.pack("<Q", 4) + b"1e99")
def test_random_bytes_are_tensors_or_one_sentence(data):
    _read_all(data)


@FUZZ
@given(st.sampled_from([VALID_CHECKPOINT, VALID_PROGRESS]),
       st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=7)), min_size=1, max_size=4))
def test_flipped_bits_are_refused_or_harmless(valid, flips):
    data = bytearray(valid)
    for position, bit in flips:
        data[position % len(data)] ^= 1 << bit
    _read_all(bytes(data))


@FUZZ
@given(st.sampled_from([VALID_CHECKPOINT, VALID_PROGRESS]), st.integers(min_value=0))
def test_a_cut_file_is_one_sentence(valid, length):
    length %= len(valid)  # shorter than the whole
    assert isinstance(_read_all(valid[:length]), TietaError)


@FUZZ
@given(st.sampled_from([VALID_CHECKPOINT, VALID_PROGRESS]),
       st.integers(min_value=0, max_value=2**64 - 1) | st.integers(min_value=0, max_value=600))
def test_another_header_length_is_refused_or_harmless(valid, size):
    _read_all(struct.pack("<Q", size) + valid[8:])


# metadata that safetensors itself would write: text keys and values, some of them JSON
_TEXT = st.text(st.characters(codec="utf-8"), max_size=30)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | _TEXT,
                     lambda children: st.lists(children, max_size=3) | st.dictionaries(_TEXT, children, max_size=3),
                     max_leaves=10)
JSON_TEXT = (_JSON.map(json.dumps) | _TEXT
             | st.sampled_from(["[" * 10_000, "[" * 40 + "]" * 40, "NaN", "1e999", "1" * 5000, "", "null", "[]",
                                '{"acc": NaN}', "²", "٣", "1" * 30, "-1", "00", " 1", "\ud7ff"]))
KEYS = st.sampled_from([CONFIG_KEY, NUM_CLASSES_KEY, CHECKSUM_KEY, "format", *PROGRESS_METADATA]) | _TEXT


def _resaved(metadata: dict[str, str], with_checksum: bool) -> bytes:
    metadata = dict(metadata)
    metadata.pop(CHECKSUM_KEY, None)
    if with_checksum:
        metadata[CHECKSUM_KEY] = checksum(TENSORS, metadata)
    return save(TENSORS, metadata=metadata)


@FUZZ
@given(st.sampled_from([CHECKPOINT_METADATA, PROGRESS_METADATA]), st.dictionaries(KEYS, JSON_TEXT, max_size=4),
       st.booleans())
@example(PROGRESS_METADATA, {"epoch": "²"}, True)
@example(PROGRESS_METADATA, {"epoch": "1" * 5000}, True)
@example(PROGRESS_METADATA, {"best": "[" * 10_000}, True)
@example(PROGRESS_METADATA, {"records": '[{"a": 1}, 2]'}, True)
@example(PROGRESS_METADATA, {"settings": "NaN"}, True)
@example(CHECKPOINT_METADATA, {NUM_CLASSES_KEY: "٣"}, True)
@example(CHECKPOINT_METADATA, {CONFIG_KEY: "[" * 10_000}, True)
def test_other_metadata_is_read_or_one_sentence(base, changes, with_checksum):
    _read_all(_resaved({**base, **changes}, with_checksum))


@FUZZ_FEW
@given(st.sampled_from([CHECKPOINT_METADATA, PROGRESS_METADATA]),
       st.lists(st.sampled_from(list({**CHECKPOINT_METADATA, **PROGRESS_METADATA})), max_size=3))
def test_metadata_with_entries_left_out_is_one_sentence_or_read(base, removed):
    _read_all(_resaved({key: value for key, value in base.items() if key not in removed}, True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
                                   torch.bool, torch.float8_e4m3fn, torch.float8_e5m2])
def test_tensors_of_every_type_safetensors_writes_read(dtype):
    tensors = {"x": torch.zeros(2, 2, dtype=dtype), "empty": torch.zeros(0, 3, dtype=dtype)}
    metadata = {"format": "pt"}
    metadata[CHECKSUM_KEY] = checksum(tensors, metadata)
    found = _read_all(save(tensors, metadata=metadata))
    assert isinstance(found, tuple) and found[0]["x"].dtype == dtype


def _header(data: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), data[8 + size:]


def _with_header(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL",
                          "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "E8M0", "", "f32"])
ENTRY = st.fixed_dictionaries({}, optional={
    "dtype": DTYPES | _JSON,
    "shape": st.lists(st.integers(min_value=-1, max_value=8) | st.sampled_from([2**31, 2**63, 2**64]), max_size=3)
    | _JSON,
    "data_offsets": st.lists(st.integers(min_value=0, max_value=80) | st.sampled_from([-1, 2**63, 2**64]),
                             max_size=3) | _JSON,
    "other": _JSON,
})


@FUZZ
@given(st.sampled_from([VALID_CHECKPOINT, VALID_PROGRESS]), st.sampled_from([*TENSORS, "new", "__metadata__"]),
       ENTRY | _JSON, st.booleans())
def test_a_header_with_an_entry_changed_is_refused_or_harmless(valid, name, entry, merge):
    """Each tensor's dtype, shape and offsets (and the metadata entry itself) replaced or changed."""
    header, body = _header(valid)
    if merge and isinstance(entry, dict) and isinstance(header.get(name), dict):
        header[name] = {**header[name], **entry}
    else:
        header[name] = entry
    _read_all(_with_header(header, body))
