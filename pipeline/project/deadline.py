"""Waits on something outside (a filesystem URI, a download host) that end at a deadline."""

from __future__ import annotations

import queue
import threading


def with_deadline(seconds: float, what: str, call, *args):
    """call(*args) on a daemon thread, waited for at most `seconds` (TimeoutError after): a
    client that retries an unreachable host, or a name lookup, which has no timeout of its
    own, must not hang the stage (the thread is left behind)."""
    box = queue.SimpleQueue()

    def run() -> None:
        try:
            box.put((True, call(*args)))
        except BaseException as exc:  # handed to the caller
            box.put((False, exc))

    threading.Thread(target=run, daemon=True, name=f"deadline: {what}").start()
    try:
        ok, value = box.get(timeout=seconds)
    except queue.Empty:
        raise TimeoutError(f"no answer within {seconds:g} s") from None
    if not ok:
        raise value
    return value
