"""resume (a real extract SIGKILLed at a random point, then rerun) and resume-noop (a rerun on a finished store)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import BATCH, RUNNER, SPLIT, SUBJ, ensure_subject, extract_opts, log, row

FEATURE = "dinov2_q_last"


class CountingBackbone:
    """A built backbone that also appends, after each forward pass, the number of images it computed to `counter` (a
    file, flushed: the count survives a SIGKILL). A wrapper of its own: the backbone and featstore stay untouched."""

    def __init__(self, bb, counter):
        self._bb, self._counter = bb, counter

    def __getattr__(self, name: str):
        return getattr(self._bb, name)

    def forward_features(self, x):
        ys = self._bb.forward_features(x)
        self._counter.write(f"{len(x)}\n")
        self._counter.flush()
        return ys


def backbone():
    from featstore import get_backbone

    return get_backbone("dinov2_q", arch="tiny", weights="random", seed=0)


def timed_extract(subj: str | Path, store: str | Path, bb, opts: dict) -> tuple[float, int]:
    """(seconds of the extract() call alone, images computed): the one clock both sides of resume-noop use."""
    from featstore.extraction import extract

    t0 = time.perf_counter()
    res = extract(subj, store, backbone=bb, **opts)
    return time.perf_counter() - t0, sum(x.computed for x in res.splits)


def child_resume_run(a: dict, bb=None) -> dict:
    """extract() that counts the images each forward pass computed, in a file that survives a SIGKILL."""
    with open(a["counter"], "a") as counter:
        seconds, computed = timed_extract(a["subj"], a["store"], CountingBackbone(bb or backbone(), counter),
                                          extract_opts(a))
    return {"seconds": seconds, "computed": computed}


CHILDREN = {"resume-run": child_resume_run}


def _forwarded(path: Path) -> int:
    return sum(int(x) for x in path.read_text().split()) if path.exists() else 0


def _done(store: Path) -> np.ndarray | None:
    from featstore.storage import FeatureStore

    try:
        return FeatureStore(store).get(FEATURE, SUBJ, SPLIT).done_mask()
    except Exception:  # noqa: BLE001 - not created yet
        return None


def _kill_at(ctx, args: dict, k: int, delay: float) -> bool:
    """Start the extract child; SIGKILL its process group `delay` s after it has computed >= k images. Returns
    whether it had finished first."""
    counter = Path(args["counter"])
    with open(ctx.dir / "resume-killed.err", "w") as err:
        p = subprocess.Popen([sys.executable, str(RUNNER), "--child", "resume-run", json.dumps(args)],
                             stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and p.poll() is None and _forwarded(counter) < k:
            time.sleep(0.002)
        time.sleep(delay)
        finished = p.poll() is not None
        if not finished:
            os.killpg(p.pid, signal.SIGKILL)  # the loader workers too
        p.wait()
    if p.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"the extract to kill failed: {(ctx.dir / 'resume-killed.err').read_text()[-500:]}")
    return finished


def rows_resume(ctx) -> list[dict]:
    """A real extract process SIGKILLed at a random point, then rerun. What the rerun recomputes is counted at the
    backbone (not taken from extract's own summary) and compared with the images not marked done at the kill: more
    would mean finished work is done again. The resumed store must equal an uninterrupted run. The work lost at the
    kill (images computed but not yet marked done) is reported."""
    from featstore.storage import FeatureStore

    subj = ensure_subject(ctx)
    n = ctx.images
    store, ref = ctx.dir / "resume.zarr", ctx.dir / "resume-ref.zarr"
    counts = (ctx.dir / "resume-killed.count", ctx.dir / "resume-rerun.count")
    for p in (store, ref):
        shutil.rmtree(p, ignore_errors=True)
    for p in counts:
        p.unlink(missing_ok=True)
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    k, delay = int(rng.integers(1, max(n - BATCH, 1) + 1)), float(rng.uniform(0, 0.02))
    log(f"resume: extract on {n} images in a subprocess, SIGKILL {delay * 1e3:.0f} ms after {k} images were computed "
        f"(random point, seed {seed})")
    args = {"subj": str(subj), "store": str(store), "counter": str(counts[0])}
    finished = _kill_at(ctx, args, k, delay)
    m = _done(store)
    at_kill = int(m.sum()) if m is not None else 0
    computed_at_kill = _forwarded(counts[0])
    lost = computed_at_kill - at_kill
    log("resume: rerunning the same extract (in this process)")
    bb = backbone()
    rerun = child_resume_run({**args, "counter": str(counts[1])}, bb)  # in this process
    recomputed = _forwarded(counts[1])
    log("resume: an uninterrupted extract for reference, then a rerun on the finished store (both in this process)")
    opts = extract_opts({})
    full, full_computed = timed_extract(subj, ref, bb, opts)
    noop, noop_computed = timed_extract(subj, ref, bb, opts)
    assert full_computed == n and noop_computed == 0, (full_computed, noop_computed)
    ctx.extract_warm = True
    a, b = FeatureStore(store).get(FEATURE, SUBJ, SPLIT), FeatureStore(ref).get(FEATURE, SUBJ, SPLIT)
    same = a.is_complete() and np.array_equal(a.read(0, n), b.read(0, n), equal_nan=True)
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(ref, ignore_errors=True)
    todo = n - at_kill  # chunks of one sample
    ratio = recomputed / todo if todo else (0.0 if recomputed == 0 else float("inf"))
    out = [row("resume", ratio, "<= 1.0x the images not marked done (nothing done is recomputed), same store",
               ("<=", 1.0), f"{recomputed} images recomputed, {lost} lost", f"{todo} not marked done at the kill",
               f"SIGKILL (process group) at a random point (seed {seed}): {delay * 1e3:.0f} ms after the backbone "
               f"had computed >= {k} of {n} images{' (the run had finished first)' if finished else ''}; at the kill "
               f"{computed_at_kill} images were computed and {at_kill} marked done, so {lost} computed images were "
               f"lost (the writer's backlog; at most a batch of {BATCH} plus the queue); the rerun recomputed "
               f"{recomputed} (counted at the backbone; extract reported {rerun['computed']}), and the resumed store "
               f"{'equals' if same else 'DIFFERS from'} an uninterrupted run; rerun {rerun['seconds']:.1f} s",
               also={"identical": same}, recomputed=recomputed, done_at_kill=at_kill,
               computed_at_kill=computed_at_kill, lost=lost, identical=bool(same), killed=not finished, n=n,
               seed=seed)]
    out.append(row("resume-noop", noop / full, "<= 0.05x the full extraction", ("<=", 0.05),
                   f"{noop * 1e3:.0f} ms to find nothing to do", f"full extract {full:.2f} s",
                   f"extract() on the finished store vs the full extract() that made it ({n} images, tiny "
                   "architecture, 2 loader workers, float16, fsync): the same process, the same built backbone, the "
                   "clock around the extract() call alone on both sides", featstore_s=noop, baseline_s=full))
    return out
