"""Property-based tests of every parser tieta has: any input gives a value or one TietaError sentence.

The tests share one hypothesis profile, ``tieta-fuzz``: a bounded number of examples per test, no
deadline (the machine may be shared), derandomized so that every run tries the same inputs, and no
example database written into the working tree. A test applies it with ``@FUZZ`` (or a copy with
fewer examples, ``FUZZ_FEW``, where each example writes files). Without hypothesis installed, the
tests here are not collected.
"""

from __future__ import annotations

from typing import Any, Callable

from tieta.errors import TietaError

try:
    from hypothesis import HealthCheck, event, settings
    from hypothesis.errors import InvalidArgument
except ImportError:
    collect_ignore_glob = ["test_*.py"]
else:
    settings.register_profile(
        "tieta-fuzz",
        max_examples=100,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    FUZZ = settings.get_profile("tieta-fuzz")
    FUZZ_FEW = settings(FUZZ, max_examples=60)


def check_sentence(error: TietaError) -> str:
    """The message of ``error``, checked to be one non-empty line."""
    text = str(error)
    assert text.strip(), f"{type(error).__name__} with an empty message"
    assert "\n" not in text and "\r" not in text, f"a message of more than one line: {text!r}"
    return text


def parsed_or_refused(parse: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``parse(*args, **kwargs)``, or the TietaError it raised (its message checked); any other
    exception propagates and fails the test."""
    name = getattr(parse, "__name__", "parse")
    try:
        found = parse(*args, **kwargs)
    except TietaError as error:
        check_sentence(error)
        _event(f"{name}: refused")
        return error
    _event(f"{name}: read")
    return found


def _event(text: str) -> None:
    """Counted in --hypothesis-show-statistics (how many inputs got through); outside a test, nothing."""
    try:
        event(text)
    except InvalidArgument:
        pass
