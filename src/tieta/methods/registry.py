"""Every method tieta knows, by name: the one list that training, config, CLI, reports and FLOP
counting read. Adding a method is a new module with a ``METHOD``, its listing in
``tieta.methods.catalog`` (name, summary, flags: what ``--help`` shows without loading torch) and
one line here."""

from __future__ import annotations

from typing import Optional

from tieta.errors import TietaError
from tieta.methods import adapter, catalog, diffrate, dynamicvit, dyt, evit, lora, pyra, tome
from tieta.methods import atc
from tieta.methods.method import Flag, Method

METHODS: dict[str, Method] = {method.name: method for method in (
    lora.METHOD,
    adapter.METHOD,
    tome.METHOD,
    pyra.METHOD,
    dyt.METHOD,
    evit.METHOD,
    dynamicvit.METHOD,
    diffrate.METHOD,
    atc.METHOD,
)}


def parse_methods(text: str) -> list[Method]:
    """"pyra+lora" -> the two methods, in the order named (the order they are attached in)."""
    names = [name.strip() for name in text.split("+") if name.strip()]
    if not names:
        raise TietaError("method must name at least one method, e.g. 'lora'")
    for name in names:
        if name not in METHODS:
            raise TietaError(f"unknown method {name!r}; choose from {', '.join(METHODS)} (join several with '+')")
    if len(set(names)) != len(names):
        raise TietaError(f"method {text!r} names a method twice")
    return [METHODS[name] for name in names]


def config_sections() -> dict[str, type]:
    """Every method's config sections, each once: section name -> dataclass."""
    sections: dict[str, type] = {}
    for method in METHODS.values():
        for name, cls in method.sections.items():
            if sections.setdefault(name, cls) is not cls:
                raise TypeError(f"config section {name!r} is declared with two classes")
    return sections


def flags() -> list[Flag]:
    """Every method's command-line flags, each once (the catalog's: every method is listed there)."""
    return catalog.flags()


_GROUP_OF_MODULE = {module: method.name for method in METHODS.values() for module in method.modules}


def parameter_group(name: str) -> Optional[str]:
    """The method whose module holds parameter ``name`` (e.g. "blocks.3.attn.qkv.lora_A" -> "lora"),
    or None."""
    for part in name.split("."):
        group = _GROUP_OF_MODULE.get(part)
        if group is not None:
            return group
    return None
