"""The line-ups ``tieta bench`` times side by side, by name (readable without torch: ``--help``
lists them)."""

SUITES = {
    "merging": "timm, ToMe and PYRA at the schedules",
    "dyt": "the adapter, DyT (MLP dispatch, half the tokens active), DyT + ToMe and the adapter + ToMe at low",
}


def suites_help() -> str:
    """The ``--suite`` flag's help: each line-up and what it times."""
    return "; ".join(f"{name}: {line_up}" for name, line_up in SUITES.items()) + f" (default {next(iter(SUITES))})"
