"""Engine, sessions, and the outbox that sends task messages after commit.

Operations in `models/` only flush; the caller owns the transaction. `session_scope()` is
that caller in Celery tasks and scripts; the API's session middleware is the other one.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine as _create_engine
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

_OUTBOX = "studiox.outbox"
_SENDER = "studiox.send_task"
_UNSENT = "studiox.unsent"

# Publishes one message: (task type, task id), or (maintenance job name, its argument, such
# as a Stripe event id). The API and the worker each pass their Celery-backed sender;
# `models/` never sees Celery.
SendTask = Callable[[str, "uuid.UUID | str"], None]


# Seconds to wait for the server to accept a connection (unless the URL says otherwise): a
# database host that drops packets fails the request (503) or the task (retried) instead of
# holding it for ever. A refused or restarting server fails at once anyway.
CONNECT_TIMEOUT_SECONDS = 5
# TCP keepalives on both ends (each unless the URL sets its own). The server's matter most:
# a worker host that vanished (power, network) never closes its connections, and without
# them PostgreSQL would keep its session, and the lease of the task it ran, for about two
# hours (Linux's defaults); with them the session ends within about a minute and the reaper
# can refund the task. Behind PgBouncer, which refuses `options`, set `tcp_keepalives_*` in
# postgresql.conf instead and put `options=` in DATABASE_URL's query to skip these.
CLIENT_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
SERVER_KEEPALIVES = "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"


def create_engine(url: str, **kwargs) -> Engine:
    # pool_pre_ping: a pooled connection the server dropped (a restart, a failover) is
    # replaced at checkout, so the first request after an outage does not fail on it.
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        defaults = {"connect_timeout": CONNECT_TIMEOUT_SECONDS, **CLIENT_KEEPALIVES, "options": SERVER_KEEPALIVES}
        given = {**parsed.query, **kwargs.get("connect_args", {})}
        kwargs["connect_args"] = {**{k: v for k, v in defaults.items() if k not in given},
                                  **kwargs.get("connect_args", {})}
    return _create_engine(url, **kwargs)


# SQLSTATEs that mean "the server is going away or full", besides connection errors (08xxx).
_UNAVAILABLE_STATES = {"57P01", "57P02", "57P03", "53300"}


def database_unreachable(exc: DBAPIError) -> bool:
    """The database cannot be reached or dropped the connection: worth a retry (the API
    answers 503, a worker retries the task). Other OperationalErrors (a statement timeout,
    a program limit, disk full) are not."""
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate is None:
        return isinstance(exc, OperationalError)  # no server answer at all: connect failed
    return sqlstate.startswith("08") or sqlstate in _UNAVAILABLE_STATES


def make_session_factory(bind, *, send_task: SendTask | None = None, **kwargs) -> sessionmaker[Session]:
    info = {_SENDER: send_task} if send_task is not None else {}
    return sessionmaker(bind=bind, expire_on_commit=False, info=info, **kwargs)


def set_sender(session: Session, send_task: SendTask) -> None:
    """Give a session made elsewhere (a test's, the API's) the sender its outbox uses."""
    session.info[_SENDER] = send_task


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def enqueue_after_commit(session: Session, task_type: str, task_id: uuid.UUID | str) -> None:
    """Send the task's message once the session's transaction has committed; never on rollback.

    The one way a task message leaves: the API's submission, an operator's re-queue and the
    lost-message sweep all come through here. A message must name a committed row: sent
    earlier, a worker could load a row that is later rolled back, or not find it yet.
    """
    # Each message remembers the (innermost) transaction that queued it, so rolling back a
    # savepoint drops what was queued inside it.
    innermost = session.get_nested_transaction() or session.get_transaction()
    session.info.setdefault(_OUTBOX, []).append((innermost, task_type, task_id))


@event.listens_for(Session, "after_commit")
def _flush_outbox(session: Session) -> None:
    # Only the outermost commit means the row is visible to other connections.
    if session.in_nested_transaction():
        return
    outbox = session.info.pop(_OUTBOX, [])
    if not outbox:
        return
    send = session.info.get(_SENDER)
    if send is None:
        log.warning("%d task message(s) committed with no sender; the sweep will send them", len(outbox))
        return
    unsent = session.info.setdefault(_UNSENT, [])
    for index, (_, task_type, task_id) in enumerate(outbox):
        try:
            send(task_type, task_id)
        except ConnectionError as exc:
            # The broker is out of reach (the sender gave up within its bounded retry): the
            # others would each wait as long to fail the same way.
            log.warning("the broker is unavailable (%s): %d message(s) not sent", exc, len(outbox) - index)
            unsent.extend((t, i) for _, t, i in outbox[index:])
            return
        except Exception:  # the row is committed; the sweep re-sends lost messages
            log.exception("sending the message of task %s failed", task_id)
            unsent.append((task_type, task_id))


def unsent_messages(session: Session) -> list[tuple[str, uuid.UUID | str]]:
    """The messages whose send after the session's last commits failed (and forgets them):
    their rows are committed, so the lost-message sweep sends them later unless the caller
    withdraws them (the API's submission does, and answers 503)."""
    return session.info.pop(_UNSENT, [])


@event.listens_for(Session, "after_soft_rollback")
def _drop_outbox(session: Session, previous_transaction) -> None:
    if previous_transaction.parent is None:
        session.info.pop(_OUTBOX, None)
        return
    outbox = session.info.get(_OUTBOX)
    if outbox:
        outbox[:] = [entry for entry in outbox if not _within(entry[0], previous_transaction)]


def _within(transaction, ancestor) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False
