"""tools/benchmark.py at tiny sizes: every row is reported, in the table and in the JSON contract, and each row's
`meets` agrees with its ratio and target; a row judged against an impossible bound fails."""
from __future__ import annotations

import importlib.util
import json
import math
import operator
from functools import cache
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "tools" / "benchmark.py"
ROWS = [
    "write", "write-bytes", "write-nofsync", "write-lossless", "write-lossless-bytes",
    "extract", "read", "read-2workers", "startup-time", "startup-rss", "startup-100", "startup-time-memmap",
    "startup-rss-memmap", "startup-100-memmap", "stats", "resume", "resume-noop", "layers", "layers-rss", "train",
]
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt}  # written here, not taken from the benchmark
READ_ON_OTHER = {"write-bytes", "write-lossless-bytes", "layers-rss"}  # rows whose bound is not read on the ratio


@cache
def runner():
    """The runner, loaded as `python tools/benchmark.py` would run it (it puts tools/ on sys.path for its rows)."""
    spec = importlib.util.spec_from_file_location("benchmark", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def expected_meets(row: dict) -> bool:
    v = row["judged"]
    return v is not None and not math.isnan(v) and OPS[row["op"]](v, row["bound"]) and all(row["also"].values())


def test_row_judging_on_both_sides_of_the_bound():
    runner()
    from bench.common import judge, rebound, row

    assert judge(1.0, ">=", 1.0) and not judge(0.99, ">=", 1.0)
    assert judge(0.5, "<=", 0.5) and not judge(0.51, "<=", 0.5)
    assert judge(1.01, ">", 1) and not judge(1.0, ">", 1)
    assert not judge(None, ">=", 0) and not judge(float("nan"), "<=", 1)
    good = row("x", 1.2, ">= 1.0x y", (">=", 1.0), "a", "b")
    assert good["meets"] and good["judged"] == 1.2
    assert not row("x", 0.8, ">= 1.0x y", (">=", 1.0), "a", "b")["meets"]
    assert not row("x", 1.2, ">= 1.0x y", (">=", 1.0), "a", "b", also={"identical": False})["meets"]
    on_other = row("x", 0.3, "<= 0.5x y", ("<=", 0.5), "a", "b", on=0.7)  # the bound is read on `on`
    assert not on_other["meets"] and on_other["judged"] == 0.7
    assert not row("x", None, ">= 1.0x y", (">=", 1.0), "a", "b")["meets"]
    failed = rebound(good, 2.0)
    assert not failed["meets"] and failed["bound"] == 2.0 and failed["target"].startswith(">= 2 ")


def test_benchmark_quick_reports_and_judges_every_row(tmp_path, capfd):
    """Every row measured (none failed or unavailable), in the table and in the JSON, its `meets` the bound read on
    its value; the resume row, judged against an impossible bound (hidden --bound), fails. The resume row's kill
    really happened before the end and its resumed store equals an uninterrupted run. The driver runs in this process
    (its children are still fresh interpreters): an interpreter start with torch and timm costs more than the quick
    rows."""
    bench = runner()
    assert bench.ROW_NAMES == ROWS
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    capfd.readouterr()
    assert bench.main(["--quick", "--json", str(out), "--dir", str(work), "--bound", "resume=-1"]) == 0
    r = capfd.readouterr()  # (out, err)
    rows = json.loads(out.read_text())
    assert isinstance(rows, list)
    by_name = {row["name"]: row for row in rows}
    assert list(by_name) == ROWS, list(by_name)
    table = {ln.split()[0]: ln for ln in r.out.splitlines() if ln.split() and ln.split()[0] in by_name}
    for name, row in by_name.items():
        assert {"name", "ratio", "target", "meets"} <= set(row), row
        assert isinstance(row["meets"], bool), row
        assert row["ratio"] is None or isinstance(row["ratio"], float), row
        assert not row["featstore"].startswith(("failed", "unavailable")), row  # a row that did not measure
        assert row["op"] in OPS and row["target"].startswith(row["op"] + " "), row
        assert f"{row['bound']:g}" in row["target"], row  # the bound judged is the one printed
        if name not in READ_ON_OTHER:
            assert row["judged"] == row["ratio"], row
        assert row["meets"] == expected_meets(row), row
        assert table[name].rstrip().endswith("yes" if row["meets"] else "NO"), table[name]
    assert by_name["write-bytes"]["judged"] == by_name["write-bytes"]["codec_ratio"]
    rss = by_name["layers-rss"]
    assert math.isclose(rss["judged"], rss["featstore_mb"] - rss["baseline_mb"]), rss
    assert "[benchmark" in r.err and "[benchmark" not in r.out  # progress on stderr only
    resume = by_name["resume"]
    assert resume["killed"] and resume["identical"] and resume["recomputed"] <= resume["n"] - resume["done_at_kill"], resume
    assert resume["also"] == {"identical": True}
    assert resume["bound"] == -1 and not resume["meets"], resume  # a recount ratio is >= 0: it cannot meet -1


def test_stats_row_says_its_threads_and_can_fail(tmp_path):
    """The stats row names the threads of each side (dask's threads against the plain read's one) and, judged
    against an impossible bound (hidden --bound), fails."""
    bench = runner()
    out = tmp_path / "bench.json"
    argv = ["--quick", "--only", "stats", "--json", str(out), "--dir", str(tmp_path / "w"), "--bound", "stats=1e9"]
    assert bench.main(argv) == 0
    (stats,) = json.loads(out.read_text())
    assert stats["name"] == "stats" and stats["ratio"] > 0, stats
    assert stats["bound"] == 1e9 and not stats["meets"], stats
    assert stats["baseline_threads"] == 1 and stats["featstore_threads"] >= 1, stats
    assert f"{stats['featstore_threads']} threads" in stats["featstore"] and "1 thread" in stats["baseline"], stats
