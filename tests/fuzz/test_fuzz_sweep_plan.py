"""Sweep files: read_plan and plan_from_dict give a plan or one sentence for any mapping or text."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from tieta.sweep.plan import SweepPlan, plan_from_dict, read_plan
from tieta.train.config import load_config

from .conftest import FUZZ, FUZZ_FEW, parsed_or_refused

NAMES = st.sampled_from(["cifar", "caltech101", "dtd", "lora", "pyra-lora", "a.b", ".", "..", "-x", "a/b", "",
                         " ", "é", "a\nb", "seed0", "x" * 300]) | st.text(max_size=8)
_scalars = (st.none() | st.booleans() | st.integers(min_value=-3, max_value=2**70) | st.floats()
            | NAMES)
ANY = st.recursive(_scalars, lambda children: st.lists(children, max_size=3)
                   | st.dictionaries(NAMES, children, max_size=3), max_leaves=8)
TASK = NAMES | st.fixed_dictionaries({"name": ANY}, optional={
    "path": ANY, "group": ANY, "classes": ANY, "other": ANY}) | ANY
SETTINGS = st.dictionaries(st.sampled_from(["method", "optim.lr", "optim", "lr_groups", "optim.lr_groups", "seed",
                                            "data.path", "data", "merge.schedule"]) | NAMES | st.integers(), ANY,
                           max_size=3)
# plans that are nearly what the documentation shows, so that most get as far as their settings
GOOD_NAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,8}", fullmatch=True)
GOOD_TASK = GOOD_NAME | st.fixed_dictionaries({"name": GOOD_NAME}, optional={
    "path": st.text(max_size=8), "group": st.sampled_from(["natural", "specialized", "structured"]),
    "classes": st.integers(min_value=1, max_value=400)})
NEARLY = st.fixed_dictionaries({
    "tasks": st.lists(GOOD_TASK, min_size=1, max_size=3, unique_by=lambda task: task if isinstance(task, str)
                      else task["name"]),
    "runs": st.dictionaries(GOOD_NAME, SETTINGS, min_size=1, max_size=2),
}, optional={
    "seeds": st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=3, unique=True) | ANY,
    "base": SETTINGS, "root": st.text(max_size=8),
})
PLAN = NEARLY | st.fixed_dictionaries({}, optional={
    "root": ANY,
    "tasks": st.lists(TASK, max_size=3) | ANY,
    "seeds": st.lists(st.integers(min_value=-2, max_value=2**64) | ANY, max_size=3) | ANY,
    "base": SETTINGS | ANY,
    "runs": st.dictionaries(NAMES | st.integers() | st.none(), SETTINGS | ANY, max_size=3) | ANY,
    "unknown": ANY,
})


def _check(found):
    if isinstance(found, SweepPlan):
        found.cells()  # a plan that was read can list its cells, each with a folder
        for cell in found.cells():
            cell.folder, cell.label, found.overrides(cell)
        found.to_dict()
        # a cell's settings are what its run's config is made of: a config or one sentence
        parsed_or_refused(load_config, overrides=found.overrides(found.cells()[0]))
    return found


@FUZZ
@given(PLAN | ANY)
@example({"tasks": ["cifar"], "runs": {"lora": {}}})
@example({"tasks": ["cifar"], "runs": {"lora": {"optim": {"lr_groups": {1: 2}}}}})
@example({"tasks": ["cifar"], "runs": {"lora": {1: 2}}})
@example({"tasks": ["cifar"], "runs": {1: {}}})
@example({"tasks": [{"name": "cifar", "classes": True}], "runs": {"lora": {}}})
@example({"tasks": [{"name": "cifar", "path": ["x"]}], "runs": {"lora": {}}})
@example({"tasks": [{"name": "cifar", "path": 5}], "runs": {"lora": {}}})
@example({"tasks": [{"name": ["cifar"]}], "runs": {"lora": {}}})
@example({"tasks": ["cifar"], "runs": {"lora": {}}, "root": ["x"]})
@example({"tasks": ["cifar"], "runs": {"lora": {}}, "root": 5})
@example({"tasks": ["cifar"], "runs": {"lora": {}}, "seeds": [0, True]})
@example({"tasks": ["cifar"], "runs": {"lora": {}}, "seeds": [[0]]})
@example({"tasks": ["cifar"], "runs": {"lora": {}}, "base": [1]})
def test_any_mapping_is_a_plan_or_one_sentence(values):
    _check(parsed_or_refused(plan_from_dict, values, "sweep.yaml"))


@FUZZ_FEW
@given(PLAN)
def test_any_sweep_file_is_a_plan_or_one_sentence(values):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sweep.yaml"
        try:
            path.write_text(yaml.safe_dump(values, allow_unicode=True))
        except (yaml.YAMLError, UnicodeEncodeError):
            return
        _check(parsed_or_refused(read_plan, path))
        _check(parsed_or_refused(read_plan, path, root=folder))


@FUZZ_FEW
@given(st.binary(max_size=120) | st.lists(st.sampled_from(
    ["tasks:", "runs:", "seeds:", "base:", "root:", " [cifar]", " {lora: {}}", " [0]", "\n", "  ", "- ", "name: ",
     "&a ", "*a", "<<: *a", ": ", "{", "}", "[", "]", "1", "-1", "2001-13-45", "!!int x", "0x" + "F" * 5000]),
    max_size=16).map(lambda pieces: "".join(pieces).encode()))
def test_any_text_in_a_sweep_file_is_a_plan_or_one_sentence(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sweep.yaml"
        path.write_bytes(data)
        _check(parsed_or_refused(read_plan, path))
