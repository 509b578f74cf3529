"""One state object per patched model: everything tieta keeps on a timm ViT besides its modules.

:func:`tieta.methods.blocks.patch_blocks` gives a model one :class:`ModelState`, in
``model.tieta_state``, once (as ToMe keeps its one ``_tome_info``). It holds

- which method changes the token count and what gates attention (the combination rules);
- the per-pass states by name (``token_state``, ``dispatch_state``, ...): what one forward pass
  leaves behind, reset at the start of every pass and never copied, pickled or saved;
- each method's per-model settings, in a slot named after the method;
- objects of a run in progress (a search's optimizer), never copied, pickled or saved either.

None of it is in the state dict, so checkpoints are the modules' weights alone. Code outside
``tieta.methods`` reads it through the accessors here, not by probing the model's attributes.
``model.<name>`` still reads a pass state or a method setting by its name (read-only), so
``model.token_state`` and ``model.token_schedule`` work as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from torch import nn

# the one attribute of a patched model that holds its ModelState
STATE_ATTRIBUTE = "tieta_state"
# the name ``model.<name>`` reads the list of pass states by (what earlier versions kept there)
PASS_STATES = "tieta_pass_states"


class PassState:
    """Base of the per-pass states: what one forward pass leaves behind (sizes, masks, with their
    autograd graph in training) belongs to that pass, so copies and pickles of a model get the
    state as ``reset()`` leaves it."""

    def reset(self) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        blank = object.__new__(type(self))
        blank.__dict__.update(self.__dict__)
        blank.reset()  # assigns fresh values in the copy's dict; self keeps its own
        return blank.__dict__


@dataclass
class ModelState:
    """What tieta keeps on one patched model (``model.tieta_state``).

    Attributes:
        reduction: the method that changes the token count (one per model), or None.
        attention_gate: what lets only some tokens attend (DyT's attention dispatch), or None; it
            excludes a reduction.
        passes: the per-pass states by name, reset at the start of every forward pass; the blocks
            that use one hold a reference to it.
        methods: each method's per-model settings by method name, each a dict by setting name
            (e.g. ``methods["tome"]["token_schedule"]``).
        runs: objects that live while a training run uses them, by method name (DiffRate's rate
            search); dropped from copies and pickles.
    """

    reduction: Optional[str] = None
    attention_gate: Optional[str] = None
    passes: dict[str, PassState] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, Any] = field(default_factory=dict)

    def __getstate__(self) -> dict:
        # deepcopy and pickle: pass states copy themselves as reset() leaves them (PassState), runs stay behind
        return {**self.__dict__, "runs": {}}

    def view(self, name: str) -> Any:
        """What ``model.<name>`` reads: a pass state, the list of them, or a method setting of that name.

        Raises:
            KeyError: if the state holds nothing of that name.
        """
        if name in self.passes:
            return self.passes[name]
        if name == PASS_STATES:
            return list(self.passes.values())
        for settings in self.methods.values():
            if name in settings:
                return settings[name]
        raise KeyError(name)


def state_of(model: nn.Module) -> Optional[ModelState]:
    """The model's state, or None for a model tieta has not patched."""
    state = model.__dict__.get(STATE_ATTRIBUTE)
    return state if isinstance(state, ModelState) else None


def share_state(wrapper: nn.Module, inner: nn.Module) -> None:
    """Let ``wrapper``, a model built around a patched backbone (the video and segmentation models),
    hold the backbone's one state object, so that every accessor finds it on either."""
    wrapper.__dict__[STATE_ATTRIBUTE] = state_of(inner)


def attention_gate(model: nn.Module) -> Optional[str]:
    """What lets only some tokens of ``model`` attend (DyT's attention dispatch), if anything."""
    state = state_of(model)
    return None if state is None else state.attention_gate


def pass_state_named(model: nn.Module, name: str) -> Optional[PassState]:
    """The model's per-pass state called ``name`` (e.g. "token_state"), or None."""
    state = state_of(model)
    return None if state is None else state.passes.get(name)


def pass_states(model: nn.Module) -> Iterable[PassState]:
    """Every per-pass state of the model (none for an unpatched one)."""
    state = state_of(model)
    return () if state is None else tuple(state.passes.values())


def reset_pass_states(model: nn.Module) -> None:
    """Forget what the last forward pass left behind (TietaViT does this as every pass starts)."""
    for state in pass_states(model):
        state.reset()


def method_setting(model: nn.Module, method: str, name: str, default: Any = None) -> Any:
    """A setting ``method`` recorded on the model (``set_method_setting``), or ``default``."""
    state = state_of(model)
    if state is None:
        return default
    return state.methods.get(method, {}).get(name, default)


def set_method_setting(model: nn.Module, method: str, name: str, value: Any) -> None:
    """Record a per-model setting of ``method`` in a patched model's state."""
    state = state_of(model)
    if state is None:
        raise ValueError("the model has no tieta state; patch_blocks(model) first")
    state.methods.setdefault(method, {})[name] = value


def run_object(model: nn.Module, method: str) -> Any:
    """What ``method`` keeps for the training run in progress on this model (``keep_run_object``), or None."""
    state = state_of(model)
    return None if state is None else state.runs.get(method)


def keep_run_object(model: nn.Module, method: str, value: Any) -> None:
    """Keep ``value`` for the run in progress (None lets it go); copies and pickles of the model leave it behind."""
    state = state_of(model)
    if state is None:
        raise ValueError("the model has no tieta state; patch_blocks(model) first")
    if value is None:
        state.runs.pop(method, None)
    else:
        state.runs[method] = value
