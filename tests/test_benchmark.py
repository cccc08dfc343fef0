"""Smoke test of tools/benchmark.py at tiny sizes: every row is reported, in the table and in the JSON contract."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "tools" / "benchmark.py"
ROWS = [
    "write", "write-bytes", "write-nofsync", "write-lossless", "write-lossless-bytes",
    "extract", "read", "read-2workers", "startup-time", "startup-rss", "startup-100", "startup-time-memmap",
    "startup-rss-memmap", "startup-100-memmap", "stats", "resume", "resume-noop", "layers", "layers-rss", "train",
]


def test_benchmark_quick_reports_every_row(tmp_path):
    """Every row measured (none failed or unavailable), in the table and in the JSON; the resume row's kill really
    happened before the end and its resumed store equals an uninterrupted run."""
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    r = subprocess.run([sys.executable, str(BENCHMARK), "--quick", "--json", str(out), "--dir", str(work)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
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
        assert name in r.stdout  # the table on stdout has the same rows
    assert "[benchmark" in r.stderr and "[benchmark" not in r.stdout  # progress on stderr only
    resume = by_name["resume"]
    assert resume["killed"] and resume["identical"] and resume["recomputed"] <= resume["n"] - resume["done_at_kill"], resume
