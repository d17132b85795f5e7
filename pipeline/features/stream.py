"""Extraction as one overlapped stream: a reader thread reads (or decodes) batches of images,
the forward pass runs them (on JAX the next batch is dispatched while the last one is copied
back), and a writer thread gathers the outputs into chunk files. The queues between the three
are bounded, so that what is held stays within `extract.memory_mb` whatever the image size."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

_END = object()
_POLL_S = 0.1


@dataclass(frozen=True)
class Budget:
    """How many batches may wait at each hand-over, and how many rows a chunk file gathers."""

    read_ahead: int  # batches of images read and not yet run
    write_behind: int  # batches of outputs run and not yet written
    chunk_rows: int  # rows per chunk file (the unit a killed run resumes from)

    @classmethod
    def plan(
        cls, memory_mb: int, batch_size: int, image_bytes: int, row_bytes: int, max_chunk: int
    ) -> Budget:
        """A third of the memory for each of: images waiting, outputs waiting, the chunk being
        gathered (at most `max_chunk` bytes). At least two batches wait at each hand-over,
        and a chunk holds at least one batch, however small the budget."""
        share = memory_mb * 2**20 // 3
        batches_of = lambda nbytes: share // max(1, batch_size * nbytes)  # noqa: E731
        chunk_bytes = min(share, max_chunk)
        return cls(
            read_ahead=int(min(64, max(2, batches_of(image_bytes)))),
            write_behind=int(min(64, max(2, batches_of(row_bytes)))),
            chunk_rows=int(max(1, chunk_bytes // max(1, row_bytes * batch_size)) * batch_size),
        )


def run_stream(
    read: Callable[[int, int], np.ndarray],
    rows: range,
    run: Callable[[Iterable[np.ndarray]], Iterator[list[np.ndarray]]],
    write: Callable[[int, list[np.ndarray]], None],
    budget: Budget,
    progress: Callable[[int], None] = lambda n: None,
) -> None:
    """For the rows in `rows` (step: the batch size): `read(i, j)` gives rows i..j-1 of the
    input, `run(batches)` yields each batch's outputs in order, `write(first_row, outputs)`
    stores a gathered chunk. Reading, running and writing overlap. An error is raised here
    once the others have stopped: after a read error every row read before it is still run
    and written (a resumed run starts after them); after a forward or write error the
    others stop at once."""
    inbox: queue.Queue = queue.Queue(budget.read_ahead)
    outbox: queue.Queue = queue.Queue(budget.write_behind)
    failed: list[BaseException] = []
    stop = threading.Event()

    def put(q: queue.Queue, item) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def reader() -> None:
        try:
            for i in rows:
                if stop.is_set():
                    return
                put(inbox, read(i, min(i + rows.step, rows.stop)))
        except BaseException as exc:  # what was read before still runs and is written
            failed.append(exc)
        finally:
            inbox.put(_END)  # taken by the forward pass, or by the drain below once it stops

    def writer() -> None:
        first, gathered, count = rows.start, [], 0
        try:
            while (item := outbox.get()) is not _END:
                gathered.append(item)
                count += len(item[0])
                if count >= budget.chunk_rows:
                    write(first, [np.concatenate(parts) for parts in zip(*gathered)])
                    first, gathered, count = first + count, [], 0
                progress(len(item[0]))
            if gathered:
                write(first, [np.concatenate(parts) for parts in zip(*gathered)])
        except BaseException as exc:
            failed.append(exc)
            stop.set()
            while outbox.get() is not _END:  # let the forward pass finish its puts
                pass

    def batches() -> Iterator[np.ndarray]:
        while not stop.is_set():
            try:
                batch = inbox.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if batch is _END:
                return
            yield batch

    threads = [threading.Thread(target=f, daemon=True) for f in (reader, writer)]
    for t in threads:
        t.start()
    try:
        for outputs in run(batches()):
            if stop.is_set():
                break
            put(outbox, outputs)
    except BaseException as exc:
        failed.append(exc)
        stop.set()
    finally:
        outbox.put(_END)
        while threads[0].is_alive():  # unblock a reader waiting to hand over a batch
            try:
                inbox.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        for t in threads:
            t.join()
    if failed:
        raise failed[0]
