"""The machine's load around a timing: read before and after, this process's part taken off, and
"busy" only where the rest is above the cores (fixed numbers: nothing here depends on the machine)."""

import os

import pytest

from tieta.measure import load


def test_busy_is_a_load_above_the_cores_not_counting_this_process():
    assert load.busy({"cores": 2, "before": 2.5, "own": 0.0, "after": 2.0})
    assert not load.busy({"cores": 2, "before": 3.5, "own": 2.0, "after": 3.0})  # ours: the demo's training
    assert not load.busy({"cores": 2, "before": 2.0, "own": 0.0, "after": 9.0})  # timing raises it by itself
    assert not load.busy({}) and not load.busy(None) and not load.busy({"cores": 2, "before": "high"})
    assert load.busy_note({"cores": 2, "before": 1.0, "own": 0.0, "after": 1.0}) is None
    assert load.busy_note({"cores": 2, "before": 4.0, "own": 0.0, "after": 3.5}) == (
        "The machine was busy: 1-minute load 4.0 on 2 cores before timing, 3.5 after, more than its cores, so these "
        "speeds are unreliable (other processes took turns with the timed ones); time again on an idle machine.")
    assert load.load_text(None) == "the machine's load was not read"


def test_the_load_is_read_before_and_after_the_timing(monkeypatch):
    readings = iter([(3.0, 2.0, 1.0), (1.5, 2.0, 1.0)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(readings))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(load, "own_load", lambda: 0.5)
    with load.watched_load() as record:
        assert record == {}
    assert record == {"cores": 4.0, "before": 3.0, "own": 0.5, "after": 1.5}


def test_no_load_average_leaves_the_record_empty(monkeypatch):
    def unavailable():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert load.read_load() is None
    with load.watched_load() as record:
        pass
    assert record == {} and not load.busy(record)


@pytest.mark.parametrize("age, cpu, own", [(30.0, 45.0, 0.75), (600.0, 1200.0, 2.0)])
def test_this_process_s_part_is_its_cpu_time_over_the_last_minute(tmp_path, monkeypatch, age, cpu, own):
    ticks = os.sysconf("SC_CLK_TCK")
    started = 1000.0  # seconds after boot
    fields = ["S"] + ["0"] * 18 + [str(int(started * ticks))] + ["0"] * 30  # field 22: the start time
    (tmp_path / "stat").write_text("123 (tieta (a name) x) " + " ".join(fields) + "\n")
    (tmp_path / "uptime").write_text(f"{started + age} 5.0\n")
    monkeypatch.setattr(load, "STAT", str(tmp_path / "stat"))
    monkeypatch.setattr(load, "UPTIME", str(tmp_path / "uptime"))
    monkeypatch.setattr(load.time, "process_time", lambda: cpu)
    assert load.own_load() == pytest.approx(own)
    monkeypatch.setattr(load, "STAT", str(tmp_path / "absent"))
    assert load.own_load() == 0.0
