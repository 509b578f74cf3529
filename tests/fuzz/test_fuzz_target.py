"""Budgets: ``tieta plan --target`` and ``tieta report --budget`` text, read by parse_target."""

from __future__ import annotations

import math

from hypothesis import example, given
from hypothesis import strategies as st

from tieta.errors import TietaError
from tieta.measure.target import KINDS, Target, parse_target

from .conftest import FUZZ, parsed_or_refused

# text near the forms: a kind (or a near miss), "=", a number with or without a unit
_kinds = st.sampled_from(list(KINDS) + ["Speedup", "GMACS", "latency ", "speed", "", "=", "gflops"])
_numbers = (st.floats(allow_nan=True, allow_infinity=True).map(repr) | st.integers().map(str)
            | st.sampled_from(["", "0", "-1", "1e999", "nan", "inf", ".5", "5.", "1e-400", "2x", "5ms", "0.1s",
                               "800img/s", "5 ms", "5kg", "1,5", "٣", "\x00", "5\n"]))
_near = st.builds(lambda kind, number: f"{kind}={number}", _kinds, _numbers)


@FUZZ
@given(st.one_of(st.text(max_size=30), _near))
@example("speedup=2")
@example("latency=5ms=")
@example("gmacs=" + "9" * 400)
def test_any_text_is_a_target_or_one_sentence(text):
    found = parsed_or_refused(parse_target, text)
    if isinstance(found, TietaError):
        return
    assert isinstance(found, Target) and found.kind in KINDS
    assert math.isfinite(found.value) and found.value > 0
    assert parse_target(found.flag()).kind == found.kind  # what it says of itself reads back
