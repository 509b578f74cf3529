import json

from tieta.report.bench_report import section, write_report
from tieta.report.tables import format_table


def test_table_and_report(tmp_path):
    table = format_table([{"name": "a", "x": 1.23456, "y": None}], [("name", "model", ""), ("x", "X", ".2f"),
                                                                   ("y", "Y", ".1f")])
    assert table.splitlines()[2].split() == ["a", "1.23", "-"]
    write_report(tmp_path / "r", "Title", "How to read it.", [section("part", table, 3, 12.3)], {"part": [{"x": 1}]})
    text = (tmp_path / "r.md").read_text()
    assert text.startswith("# Title") and "Command: `python " in text and "(3 interleaved rounds, 12 s)" in text
    assert json.loads((tmp_path / "r.json").read_text())["results"] == {"part": [{"x": 1}]}
