"""tieta.safe_yaml: any text is a value, PyYAML's own error or a refusal; a file is a value or one sentence."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from tieta import safe_yaml
from tieta.errors import TietaError

from .conftest import FUZZ, FUZZ_FEW, check_sentence, parsed_or_refused

# pieces that reach the corners of YAML: anchors, aliases, merges, tags (PyYAML's own, Python's,
# unknown ones), flow and block collections, complex keys, directives, scalars its constructors
# refuse (a 13th month, an empty !!int, a 5000-digit integer)
PIECES = [
    "&a ", "*a", "&b ", "*b", "<<: ", "<<: *a", "!!int ", "!!float ", "!!bool ", "!!null ", "!!str ",
    "!!binary ", "!!timestamp ", "!!set ", "!!omap ", "!!pairs ", "!!map ", "!!seq ", "!!merge ",
    "!!python/object:os.system ", "!!python/name:os.system ", "!custom ", "!<tag:x> ", "? ", "- ", ": ",
    "[", "]", "{", "}", ", ", "\n", "  ", "    ", "key", "key: ", "a: 1", "a: 2", "2001-13-45",
    "2001-01-01 00:00:00 +99:99", "2001-12-14t21:59:43.10-05:00", "0x", "0xFF", "0o17", "0b101", "1_000",
    "1:20:30", "1e999", "-1e999", ".nan", ".inf", "-.inf", "''", '""', "'it''s'", '"\\u00e9\\x00"',
    "|", ">", "|-", "#", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "---", "...", "~", "null", "yes", "no",
    "on", "=", "1" * 5000, "\t", "\ufeff", "\x85", "\u2028",
]

# text that PyYAML's emitter writes back faithfully (it folds a NEL or a line separator in a plain
# scalar into a space, and a BOM is read as a byte-order mark)
_TEXT = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp"), exclude_characters="\ufeff")
_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
            | st.text(_TEXT, max_size=20))
YAML_VALUES = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(_TEXT, max_size=8), children,
                                                                       max_size=4),
    max_leaves=20,
)

ADVERSARIAL = {
    "billion laughs": "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                      + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi")),
    "deep flow nesting": "[" * 100_000,
    "deep block nesting": "".join("  " * depth + "- \n" for depth in range(200)),
    "deep mapping nesting": "".join("  " * depth + "k:\n" for depth in range(200)),
    "alias inside its own collection": "a: &a [1, *a]",
    "alias of a mapping inside itself": "&m {x: *m}",
    "unknown alias": "a: *nothing",
    "repeated key": "a: 1\na: 2\n",
    "repeated key spelled differently": "1: x\n01: y\n",
    "merge then override": "base: &b {x: 1}\nrun:\n  <<: *b\n  x: 2\n",
    "merge of a scalar": "a: &s 1\nb:\n  <<: *s\n",
    "python object tag": "!!python/object/apply:os.system [echo hi]",
    "a list as a key": "? [a, b]\n: 1\n",
    "a mapping as a key": "{? {a: 1} : 2}",
    "13th month": "2001-13-45",
    "timezone past a day": "when: 2001-01-01 00:00:00 +99:99",
    "empty integer": "!!int ''",
    "empty float": "!!float ''",
    "not a bool": "!!bool maybe",
    "not a timestamp": "!!timestamp soon",
    "not an integer": "!!int 0x",
    "not base64": "!!binary é",
    "5000 digits": "1" * 5000,
    "a huge hexadecimal": "0x" + "F" * 5000,
    "many documents": "a: 1\n---\nb: 2\n",
    "a NUL character": "a: \x00",
    "a lone surrogate": "a: \ud800",
}


def _check_loads(text: str):
    """safe_yaml.loads: a value, or a yaml.YAMLError (which the callers turn into one sentence)."""
    try:
        return safe_yaml.loads(text)
    except yaml.YAMLError as error:
        assert safe_yaml.describe(error).strip()
        assert "\n" not in safe_yaml.describe(error)
        return error


@pytest.mark.parametrize("text", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_adversarial_snippets_are_values_or_yaml_errors(text):
    _check_loads(text)


@pytest.mark.parametrize("text", ["a: &a [1, *a]", "[" * 100_000, "a: 1\na: 2\n",
                                  "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                                  + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n"
                                            for p, n in zip("abcdefgh", "bcdefghi"))])
def test_the_documented_limits_are_refusals(text):
    with pytest.raises(safe_yaml.RefusedYAML):
        safe_yaml.loads(text)


@FUZZ
@given(st.text(max_size=200))
def test_random_text_is_a_value_or_a_yaml_error(text):
    _check_loads(text)


@FUZZ
@given(st.lists(st.sampled_from(PIECES) | st.text(max_size=3), max_size=25).map("".join))
def test_yaml_like_text_is_a_value_or_a_yaml_error(text):
    _check_loads(text)


@FUZZ
@given(YAML_VALUES, st.booleans())
def test_structured_yaml_reads_back_as_written(value, flow):
    text = yaml.safe_dump(value, default_flow_style=flow, allow_unicode=True)
    assert safe_yaml.loads(text) == value


@FUZZ
@given(YAML_VALUES, st.sampled_from(["&x ", "!!str ", "!!set ", "!!omap ", "? ", "*x", "<<: *x\n"]))
def test_structured_yaml_with_a_piece_inserted_is_a_value_or_a_yaml_error(value, piece):
    text = yaml.safe_dump(value, default_flow_style=False, allow_unicode=True)
    for position in (0, len(text) // 2, len(text)):
        _check_loads(text[:position] + piece + text[position:])


def _read(data: bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "settings.yaml"
        path.write_bytes(data)
        return parsed_or_refused(safe_yaml.read_file, path, "config file")


@FUZZ_FEW
@given(st.binary(max_size=200))
@example(b"\xff\xfe a: 1")
@example(b"a: \xc3\x28")
@example(b"\xef\xbb\xbfa: 1")
@example(b"a: 1\n\x80")
@example("a: 1\na: 2\n".encode())
@example(b"[" * 10_000)
def test_random_bytes_in_a_file_are_a_value_or_one_sentence(data):
    _read(data)


@FUZZ_FEW
@given(st.lists(st.sampled_from(PIECES) | st.text(max_size=3), max_size=25).map("".join))
def test_yaml_like_files_are_a_value_or_one_sentence(text):
    _read(text.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("text", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_adversarial_files_are_a_value_or_one_sentence(text):
    _read(text.encode("utf-8", "surrogatepass"))


def test_what_is_not_a_readable_file_is_one_sentence(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (safe_yaml.MAX_BYTES + 1))
    for path in (tmp_path / "missing.yaml", tmp_path, big):
        with pytest.raises(TietaError) as caught:
            safe_yaml.read_file(path, "config file")
        check_sentence(caught.value)


def test_non_finite_floats_are_values():
    # refusing them is the config checks' task, with the key's name
    value = safe_yaml.loads("a: 1.0e+999\nb: -.inf\nc: .nan\n")
    assert value["a"] == math.inf and value["b"] == -math.inf and math.isnan(value["c"])
