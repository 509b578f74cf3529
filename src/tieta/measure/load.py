"""How busy the machine was while something was timed: the 1-minute load average against the cores.

A speed timed while other processes want the cores is a speed of the machine's sharing, not of the
model: under load a speedup can shrink to nothing and rankings flip. So every side-by-side timing
reads the load average (``os.getloadavg``) before and after, and :func:`busy` says when the
1-minute load before timing was above ``os.cpu_count()``.

The load average counts every runnable thread, this process's too, and a process that has just
trained on every core (the demo) has raised it by itself. So the part this process is likely to
have added is taken off before the comparison: its CPU time over the last minute, estimated from
its lifetime (CPU seconds over ``max(age, 60 s)``, the load average's time constant).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

STAT, UPTIME = "/proc/self/stat", "/proc/uptime"


def own_load() -> float:
    """This process's estimated part of the 1-minute load average (0 where the age of the process
    cannot be read)."""
    try:
        with open(STAT) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        with open(UPTIME) as handle:
            uptime = float(handle.read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, in clock ticks
    except (OSError, ValueError, IndexError):
        return 0.0
    return time.process_time() / max(age, 60.0)


def read_load() -> Optional[dict[str, float]]:
    """{"load": the 1-minute load average, "own": this process's estimated part of it, "cores"},
    or None where the system keeps no load average."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    return {"load": float(load), "own": own_load(), "cores": float(os.cpu_count() or 1)}


@contextmanager
def watched_load() -> Iterator[dict[str, float]]:
    """Read the load before and after the timing in the ``with`` block: the record it yields is
    filled with ``cores``, ``before``, ``own`` (this process's part of ``before``) and ``after``;
    it stays empty where the system keeps no load average."""
    record: dict[str, float] = {}
    before = read_load()
    yield record
    after = read_load()
    if before is not None and after is not None:
        record.update(cores=before["cores"], before=before["load"], own=before["own"], after=after["load"])


def valid(load: Any) -> bool:
    """Whether ``load`` is a load record as :func:`watched_load` fills it (a kept file may hold anything)."""
    keys = ("cores", "before", "own", "after")
    return isinstance(load, Mapping) and all(isinstance(load.get(key), (int, float))
                                             and not isinstance(load.get(key), bool) for key in keys)


def busy(load: Optional[Mapping[str, float]]) -> bool:
    """Whether the machine was busy before timing: a 1-minute load, less this process's part, above
    the number of cores."""
    return valid(load) and load["before"] - load["own"] > load["cores"]


def load_text(load: Optional[Mapping[str, float]]) -> str:
    """"1-minute load 0.4 on 2 cores before timing (0.1 of it this process's), 1.9 after", or that
    it was not read."""
    if not valid(load):
        return "the machine's load was not read"
    own = f" ({load['own']:.1f} of it this process's)" if load["own"] >= 0.05 else ""
    return (f"1-minute load {load['before']:.1f} on {load['cores']:.0f} cores before timing{own}, "
            f"{load['after']:.1f} after")


def busy_note(load: Optional[Mapping[str, float]]) -> Optional[str]:
    """One sentence where the machine was busy (:func:`busy`), else None."""
    if not busy(load):
        return None
    return (f"The machine was busy: {load_text(load)}, more than its cores, so these speeds are unreliable "
            "(other processes took turns with the timed ones); time again on an idle machine.")
