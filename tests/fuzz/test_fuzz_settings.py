"""Run settings: ``--set KEY=VALUE``, load_config (file and overrides, then validate) and from_dict."""

from __future__ import annotations

import dataclasses
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from tieta.train.config import RunConfig, from_dict, load_config, parse_override

from .conftest import FUZZ, FUZZ_FEW, parsed_or_refused


def _dotted_fields(cls, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            names += _dotted_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            names.append(prefix + f.name)
    return names


FIELDS = _dotted_fields(RunConfig)  # every setting, e.g. "optim.lr", "lora.rank", "merge.schedule"
SECTIONS = sorted({name.rsplit(".", 1)[0] for name in FIELDS if "." in name})

# values as YAML or JSON would give them, with the edges of each type
_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
            | st.sampled_from([0, -1, 1, 2**32, 2**63, -(2**63), 10**400, 1e-300, float("inf"), float("nan"),
                               "", "auto", "cpu", "cuda:0", "lora", "lora+adapter", "pyra+lora", "tome", "low",
                               "high", "train", "test", "imagenet", "inception", "qkv", "random", "a.b", "+",
                               "lora+lora", "0", "1e-4", "[1, 2]", "\n", "\x00", "é" * 300])
            | st.text(max_size=12))
VALUES = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6) | st.sampled_from(FIELDS),
                                                                       children, max_size=4),
    max_leaves=12,
)

def _plausible(hint) -> st.SearchStrategy:
    """Values of the field's own type, near its limits, so that most overrides reach the checks."""
    args = typing.get_args(hint)
    if type(None) in args:
        return st.none() | _plausible(next(arg for arg in args if arg is not type(None)))
    if typing.get_origin(hint) is list:
        return st.lists(_plausible(args[0]), max_size=13)
    if typing.get_origin(hint) is dict:
        return st.dictionaries(st.sampled_from(["head", "lora", "adapter", "pyra", "x"]), _plausible(args[1]),
                               max_size=2)
    return {
        int: st.integers(min_value=-2, max_value=20) | st.sampled_from([0, 64, 224, 2**32, 2**40, 10**6]),
        float: st.floats(min_value=-1, max_value=2) | st.sampled_from([0.0, 1e-5, 1e-3, 0.5, 1.0, 1e9, -0.0]),
        bool: st.booleans(),
        str: st.sampled_from(["lora", "adapter", "tome", "pyra+lora", "dyt", "evit", "dynamicvit", "diffrate",
                              "cpu", "auto", "cuda:1", "imagenet", "inception", "train", "test", "val200", "qkv",
                              "qkv,proj", "attn", "mlp", "x"]),
    }.get(hint, VALUES)


def _plausible_for(name: str) -> st.SearchStrategy:
    section, _, leaf = name.rpartition(".")
    cls = RunConfig
    for part in filter(None, section.split(".")):
        cls = typing.get_type_hints(cls)[part]
    return _plausible(typing.get_type_hints(cls)[leaf])


PLAUSIBLE = st.sampled_from(FIELDS).flatmap(lambda name: st.tuples(st.just(name), _plausible_for(name)))
KEYS = st.sampled_from(FIELDS) | st.sampled_from(SECTIONS) | st.text(max_size=12) | st.lists(
    st.sampled_from(["optim", "data", "lora", "lr", "lr_groups", "head", "", " ", "x"]), min_size=1,
    max_size=4).map(".".join)


@FUZZ
@given(st.text(max_size=60))
@example("optim.lr=1" + "0" * 400)
@example("seed=0x" + "F" * 4000)
@example("seed=" + "9" * 5000)
@example("a=2001-13-45")
@example("a=!!int x")
@example("a=&a [*a]")
@example("a=" + "[" * 1000)
@example("=1")
@example(". =1")
def test_set_is_a_key_and_value_or_one_sentence(text):
    found = parsed_or_refused(parse_override, text)
    if isinstance(found, tuple):
        key, _ = found
        assert key and key == key.strip()


@FUZZ
@given(st.sampled_from(FIELDS) | KEYS, st.lists(st.text(max_size=4) | st.sampled_from(
    ["[", "]", "{", "}", ":", ",", "&a ", "*a", "!!int ", "!!float ", "!!python/object ", "1e999", ".nan", "0x1F",
     "2001-13-45", "null", "- ", "\n", "yes", "1" * 401]), max_size=10).map("".join))
