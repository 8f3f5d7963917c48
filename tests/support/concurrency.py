"""Run one function in many threads released at the same instant."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


def at_once(n: int, fn):
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))
