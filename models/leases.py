"""Task leases: a PostgreSQL advisory lock held by whoever is running a task.

The lock lives on a dedicated connection for as long as the processor runs. If the
worker process dies (SIGKILL, OOM), its connection closes and PostgreSQL releases the
lock, so a redelivered message can take the lease and knows the earlier runner is gone;
while the runner lives, a duplicate delivery cannot take it and drops the message. The
stuck-task reaper uses the same test before failing a task.

The lease's connection also runs the task's own statements (one pool checkout per task).
It sits in autocommit between transactions: the lock, the unlock and single-statement
operations then cost one round trip each instead of BEGIN, statement, COMMIT.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from .db import make_session_factory, session_scope

log = logging.getLogger(__name__)
_KEY = "hashtextextended(:task_id, 0)"
_AUTOCOMMIT = "AUTOCOMMIT"


def _try_lock(conn: Connection, task_id: uuid.UUID) -> bool:
    return bool(conn.execute(text(f"SELECT pg_try_advisory_lock({_KEY})"), {"task_id": str(task_id)}).scalar())


class Lease:
    """The held lease of one task, and the two ways to run statements on its connection."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._sessions = make_session_factory(conn)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose statements commit together (or not at all) when the block ends."""
        _end_autobegin(self.conn)
        # Switching the isolation level of an idle connection is client-side only in psycopg.
        self.conn.execution_options(isolation_level=self.conn.default_isolation_level)
        try:
            with session_scope(self._sessions) as session:
                yield session
        finally:
            try:
                if not self.conn.invalidated:
                    _end_autobegin(self.conn)
                    self.conn.execution_options(isolation_level=_AUTOCOMMIT)
            except Exception:
                # Interrupted mid-statement (a soft time limit): the connection is unusable;
                # let the original exception be the one that propagates. Releasing the
                # lease then ends its server session, which frees the lock.
                log.warning("lease connection left unusable", exc_info=True)
                self.conn.invalidate()

    @contextmanager
    def autocommit(self) -> Iterator[Session]:
        """A session where every statement commits on its own: only for reads and for an
        operation that is one statement (its atomicity is the statement's)."""
        _end_autobegin(self.conn)
        with session_scope(self._sessions) as session:
            yield session


def _end_autobegin(conn: Connection) -> None:
    # SQLAlchemy autobegins even in autocommit; a session joins (and would not end) a
    # transaction it finds open, and the isolation level cannot change under one.
    if conn.in_transaction():
        conn.commit()


@contextmanager
def task_lease(engine: Engine, task_id: uuid.UUID, wait_seconds: float = 0.0) -> Iterator[Lease | None]:
    """Yield the held lease of the task, or None if a live runner holds it.

    `wait_seconds` covers a killed runner whose server session has not ended yet.
    """
    # A session-level advisory lock outlives the transactions run while it is held, so the
    # holder's connection can run the task's own transactions.
    conn = engine.connect()
    try:
        conn.execution_options(isolation_level=_AUTOCOMMIT)
        deadline = time.monotonic() + wait_seconds
        held = _try_lock(conn, task_id)
        while not held and time.monotonic() < deadline:
            time.sleep(0.1)
            held = _try_lock(conn, task_id)
        _end_autobegin(conn)
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
            except Exception:
                # The connection broke (a time limit interrupted a query, the server went
                # away): end its server session, which releases the lease, and let the
                # original exception, if any, be the one that propagates.
                log.warning("could not release the lease of task %s cleanly", task_id, exc_info=True)
                conn.invalidate()
    finally:
        conn.close()
