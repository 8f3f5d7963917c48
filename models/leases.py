"""Task leases: a PostgreSQL advisory lock held by whoever is running a task.

The lock lives on a dedicated connection for as long as the processor runs. If the
worker process dies (SIGKILL, OOM), its connection closes and PostgreSQL releases the
lock, so a redelivered message can take the lease and knows the earlier runner is gone;
while the runner lives, a duplicate delivery cannot take it and drops the message. The
stuck-task reaper uses the same test before failing a task.

The task's own transactions run on the lease's connection too (one pool checkout per task):
a session-level advisory lock outlives the transactions run while it is held.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from psycopg.pq import TransactionStatus
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from .db import make_session_factory, session_scope

log = logging.getLogger(__name__)
_KEY = "hashtextextended(:task_id, 0)"


def _try_lock(conn: Connection, task_id: uuid.UUID) -> bool:
    held = bool(conn.execute(text(f"SELECT pg_try_advisory_lock({_KEY})"), {"task_id": str(task_id)}).scalar())
    conn.commit()
    return held


class Lease:
    """The held lease of one task; `session()` runs one transaction on its connection."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._sessions = make_session_factory(conn)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction on the lease's connection, committed when the block ends."""
        try:
            with session_scope(self._sessions) as session:
                yield session
        except BaseException:
            # Interrupted mid-statement (a soft time limit), the rollback may not have reached
            # the server, which then still holds the transaction and its row locks: end the
            # connection's server session so that failing the task elsewhere cannot wait on
            # them (it also ends the lease, which the worker gives up next anyway).
            if not self.conn.invalidated and not _idle(self.conn):
                self.conn.invalidate()
            raise


def _idle(conn: Connection) -> bool:
    try:
        return conn.connection.dbapi_connection.info.transaction_status == TransactionStatus.IDLE
    except Exception:  # the connection is already unusable
        return False


@contextmanager
def task_lease(engine: Engine, task_id: uuid.UUID, wait_seconds: float = 0.0) -> Iterator[Lease | None]:
    """Yield the held lease of the task, or None if a live runner holds it.

    `wait_seconds` covers a killed runner whose server session has not ended yet.
    """
    with engine.connect() as conn:
        deadline = time.monotonic() + wait_seconds
        held = _try_lock(conn, task_id)
        while not held and time.monotonic() < deadline:
            time.sleep(0.1)
            held = _try_lock(conn, task_id)
        if not held:
            yield None
            return
        try:
            yield Lease(conn)
        finally:
            try:
                # An invalidated connection's server session is gone, and the lease with it.
                if not conn.invalidated:
                    conn.rollback()
                    conn.execute(text(f"SELECT pg_advisory_unlock({_KEY})"), {"task_id": str(task_id)})
                    conn.commit()
            except Exception:
                # The connection broke (a time limit interrupted a query, the server went
                # away): end its server session, which releases the lease, and let the
                # original exception, if any, be the one that propagates.
                log.warning("could not release the lease of task %s cleanly", task_id, exc_info=True)
                conn.invalidate()
