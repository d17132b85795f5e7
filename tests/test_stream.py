"""The overlapped stream of extraction: reading, the forward pass and writing run at once,
within a memory budget, and stop cleanly on an error."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pipeline.features.stream import Budget, run_stream

BATCH, ROWS = 4, 100  # 25 batches


class Pipeline:
    """A reader and a forward pass that each take `seconds` per batch, and a writer that
    records what it stored; counts the batches read but not yet written."""

    def __init__(self, read_s: float, run_s: float, fail_read_at=None, fail_write=False):
        self.read_s, self.run_s = read_s, run_s
        self.fail_read_at, self.fail_write = fail_read_at, fail_write
        self.written: dict[int, np.ndarray] = {}
        self.read_rows = self.most_in_flight = 0
        self.lock = threading.Lock()

    def read(self, i: int, j: int) -> np.ndarray:
        if self.fail_read_at is not None and j > self.fail_read_at:
            raise OSError("disk went away")
        time.sleep(self.read_s)
        with self.lock:
            self.read_rows += j - i
            written = sum(len(a) for a in self.written.values())
            self.most_in_flight = max(self.most_in_flight, self.read_rows - written)
        return np.arange(i, j, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)

    def run(self, batches):
        for batch in batches:
            time.sleep(self.run_s)
            yield [batch.sum(axis=1), -batch[:, 0]]

    def write(self, first: int, outputs: list[np.ndarray]) -> None:
        if self.fail_write:
            raise OSError(28, "No space left on device")
        with self.lock:
            self.written[first] = outputs[0]

    def stream(self, budget: Budget, start: int = 0) -> float:
        t0 = time.perf_counter()
        run_stream(self.read, range(start, ROWS, BATCH), self.run, self.write, budget)
        return time.perf_counter() - t0


def test_reading_and_the_forward_pass_overlap():
    """Each stage takes 40 ms a batch: wall time is close to the larger of the two (1 s for
    25 batches), not their sum (2 s)."""
    pipe = Pipeline(read_s=0.04, run_s=0.04)
    wall = pipe.stream(Budget(read_ahead=4, write_behind=4, chunk_rows=8))
    assert wall < 0.7 * 25 * (0.04 + 0.04), wall
    rows = np.concatenate([pipe.written[k] for k in sorted(pipe.written)])
    np.testing.assert_array_equal(rows, 3 * np.arange(ROWS))  # every row, in order
    assert sorted(pipe.written) == list(range(0, ROWS, 8))  # chunks of 8 rows


def test_what_is_in_flight_stays_within_the_budget():
    """A slow forward pass cannot make the reader run ahead beyond read_ahead batches."""
    budget = Budget(read_ahead=2, write_behind=2, chunk_rows=BATCH)
    pipe = Pipeline(read_s=0.0, run_s=0.02)
    pipe.stream(budget)
    # queued batches, the one being read, the one in the forward pass and the one it holds
    # ahead, those waiting for the writer and the one it writes
    most = (budget.read_ahead + 1 + 2 + budget.write_behind + 1) * BATCH
    assert BATCH < pipe.most_in_flight <= most


def test_the_budget_plan_divides_the_memory():
    budget = Budget.plan(96, 32, image_bytes=224 * 224 * 3, row_bytes=2 * 4096, max_chunk=32 << 20)
    assert budget.read_ahead == 32 * 2**20 // (32 * 224 * 224 * 3)  # a third: 6 batches
    assert budget.chunk_rows % 32 == 0 and budget.chunk_rows * 2 * 4096 <= 32 << 20
    tiny = Budget.plan(16, 32, image_bytes=10**7, row_bytes=10**6, max_chunk=1)
    assert (tiny.read_ahead, tiny.write_behind, tiny.chunk_rows) == (2, 2, 32)


def test_a_read_error_still_writes_every_row_read_before_it():
    pipe = Pipeline(read_s=0.0, run_s=0.001, fail_read_at=42)
    with pytest.raises(OSError, match="disk went away"):
        pipe.stream(Budget(read_ahead=2, write_behind=2, chunk_rows=8))
    assert sum(len(a) for a in pipe.written.values()) == 40  # 10 batches of 4 before row 42


def test_a_write_error_stops_the_reader_and_is_raised():
    pipe = Pipeline(read_s=0.0, run_s=0.001, fail_write=True)
    threads = set(threading.enumerate())
    start = time.perf_counter()
    with pytest.raises(OSError, match="No space left"):
        pipe.stream(Budget(read_ahead=2, write_behind=2, chunk_rows=BATCH))
    assert time.perf_counter() - start < 5 and pipe.read_rows < ROWS
    assert set(threading.enumerate()) <= threads  # the reader and writer have ended
