"""Shared fixtures: tiny synthetic subjects and tiny-backbone stores, built in temporary folders."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from s3server import s3_bucket, s3_url  # noqa: F401

from featstore.sample import make_sample_subject

TINY = {"arch": "tiny", "weights": "random", "device": "cpu", "num_workers": 0, "progress": False}


@pytest.fixture(scope="session")
def subject(tmp_path_factory) -> Path:
    """A read-only 6 train + 2 test image subject shared by tests that do not modify it."""
    return make_sample_subject(tmp_path_factory.mktemp("data"), subj="01", n_train=6, n_test=2, seed=0)


@pytest.fixture
def fresh_subject(tmp_path) -> Path:
    """A subject a test may modify."""
    return make_sample_subject(tmp_path / "data", subj="01", n_train=6, n_test=2, seed=1)


@cache
def load_tool(name: str):
    """tools/NAME.py loaded as a module, as `python tools/NAME.py` would run it (its work is under __main__)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `featstore ...` in a real subprocess."""
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "featstore.cli", *args], check=False, capture_output=True, text=True, timeout=timeout, env=e
    )


def cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """Run `featstore ...` through the CLI's own `main` in this process: for what a command prints and the code it
    exits with, without paying an interpreter start and a torch import per call. Signals and crashes need
    `run_cli` (a real process). featstore's log lines reach pytest's caplog here, not stderr."""
    from featstore.cli import main

    capsys.readouterr()
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse errors
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["featstore", *args], code, out, err)


@pytest.fixture(autouse=True)
def _no_dask_scheduler_leak(request):
    """No test (and no featstore call in it) leaves dask's process-wide default scheduler changed."""
    import dask

    before = dask.config.get("scheduler", None)
    yield
    after = dask.config.get("scheduler", None)
    assert after == before, f"{request.node.nodeid} changed dask's default scheduler: {before!r} -> {after!r}"
