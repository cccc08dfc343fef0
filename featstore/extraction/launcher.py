"""Which share of the work this process does (`--shard K/N`), and its local rank, from the launcher's environment.

featstore has no scheduler of its own: SLURM (job arrays, `srun` tasks) and torchrun already start N processes and
tell each one who it is through environment variables. `--shard auto` reads them, so the same command line works in
an sbatch script, under torchrun, or by hand. Pure Python on purpose (no torch, zarr or dask): the CLI resolves the
share before it imports anything heavy, and the tests need no launcher.

Levels compose: a SLURM array task is the outer level; inside it, torchrun's ranks (when present) or else the
`srun` task ranks are the inner level. So `sbatch --array=0-3` with `torchrun --nproc_per_node 2` gives 8 shares.
(A *share* is one process's part of the work; a *pack* is zarr sharding, `--pack`: the two never share a name.)
torchrun wins over `SLURM_PROCID`/`SLURM_NTASKS` because torchrun is commonly started as one SLURM task whose
`SLURM_PROCID` is 0 for every rank; torchrun's RANK/WORLD_SIZE already count across its nodes.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import BadArgumentError

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class Share:
    """Share `k` (0-based) of `n`, where it came from, and the launcher's local rank (for the GPU), if any."""

    k: int
    n: int
    source: str
    local_rank: int | None = None

    def line(self) -> str:
        return f"share {self.k}/{self.n} ({self.source})"


def detect_share(spec: str | tuple[int, int] | None, env: Mapping[str, str] = os.environ) -> Share:
    """`--shard` value -> Share: None -> 0/1; "K/N" (0-based); (K, N); "auto" -> from SLURM/torchrun variables.
    The share keeps the source of its numbers (for the log) and the launcher's local rank (for the device)."""
    if spec is None:
        return Share(0, 1, "no --shard: the whole array")
    if isinstance(spec, tuple):
        if len(spec) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
            raise BadArgumentError(f"--shard {spec!r}: expected (K, N) integers")
        return _checked(Share(spec[0], spec[1], "given"))
    text = str(spec).strip()
    if text.lower() == AUTO:
        return _auto(env)
    m = re.fullmatch(r"(\d+)\s*/\s*(\d+)", text)
    if not m:
        raise BadArgumentError(f"--shard {spec!r}: expected K/N (e.g. 0/4, K counted from 0) or auto")
    return _checked(Share(int(m.group(1)), int(m.group(2)), f"--shard {text}"))


def local_rank(spec: str | tuple[int, int] | None, env: Mapping[str, str] = os.environ) -> int | None:
    """The launcher's local rank (torchrun LOCAL_RANK, SLURM_LOCALID) where `--shard auto` applies, else None: with
    it, `--device cuda` means this process's own GPU (devices.resolve_device)."""
    return detect_share(AUTO, env).local_rank if _is_auto(spec) else None


def share_units(nunits: int, share: Share) -> np.ndarray:
    """The unit indices of one share: one contiguous range of N nearly equal ones."""
    return np.array_split(np.arange(nunits), share.n)[share.k]


# ---- detection ---------------------------------------------------------------------------------------------------
def _is_auto(shard) -> bool:
    return isinstance(shard, str) and shard.strip().lower() == AUTO


def _auto(env: Mapping[str, str]) -> Share:
    outer = _slurm_array(env)
    inner = _torchrun(env) or _slurm_tasks(env)
    if outer is None and inner is None:
        log.warning("--shard auto: no SLURM or torchrun variables found; this process fills the whole array (0/1)")
        return Share(0, 1, "auto: no SLURM or torchrun variables, whole array")
    if outer is None:
        return inner
    if inner is None or inner.n == 1:
        return Share(outer.k, outer.n, outer.source, inner.local_rank if inner else None)
    return _checked(Share(outer.k * inner.n + inner.k, outer.n * inner.n, f"{outer.source} x {inner.source}",
                          inner.local_rank))


def _slurm_array(env: Mapping[str, str]) -> Share | None:
    """An sbatch job array: task ids min, min+step, ..., not necessarily from 0 (`--array=1-8`, `--array=0-14:2`)."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    tid = _int(env, "SLURM_ARRAY_TASK_ID")
    lo = _int(env, "SLURM_ARRAY_TASK_MIN", 0)
    step = _int(env, "SLURM_ARRAY_TASK_STEP", 1) or 1
    if "SLURM_ARRAY_TASK_COUNT" in env:
        count = _int(env, "SLURM_ARRAY_TASK_COUNT")
    elif "SLURM_ARRAY_TASK_MAX" in env:
        count = (_int(env, "SLURM_ARRAY_TASK_MAX") - lo) // step + 1
    else:
        raise BadArgumentError("--shard auto: SLURM_ARRAY_TASK_ID is set but not SLURM_ARRAY_TASK_COUNT; "
                               "pass --shard K/N explicitly")
    off, rem = divmod(tid - lo, step)
    if rem or not 0 <= off < count:
        raise BadArgumentError(
            f"--shard auto: SLURM array task {tid} is not in a regular range (min {lo}, step {step}, {count} tasks); "
            "use --array=A-B[:S] or pass --shard K/N explicitly"
        )
    return _checked(Share(off, count, f"SLURM array task {tid} of {count}, from {lo}"))


def _slurm_tasks(env: Mapping[str, str]) -> Share | None:
    """`srun` tasks of one job step. The step's own count comes first: SLURM_NTASKS is the allocation's."""
    if "SLURM_PROCID" not in env:
        return None
    n_var = next((v for v in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") if v in env), None)
    if n_var is None:
        return None
    k, n = _int(env, "SLURM_PROCID"), _int(env, n_var)
    local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else None
    if n > 1 and "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        log.warning("--shard auto: %s=%d but this process was not started by srun; it fills share %d/%d only "
                    "(start one process per task with srun)", n_var, n, k, n)
    return _checked(Share(k, n, f"SLURM task {k} of {n}", local))


def _torchrun(env: Mapping[str, str]) -> Share | None:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    k, n = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else None
    return _checked(Share(k, n, f"torchrun rank {k} of {n}", local))


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise BadArgumentError(f"--shard auto: {name} is not set")
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise BadArgumentError(f"--shard auto: {name}={raw!r} is not an integer") from None


def _checked(s: Share) -> Share:
    if not (s.n >= 1 and 0 <= s.k < s.n):
        where = "" if s.source.startswith(("--shard", "given")) else f" (--shard auto: {s.source})"
        raise BadArgumentError(f"--shard {s.k}/{s.n}: K must be in 0..N-1{where}")
    return s
