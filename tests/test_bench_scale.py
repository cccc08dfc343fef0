"""benchmark.py --scale at a tiny N: both rows measured and judged, each able to fail; and the one-line refusal when
--dir lacks the space, before anything is written."""
from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import load_tool

BENCHMARK = Path(__file__).resolve().parents[1] / "tools" / "benchmark.py"


def runner():
    return load_tool("benchmark")


def test_scale_rows_at_a_tiny_n(tmp_path, capfd):
    out, work = tmp_path / "rows.json", tmp_path / "work"
    capfd.readouterr()
    assert runner().main(["--scale", "--scale-n", "6", "--reps", "1", "--scale-evict", "fadvise", "--json", str(out),
                          "--dir", str(work), "--bound", "scale-warm=1e9", "--bound", "scale-cold=0"]) == 0
    printed = capfd.readouterr().out
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["scale-cold", "scale-warm"]
    for r in rows.values():
        assert r["n"] == 6 and r["ratio"] > 0 and r["judged"] == r["ratio"], r
        assert abs(r["ratio"] - r["baseline_s"] / r["featstore_s"]) < 1e-9 * r["ratio"], r  # throughput ratio
    assert rows["scale-cold"]["meets"] and not rows["scale-warm"]["meets"]  # the bounds, overridden both ways
    assert "evicted with posix_fadvise(POSIX_FADV_DONTNEED) per file" in rows["scale-cold"]["notes"]
    left = rows["scale-cold"]["resident_after_evict"]
    assert set(left) == {"store", "memmap"} and f"store {left['store']:.0%}" in rows["scale-cold"]["notes"]
    if _filesystem(tmp_path) not in ("tmpfs", "ramfs"):  # files in RAM cannot be evicted
        assert left == {"store": 0.0, "memmap": 0.0}  # cold means cold
    assert "read once just before its pass" in rows["scale-warm"]["notes"]
    assert re.search(r"^scale-warm .* NO$", printed, flags=re.MULTILINE), printed
    assert not any(work.iterdir())  # the working folder is removed


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (the longest mount point above it in /proc/mounts)."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        mnt, fstype = line.split()[1:3]
        if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
            best, kind = mnt, fstype
    return kind


def test_scale_refuses_without_the_space(tmp_path, capfd):
    capfd.readouterr()
    assert runner().main(["--scale", "--scale-need-gb", "1e9", "--dir", str(tmp_path)]) == 2
    out, err = capfd.readouterr()
    assert re.fullmatch(rf"benchmark: error: --scale needs ~1000000000 GB free in {re.escape(str(tmp_path))}, "
                        rf"{re.escape(str(tmp_path))} has \d+\.\d GB\n", err), err
    assert out == "" and not any(tmp_path.iterdir())  # refused before anything was written
    assert runner().scale.need_gb(9841) > 44  # the full subject: float16 store + float32 npy, ~45 GB
