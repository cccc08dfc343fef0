"""The one place a `--device` value becomes a torch device, for extraction (one process, a launcher's ranks, dask
workers) and for training."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .errors import BadArgumentError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def resolve_device(device: str | None = None, *, local_rank: int | None = None, worker_index: int | None = None,
                   env: Mapping[str, str] = os.environ) -> torch.device:
    """`device` as a torch.device: None -> cuda where available, else cpu; otherwise `device_name`'s choice. CUDA
    asked for but missing falls back to the CPU with a warning; anything else is a one-line error."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = device_name(device, local_rank=local_rank, worker_index=worker_index, gpu_count=gpus, env=env)
    if name.startswith("cuda") and not gpus:
        log.warning("device %s requested but CUDA is not available; running on CPU", device)
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise BadArgumentError(f"{device!r}: not a torch device (use cuda, cuda:N or cpu)", param="device") from None


def device_name(device: str, *, local_rank: int | None = None, worker_index: int | None = None, gpu_count: int = 0,
                env: Mapping[str, str] = os.environ) -> str:
    """`cuda` -> this process's own GPU, by the launchers' convention of one process per GPU (without it every
    process of a node piles onto cuda:0): `cuda:LOCAL_RANK` where a launcher gave a local rank (counted within
    CUDA_VISIBLE_DEVICES where the launcher narrowed them, e.g. `srun --gpus-per-task=1`), or GPU
    `worker_index % gpu_count` on a LocalCluster's dask worker. An explicit `cuda:N` or `cpu` stays."""
    name = device.strip()
    if name.lower() != "cuda":
        return name
    if local_rank is not None:
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if visible and local_rank >= len(visible):
            log.info("local rank %d with CUDA_VISIBLE_DEVICES=%s: using cuda:%d", local_rank, ",".join(visible),
                     local_rank % len(visible))
            local_rank %= len(visible)
        return f"cuda:{local_rank}"
    if worker_index is not None and not env.get("CUDA_VISIBLE_DEVICES") and gpu_count > 1:
        return f"cuda:{worker_index % gpu_count}"
    return name


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity, as SLURM and taskset set it), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_threads_lock = threading.Lock()


@contextlib.contextmanager
def one_torch_thread():
    """torch's CPU operations on one thread inside the block (restored after; no-op without torch). Tiny parallel
    regions on a loaded machine wait for descheduled team threads (the float16 conversions after a forward pass: 25 ms
    instead of 0.1 ms on 2 busy cores), and idle OpenMP threads spin next to dask's own threads in a stats pass."""
    try:
        import torch
    except ImportError:
        yield
        return
    with _threads_lock:  # blocks in other threads must not restore a count this one changed
        before = torch.get_num_threads()
        if before > 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if before > 1:
                torch.set_num_threads(before)
