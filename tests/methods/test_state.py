"""One state object per patched model (``tieta.methods.state``).

Pinned here, on the small random ViTs of ``tests/conftest.py``:

- a patched model carries one ``ModelState`` and no other attribute of tieta's, whatever the methods;
- deep copies and pickles of a model right after a training pass carry no tensor of that pass (the
  pass states come as ``reset()`` leaves them, the kept queries and keys are dropped) and none of a
  run's objects (DiffRate's search optimizer);
- the accessors read what the methods recorded; ``model.<name>`` reads it too, read-only;
- no module of tieta writes a model's ``__dict__`` or sets a loose ``tieta_*`` attribute (read from
  the source files).
"""

from __future__ import annotations

import ast
import copy
import io
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from torch import nn

import tieta
from tieta.methods.blocks import KeepOutput
from tieta.methods.diffrate import METHOD as DIFFRATE, DiffRateConfig
from tieta.methods.diffrate_search import RateSearch
from tieta.methods.state import (STATE_ATTRIBUTE, ModelState, PassState, attention_gate, keep_run_object,
                                 method_setting, pass_state_named, pass_states, run_object, state_of)
from tests.conftest import make_vit

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "tieta"

# method -> attach it to a small ViT; each leaves per-pass tensors after a training pass
METHODS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "tome": lambda m: tieta.add_tome(m, r=[3, 2, 1]),
    "pyra": lambda m: tieta.add_pyra(m, r=[3, 2, 1]),
    "evit": lambda m: tieta.add_evit(m, keep_rate=0.5, locations=(1,)),
    "dynamicvit": lambda m: tieta.add_dynamicvit(m, ratios=(0.5,), locations=(1,)),
    "diffrate_search": lambda m: tieta.add_diffrate(m),
    "dyt_attn+lora": lambda m: tieta.add_lora(tieta.add_dyt(m, variant="attn", adapter_dim=4), rank=2),
    "dyt_mlp+tome+adapter": lambda m: tieta.add_tome(tieta.add_dyt(m, variant="mlp", adapter_dim=4), r=[2, 2, 2]),
    "spvit": lambda m: tieta.add_spvit(m, keep_rates=(0.5,), locations=(1,)),
    "fpet": lambda m: tieta.add_fpet(m, layers=[1], refine_dim=4),
    "tofu": lambda m: tieta.add_tofu(m, r=2),
    "pitome": lambda m: tieta.add_pitome(m, ratio=0.75),
    "mctf": lambda m: tieta.add_mctf(m, r=2),
    "dtem": lambda m: tieta.add_dtem(m, r=2, metric_dim=8),
    "atc": lambda m: tieta.add_atc(m, keep_rate=0.5, locations=(1,)),
}


def trained_pass(name: str) -> nn.Module:
    """A model with ``name`` attached, right after a training forward and backward pass."""
    model = METHODS[name](make_vit("plain")).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    return model


def tensors_in(value: object) -> list[torch.Tensor]:
    """The tensors a pass state field holds (directly or in a list / tuple)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    return []


def pickled_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor a pickle of ``model`` holds (each recorded, not written)."""
    seen: list[torch.Tensor] = []

    class Recording(pickle.Pickler):
        def persistent_id(self, obj: object):
            if isinstance(obj, torch.Tensor):
                seen.append(obj)
                return len(seen)
            return None

    Recording(io.BytesIO()).dump(model)
    return seen


@pytest.mark.parametrize("name", list(METHODS))
def test_a_patched_model_keeps_one_state_attribute(name):
    plain = make_vit("plain")
    before = set(plain.__dict__)
    model = trained_pass(name)
    assert set(model.__dict__) - before == {STATE_ATTRIBUTE}
    assert isinstance(state_of(model), ModelState)
    assert state_of(plain) is None and pass_states(plain) == ()


@pytest.mark.parametrize("name", list(METHODS))
def test_copies_and_pickles_after_a_training_pass_carry_no_tensor_of_that_pass(name):
    model = trained_pass(name)
    held = [id(t) for state in pass_states(model) for value in vars(state).values() for t in tensors_in(value)]
    assert held  # the pass left tensors behind in the original
    weights = {id(t) for t in list(model.parameters()) + list(model.buffers())}

    twin = copy.deepcopy(model)
    for state in pass_states(twin):
        assert all(not tensors_in(value) for value in vars(state).values())  # dataclass or not (MCTF's)
    assert all(module.__dict__["tieta_output"] is None for module in twin.modules() if isinstance(module, KeepOutput))
    # a pickle (torch.save's format) holds the weights and nothing else
    assert {id(t) for t in pickled_tensors(model)} <= weights
    assert held == [id(t) for state in pass_states(model) for value in vars(state).values()
                    for t in tensors_in(value)]  # the original keeps its own


def test_a_saved_model_loads_with_blank_pass_states_and_the_same_state_dict():
    model = trained_pass("dyt_attn+lora")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert pass_state_named(loaded, "dispatch_state").masks == []
    assert attention_gate(loaded) == attention_gate(model) is not None
    assert list(loaded.state_dict()) == list(model.state_dict())


def test_run_objects_stay_with_the_original():
    model = tieta.add_tome(make_vit("plain"), r=2)
    keep_run_object(model, "tome", torch.ones(3))
    assert run_object(copy.deepcopy(model), "tome") is None
    assert run_object(pickle.loads(pickle.dumps(model)), "tome") is None
    assert torch.equal(run_object(model, "tome"), torch.ones(3))
    keep_run_object(model, "tome", None)
    assert run_object(model, "tome") is None


