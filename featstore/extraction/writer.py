"""Chunk assembly and the background writer: computed rows -> whole units -> the store, on a thread.

Rows are assembled into whole units (chunks, or shards with --pack), so the store never does a read-modify-write;
the writer overlaps the next forward pass and its queue is bounded in bytes, whatever N or the number of arrays.
"""
from __future__ import annotations

import queue
import threading

import numpy as np

from ..errors import StoreWriteError
from ..storage import FeatureArray


class ChunkAssembler:
    """Turns the ordered stream of computed rows into runs of whole, consecutive units (views where possible)."""

    def __init__(self, fa: FeatureArray, chunks: list[int]):
        self.fa, self.chunks, self.pos = fa, chunks, 0
        self.stage: np.ndarray | None = None
        self.filled = 0

    def add(self, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        done: list[tuple[int, np.ndarray, int]] = []  # (unit, data, offset in rows or -1 if staged)
        i = 0
        while i < len(rows):
            c = self.chunks[self.pos]
            a, b = self.fa.chunk_range(c)
            need = b - a
            if self.filled == 0 and len(rows) - i >= need:
                done.append((c, rows[i : i + need], i))
                i += need
            else:
                if self.stage is None:
                    self.stage = np.empty((need,) + rows.shape[1:], dtype=rows.dtype)
                take = min(need - self.filled, len(rows) - i)
                self.stage[self.filled : self.filled + take] = rows[i : i + take]
                self.filled += take
                i += take
                if self.filled < need:
                    break
                done.append((c, self.stage, -1))
                self.stage, self.filled = None, 0
            self.pos += 1
        runs: list[tuple[int, np.ndarray]] = []
        j = 0
        while j < len(done):  # merge consecutive units that are adjacent views of `rows`
            c0, data, off = done[j]
            k = j
            while (
                off >= 0
                and k + 1 < len(done)
                and done[k + 1][0] == done[k][0] + 1
                and done[k + 1][2] == done[k][2] + len(done[k][1])
            ):
                k += 1
            if k > j:
                data = rows[off : done[k][2] + len(done[k][1])]
            runs.append((c0, data))
            j = k + 1
        return runs


class BackgroundWriter:
    """Writes unit runs of any number of arrays on background threads, so the store overlaps the next forward pass.

    One lane (a thread and its queue) per array, up to `lanes`: the runs of one array are written in order, those of
    different arrays at once, so one array's fsync waits and done markers overlap another's writes (each lane's
    chunk files go through the shared I/O pool). The queue is bounded in bytes across lanes (`limit`; one item always
    fits), so memory stays flat however many arrays one forward pass feeds. `on_written(rows)` is called after each
    run is durably written and marked done. After a failure nothing more is written; the first failure is reported.
    """

    def __init__(self, durable: bool, limit: int, on_written=None, lanes: int = 1):
        self.durable, self.limit, self.on_written = durable, limit, on_written
        self.cv = threading.Condition()
        self.pending = 0
        self.error: BaseException | None = None
        self.failed: tuple[str, int, str] | None = None  # array, first unit of the failed write, unit name
        self.lane_of: dict[str, int] = {}
        self.report_lock = threading.Lock()
        self.queues = [queue.Queue() for _ in range(max(1, lanes))]
        self.threads = [threading.Thread(target=self._run, args=(q,), name=f"featstore-writer-{i}", daemon=True)
                        for i, q in enumerate(self.queues)]
        for t in self.threads:
            t.start()

    def _run(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            fa, first, data = item
            try:
                if self.error is None:  # drain without writing after a failure
                    fa.write_chunks(first, data, durable=self.durable)
                    if self.on_written is not None:
                        with self.report_lock:  # one caller at a time (a progress bar)
                            self.on_written(len(data))
            except BaseException as e:  # noqa: BLE001 - reported to the main thread
                with self.cv:
                    if self.error is None:
                        self.error, self.failed = e, (fa.path, first, fa.unit)
            finally:
                with self.cv:
                    self.pending -= data.nbytes
                    self.cv.notify_all()

    def put(self, fa: FeatureArray, first: int, data: np.ndarray) -> None:
        self.check()
        with self.cv:
            self.cv.wait_for(lambda: self.pending == 0 or self.pending + data.nbytes <= self.limit
                             or self.error is not None)
            self.pending += data.nbytes
            lane = self.lane_of.setdefault(fa.path, len(self.lane_of) % len(self.queues))
        self.queues[lane].put((fa, first, data))

    def check(self) -> None:
        if self.error is not None:
            e = self.error
            reason = getattr(e, "strerror", None) or str(e)
            path, unit, kind = self.failed
            raise StoreWriteError(
                f"writing {kind} {unit} of {path} failed: {reason}; "
                f"{kind}s written before are kept; fix the cause and rerun the same command to resume"
            ) from e

    def close(self) -> None:
        for q in self.queues:
            q.put(None)
        for t in self.threads:
            t.join()