def test_a_set_value_is_a_config_or_one_sentence(key, raw):
    """What --set reads goes on to load_config and validate: a config or one sentence."""
    found = parsed_or_refused(parse_override, f"{key}={raw}")
    if isinstance(found, tuple):
        parsed_or_refused(load_config, overrides=dict([found]))


@FUZZ
@given(st.dictionaries(KEYS, VALUES, max_size=5))
@example({"optim.lr": 10**400})
@example({"seed": 16**4000})
@example({"model": 16**4000})
@example({"optim.lr_groups": {"head": 10**400}})
@example({"optim": 1, "optim.lr": 1e-3})
@example({"data.path": None, "data": {"path": 1}})
def test_overrides_are_a_config_or_one_sentence(overrides):
    parsed_or_refused(load_config, overrides=overrides)


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4) | st.lists(PLAUSIBLE, max_size=4).map(dict))
def test_overrides_of_known_settings_are_a_config_or_one_sentence(overrides):
    """Known keys with values of any type: the type checks, then validate and each method's checks."""
    parsed_or_refused(load_config, overrides=overrides)


def _nested(flat: dict) -> dict:
    nested: dict = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        section = nested
        for parent in parents:
            section = section.setdefault(parent, {})
        section[leaf] = value
    return nested


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4).map(_nested) | VALUES)
def test_from_dict_is_a_config_or_one_sentence(values):
    parsed_or_refused(from_dict, RunConfig, values)


@FUZZ_FEW
@given(st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4).map(_nested) | VALUES,
       st.dictionaries(KEYS, VALUES, max_size=2))
def test_a_config_file_and_overrides_are_a_config_or_one_sentence(values, overrides):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        try:
            path.write_text(yaml.safe_dump(values, allow_unicode=True))
        except (yaml.YAMLError, UnicodeEncodeError):  # what YAML cannot write (NaN keys are fine, surrogates not)
            return
        parsed_or_refused(load_config, path, overrides=overrides)


ANY_TYPED = [name for name in FIELDS if name in ("merge.schedule", "pyra.lr", "diffrate.kept_prune",
                                                 "diffrate.kept_merge")]
METHODS = st.sampled_from(["lora", "adapter", "tome", "pyra+lora", "diffrate", "dyt", "evit", "dynamicvit",
                           "lora+tome", "pyra", "tome+pyra", "lora+lora", "", "+", "unknown"])
# integers past a float's range are a known case of their own (test_a_schedule_past_a_float_is_one_sentence)
_FLOAT_SIZED = st.recursive(
    _scalars.filter(lambda value: not (type(value) is int and abs(value) > 2**1000)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(["r", "inflection", "x"]),
                                                                       children, max_size=3),
    max_leaves=12,
)


@FUZZ
@given(METHODS, st.dictionaries(st.sampled_from(ANY_TYPED), _FLOAT_SIZED | st.lists(st.integers(), max_size=14)
                                | st.fixed_dictionaries({}, optional={"r": _FLOAT_SIZED, "inflection": _FLOAT_SIZED})
                                | st.sampled_from(["low", "high", "reference", "paper", 0, 8, 1e-4])
                                | st.lists(st.integers(min_value=0, max_value=20), min_size=12, max_size=12)
                                | st.fixed_dictionaries({"r": st.integers(0, 30), "inflection": st.floats(-1, 1)}),
                                min_size=1, max_size=3))
@example("tome", {"merge.schedule": "high\n"})
@example("tome", {"merge.schedule": {"r": 1e308, "inflection": float("nan")}})
@example("diffrate", {"diffrate.kept_prune": [2**70] * 12})
def test_settings_of_any_type_are_a_config_or_one_sentence(method, overrides):
    """The settings whose type is the method's to check (a schedule, PYRA's lr, DiffRate's counts)."""
    parsed_or_refused(load_config, overrides={"method": method, **overrides})


@pytest.mark.parametrize("value", ["{r: 1" + "0" * 400 + ", inflection: 0}",
                                   "{r: 8, inflection: 1" + "0" * 400 + "}"], ids=["r", "inflection"])
def test_a_schedule_past_a_float_is_one_sentence(value):
    key, value = parse_override(f"merge.schedule={value}")
    parsed_or_refused(load_config, overrides={"method": "tome", key: value})
