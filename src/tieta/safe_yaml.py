"""YAML settings read within documented limits: config files, sweep files and ``--set`` values.

``yaml.safe_load`` already refuses tags that would build Python objects (``!!python/object``), but
it keeps the last of two equal keys without a word, builds an alias as a shared reference (so a few
hundred bytes can stand for billions of values once something walks them, the "billion laughs"),
lets an alias refer to the collection it is in, and composes nested collections recursively. Every
YAML that tieta reads as settings goes through :func:`loads` or :func:`read_file` instead, which
refuse, each with one sentence:

- a file larger than ``MAX_BYTES`` (1 MiB), or one that is not UTF-8 text;
- collections nested deeper than ``MAX_DEPTH`` (32) levels, counted with aliases expanded;
- a document of more than ``MAX_VALUES`` (100,000) values, counted with aliases expanded: anchors
  and aliases may share settings, not multiply them;
- an alias inside the collection it names (a structure that contains itself);
- a key given twice in one mapping (a key brought in by a ``<<`` merge may still be overridden).

A scalar that PyYAML recognises but cannot build (a 13th month, ``!!int x``, an integer of more
than 4,000 digits) is PyYAML's own ``ConstructorError`` here, never a bare Python exception.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tieta.errors import TietaError

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_VALUES = 100_000
MAX_INT_DIGITS = 4000  # Python prints (str()) integers of at most 4,300 digits

_MERGE_TAG = "tag:yaml.org,2002:merge"


class RefusedYAML(yaml.YAMLError):
    """Well-formed YAML that tieta refuses (a repeated key, too deep, too many values, a cycle)."""


def _line(node_or_event: Any) -> str:
    mark = getattr(node_or_event, "start_mark", None)
    return f" (line {mark.line + 1})" if mark is not None else ""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, measuring each node as it is composed (before anything is built)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth), aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._measured:
                raise RefusedYAML(f"the alias *{event.anchor} is inside the collection it names{_line(event)}")
            return super().compose_node(parent, index)  # an unknown anchor is PyYAML's own error
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise RefusedYAML(f"it nests more than {MAX_DEPTH} levels deep{_line(self.peek_event())}")
        node = super().compose_node(parent, index)
        self._depth -= 1
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
            self._refuse_repeated_keys(node)
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        values = 1 + sum(self._measured[id(child)][0] for child in children)
        depth = 1 + max((self._measured[id(child)][1] for child in children), default=0)
        if values > MAX_VALUES:
            raise RefusedYAML(f"it holds more than {MAX_VALUES:,} values with its aliases expanded{_line(node)}")
        if depth > MAX_DEPTH:
            raise RefusedYAML(f"it nests more than {MAX_DEPTH} levels deep with its aliases expanded{_line(node)}")
        self._measured[id(node)] = (values, depth)
        return node

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            value = super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError):
            # PyYAML's scalar constructors let Python's own errors out: datetime's "month must be in
            # 1..12", int()'s digit limit, a KeyError for "!!bool maybe"
            kind = node.tag.rsplit(":", 1)[-1]
            text = node.value if isinstance(node.value, str) else ""
            if kind == "int" and len(text) > MAX_INT_DIGITS:
                raise self._long_integer(node) from None
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise yaml.constructor.ConstructorError(None, None, f"{shown!r} is not a valid {kind}",
                                                    node.start_mark) from None
        # a hexadecimal integer has no digit limit in int(), but would not print (str() refuses it)
        if type(value) is int and abs(value) >= 10**MAX_INT_DIGITS:
            raise self._long_integer(node)
        return value

    @staticmethod
    def _long_integer(node: Any) -> yaml.YAMLError:
        problem = f"an integer of more than {MAX_INT_DIGITS:,} digits is longer than tieta reads"
        return yaml.constructor.ConstructorError(None, None, problem, node.start_mark)

    def _refuse_repeated_keys(self, node: yaml.MappingNode) -> None:
        seen: set = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node)  # a scalar builds on its own: "1" and "01" are one key
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:  # not hashable: the constructor refuses it as a key
                continue
            if repeated:
                raise RefusedYAML(f"the key {key!r} appears twice in one mapping{_line(key_node)}")


def loads(text: str) -> Any:
    """The value of one YAML document, within the limits above.

    Raises:
        yaml.YAMLError: the text is not YAML (PyYAML's error), or it breaks a limit (RefusedYAML).
    """
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def describe(error: yaml.YAMLError) -> str:
    """A YAML error in a few words, with its line where known: "expected ',' or ']' ... (line 2)"."""
    if isinstance(error, RefusedYAML):
        return str(error)
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem:
        return problem + (f" (line {mark.line + 1})" if mark is not None else "")
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_file(path: str | Path, what: str) -> Any:
    """The value of a YAML settings file; ``what`` names it in messages, e.g. "config file".

    Raises:
        TietaError: the file is missing, unreadable, too large, not UTF-8, not YAML, or breaks a
            limit above; one sentence that names the file.
    """
    path = Path(path)
    if not path.exists():
        raise TietaError(f"{what} {path} does not exist")
    if not path.is_file():
        raise TietaError(f"{what} {path} is not a file")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise TietaError(f"{what} {path} is {size:,} bytes; settings files are at most {MAX_BYTES:,} bytes "
                             "(1 MiB)")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise TietaError(f"{what} {path} is not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise TietaError(f"cannot read {what} {path}: {error.strerror or error}") from None
    try:
        return loads(text)
    except RefusedYAML as error:
        raise TietaError(f"{what} {path} is refused: {error}") from None
    except yaml.YAMLError as error:
        raise TietaError(f"{what} {path} is not valid YAML: {describe(error)}") from None
