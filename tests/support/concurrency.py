"""Run one function in many threads released at the same instant."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait


def at_once(n: int, fn, *, timeout: float = 120) -> list:
    """Call `fn(i)` for i in range(n), each in its own thread, all released together by a
    barrier; returns the results in order of i. Every thread finishes before the first
    error (by i) is re-raised; a thread still running after `timeout` seconds fails the test."""
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        return fn(i)

    pool = ThreadPoolExecutor(n)
    futures = [pool.submit(run, i) for i in range(n)]
    _, hung = wait(futures, timeout)
    pool.shutdown(wait=not hung)
    assert not hung, f"{len(hung)} of {n} threads hung"
    return [future.result() for future in futures]
