"""Smoke test of tools/benchmark.py at tiny sizes: every row is reported, in the table and in the JSON contract."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "tools" / "benchmark.py"
ROWS = [
    "write", "write-bytes", "write-nofsync", "write-lossless", "write-lossless-bytes",
    "extract", "read", "read-2workers", "startup-time", "startup-rss", "startup-100", "startup-time-memmap",
    "startup-rss-memmap", "startup-100-memmap", "stats", "resume", "resume-noop", "layers", "layers-rss", "train",
]


def test_benchmark_quick_reports_every_row(tmp_path, capfd):
    """Every row measured (none failed or unavailable), in the table and in the JSON; the resume row's kill really
    happened before the end and its resumed store equals an uninterrupted run. The driver runs in this process (its
    children are still fresh interpreters): an interpreter start with torch and timm costs more than the quick rows."""
    spec = importlib.util.spec_from_file_location("benchmark", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    capfd.readouterr()
    assert bench.main(["--quick", "--json", str(out), "--dir", str(work)]) == 0
    r = capfd.readouterr()  # (out, err)
    rows = json.loads(out.read_text())
    assert isinstance(rows, list)
    by_name = {row["name"]: row for row in rows}
    assert list(by_name) == ROWS, list(by_name)
    for name, row in by_name.items():
        assert {"name", "ratio", "target", "meets"} <= set(row), row
        assert isinstance(row["meets"], bool), row
        assert isinstance(row["target"], str) and row["target"], row
        assert row["ratio"] is None or isinstance(row["ratio"], float), row
        assert not row["featstore"].startswith(("failed", "unavailable")), row  # a row that did not measure
        assert name in r.out  # the table on stdout has the same rows
    assert "[benchmark" in r.err and "[benchmark" not in r.out  # progress on stderr only
    resume = by_name["resume"]
    assert resume["killed"] and resume["identical"] and resume["recomputed"] <= resume["n"] - resume["done_at_kill"], resume
