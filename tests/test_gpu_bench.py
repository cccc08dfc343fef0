"""tools/gpu_bench.py at tiny sizes on the CPU: it runs end to end, reports every row in the table and the JSON, each
row's `meets` agrees with its value and bound, and the half-precision extract carries its measured error."""
from __future__ import annotations

import json
import math
import operator
from pathlib import Path

import pytest
import torch
from conftest import load_tool

GPU_BENCH = Path(__file__).resolve().parents[1] / "tools" / "gpu_bench.py"
OPS = {">=": operator.ge, "<=": operator.le}


def gpu_bench():
    return load_tool("gpu_bench")


def test_gpu_bench_tiny_on_cpu(tmp_path, capfd):
    out = tmp_path / "rows.json"
    capfd.readouterr()
    assert gpu_bench().main(["--arch", "tiny-d2", "--images", "8", "--device", "cpu", "--batch-size", "4",
                             "--workers", "0", "--precisions", "bfloat16", "--forward-batches", "1", "--steps", "1",
                             "--hidden-dim", "32", "--vertices", "20,18", "--json", str(out),
                             "--dir", str(tmp_path / "work")]) == 0
    printed = capfd.readouterr().out
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["forward-bfloat16", "extract-bfloat16", "extract-half", "loader"]
    for name, r in rows.items():
        v = r["judged"]
        assert v is not None and v > 0 and math.isfinite(v), r
        assert r["meets"] == (OPS[r["op"]](v, r["bound"]) and all(r["also"].values())), r
        line = next(ln for ln in printed.splitlines() if ln.startswith(name + " "))
        if r["target"] != "information":
            assert line.rstrip().endswith("met" if r["meets"] else "MISSED"), line
    ext = rows["extract-bfloat16"]
    assert math.isclose(ext["ratio"], ext["rate"] / ext["forward_rate"])
    assert ext["precision_error"]["precision"] == "bfloat16" and 0 < ext["precision_error"]["mean_rel"] < 0.05
    assert rows["extract-half"]["judged"] == ext["rate"] and not rows["extract-half"]["meets"]  # no 1000 img/s here
    assert math.isclose(rows["loader"]["ratio"], rows["loader"]["loader_rate"] / rows["loader"]["step_rate"])
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # working folder removed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_bench_without_cuda_says_so(capfd):
    with pytest.raises(SystemExit) as e:
        gpu_bench().main(["--images", "8"])
    assert e.value.code == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["gpu_bench: error: --device cuda: no CUDA device here (use --device cpu for a CPU run)"], err
