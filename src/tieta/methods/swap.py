"""In-place class swaps that survive ``copy.deepcopy``, ``pickle`` and ``torch.save``.

tieta changes how an existing timm module runs by swapping its class for a subclass that mixes in
tieta's behaviour: the object keeps every submodule, parameter and state-dict key. A mixed class
made at run time has no importable name, so pickling would fail; each one therefore pickles as
"make ``mixin`` + ``base`` again, then restore the state", which works in a fresh process too.
"""

from __future__ import annotations

from typing import Any

_MIXED_CLASSES: dict[tuple[type, type], type] = {}


class Swappable:
    """Base of the mixins that :func:`swap_in` puts in front of a module's class."""

    def __reduce_ex__(self, protocol: int) -> tuple:
        cls = type(self)
        parts = super().__reduce_ex__(protocol)  # (constructor, args, state, ...) of the mixed class
        return (_new_mixed, (cls.__tieta_mixin__, cls.__tieta_base__), *parts[2:])


def mixed_class(mixin: type, base: type) -> type:
    """``class <mixin><base>(mixin, base)``, made once per pair."""
    if (mixin, base) not in _MIXED_CLASSES:
        name = f"{mixin.__name__}{base.__name__}"
        _MIXED_CLASSES[mixin, base] = type(name, (mixin, base), {
            "__module__": __name__, "__tieta_mixin__": mixin, "__tieta_base__": base})
    return _MIXED_CLASSES[mixin, base]


def _new_mixed(mixin: type, base: type) -> Any:
    """An empty instance of the mixed class, for unpickling (the state is restored after)."""
    cls = mixed_class(mixin, base)
    return cls.__new__(cls)


def swap_in(module: Any, mixin: type) -> None:
    """Give ``module`` the class ``mixin`` + its class (idempotent)."""
    if not isinstance(module, mixin):
        module.__class__ = mixed_class(mixin, type(module))


def swap_out(module: Any, mixin: type) -> None:
    """Undo :func:`swap_in` (no-op if ``module`` does not have the mixin)."""
    if isinstance(module, mixin):
        module.__class__ = type(module).__tieta_base__