def test_a_diffrate_search_keeps_its_optimizer_in_the_state_until_the_numbers_are_fixed():
    settings = SimpleNamespace(diffrate=DiffRateConfig(target_gmacs=1e-4, search_epochs=1),
                               methods=("diffrate",), optim=SimpleNamespace(epochs=2))
    model = DIFFRATE.attach(make_vit("plain"), settings).train()
    before = set(model.__dict__)
    DIFFRATE.epoch_update(model, settings, 0, 2)
    DIFFRATE.objective(settings)(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    search = run_object(model, "diffrate")
    assert isinstance(search, RateSearch) and set(model.__dict__) == before
    assert run_object(copy.deepcopy(model), "diffrate") is None
    DIFFRATE.epoch_update(model, settings, 1, 2)  # the search ends: the numbers are fixed
    assert run_object(model, "diffrate") is None


def test_accessors_and_model_attributes_read_what_the_methods_recorded():
    model = tieta.add_evit(tieta.add_dyt(make_vit("plain"), variant="mlp", adapter_dim=4, rho=0.3), keep_rate=0.6)
    assert method_setting(model, "dyt", "dyt_rho") == model.dyt_rho == 0.3
    assert method_setting(model, "evit", "evit_keep_rate") == model.evit_keep_rate == 0.6
    assert method_setting(model, "tome", "token_schedule", []) == []
    assert pass_state_named(model, "dispatch_state") is model.dispatch_state
    assert pass_state_named(model, "token_state") is model.token_state
    assert set(map(id, model.tieta_pass_states)) == set(map(id, pass_states(model)))
    assert all(isinstance(state, PassState) for state in pass_states(model))
    assert state_of(model).reduction == "EViT" and attention_gate(model) is None
    with pytest.raises(AttributeError, match="no_such_thing"):
        model.no_such_thing
    assert method_setting(make_vit("plain"), "dyt", "dyt_rho", "none") == "none"
    assert pass_state_named(make_vit("plain"), "token_state") is None


# --- the structure rule, read from the source files -------------------------------------------------

# (file, function) -> why it writes an instance dict: none of them is a model's
DICT_WRITES = {
    ("methods/blocks.py", "forward"): "KeepOutput keeps a q/k norm's last output (batch-1 latency)",
    ("methods/blocks.py", "__getstate__"): "KeepOutput's copies start without the kept output",
    ("methods/blocks.py", "keep_output"): "the q/k norm's kept-output slot",
    ("methods/blocks.py", "release_output"): "the q/k norm's kept-output slot",
    ("methods/state.py", "__getstate__"): "a blank copy of a pass state, reset before pickling",
    ("methods/state.py", "share_state"): "a wrapper (video, segmentation model) holds its backbone's state",
}
# attributes tieta may set on a variable called ``model``: timm's own
MODEL_ATTRIBUTES = {"pretrained_cfg"}


def _writes(path: Path) -> list[tuple[str, str]]:
    """(function, what) for each write of an instance dict, a ``tieta_*`` attribute or a model
    attribute in ``path``."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            targets = (child.targets if isinstance(child, ast.Assign) else
                       [child.target] if isinstance(child, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Subscript) and isinstance(sub.value, ast.Attribute) \
                            and sub.value.attr == "__dict__":
                        found.append((name, "__dict__[...] ="))
                    if isinstance(sub, ast.Attribute) and sub.attr.startswith("tieta_"):
                        found.append((name, f".{sub.attr} ="))
                    if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "model" \
                            and sub.attr not in MODEL_ATTRIBUTES | {"__dict__"}:
                        found.append((name, f"model.{sub.attr} ="))
            if isinstance(child, ast.Call):
                func = child.func
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute) \
                        and func.value.attr == "__dict__" and func.attr in ("update", "setdefault", "pop", "clear"):
                    found.append((name, f"__dict__.{func.attr}"))
                if isinstance(func, ast.Name) and func.id == "setattr" and len(child.args) >= 2:
                    what, attribute = child.args[0], child.args[1]
                    if isinstance(what, ast.Name) and what.id == "model" and not (
                            isinstance(attribute, ast.Name) and attribute.id == "STATE_ATTRIBUTE"):
                        found.append((name, f"setattr(model, {ast.unparse(attribute)})"))
                    if isinstance(attribute, ast.Constant) and str(attribute.value).startswith("tieta_"):
                        found.append((name, f"setattr(..., {attribute.value!r})"))
            visit(child, name)

    visit(ast.parse(path.read_text(encoding="utf-8")), "<module>")
    return found


def test_the_write_finder_sees_each_kind_of_write(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("def f(model, m):\n    model.__dict__['x'] = 1\n    m.tieta_y = 2\n    model.z = 3\n"
                      "    setattr(model, 'w', 4)\n    m.__dict__.update(a=1)\n    model.pretrained_cfg = {}\n")
    assert [what for _, what in _writes(source)] == [
        "__dict__[...] =", ".tieta_y =", "model.z =", "setattr(model, 'w')", "__dict__.update"]


def test_no_module_writes_a_models_dict_or_a_loose_tieta_attribute():
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        for function, what in _writes(path):
            if (relative, function) not in DICT_WRITES or "__dict__" not in what:
                offending.append(f"{relative}:{function}: {what}")
    assert offending == []
