"""Engine, sessions and the after-commit hook.

Operations in `models/` only flush; the caller owns the transaction. `session_scope()` is
that caller in Celery tasks and scripts; the API's session middleware is the other one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine as _create_engine
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, make_transient_to_detached, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

log = logging.getLogger(__name__)

_AFTER_COMMIT = "studiox.after_commit"
_INSERTED = "studiox.core_inserted"
_SYNCED = "studiox.core_synced"


def create_engine(url: str, **kwargs) -> Engine:
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return _create_engine(url, **kwargs)


def make_session_factory(engine_or_conn, **kwargs) -> sessionmaker[Session]:
    return sessionmaker(bind=engine_or_conn, expire_on_commit=False, **kwargs)


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


def on_commit(session: Session, callback: Callable[[], object]) -> None:
    """Run `callback` once the session's transaction has committed; drop it on rollback.

    A task message must name a committed row: sent earlier, a worker could load a row that
    is later rolled back, or not find it yet.
    """
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    # Only the outermost commit means the row is visible to other connections.
    if session.in_nested_transaction():
        return
    # Committed: Core writes are no longer the rollback hook's business.
    session.info.pop(_INSERTED, None)
    session.info.pop(_SYNCED, None)
    callbacks = session.info.pop(_AFTER_COMMIT, [])
    for callback in callbacks:
        try:
            callback()
        except Exception:  # the row is committed; the sweeper re-sends lost messages
            log.exception("after-commit callback failed")


def attach_inserted(session: Session, obj):
    """Make `obj`, whose row a Core INSERT just wrote with every column, a persistent object
    of the session: what a unit-of-work flush leaves behind, at a fraction of its cost on
    the paths every task takes. A rollback detaches it again (see below)."""
    make_transient_to_detached(obj)
    session.add(obj)
    session.info.setdefault(_INSERTED, []).append(obj)
    return obj


def set_synced(session: Session, obj, **values) -> None:
    """Set loaded attributes of `obj` (None: the session holds no such object) to what a
    Core UPDATE just wrote to its row, without marking them changed; a rollback expires
    them again (see below)."""
    if obj is None:
        return
    for name, value in values.items():
        set_committed_value(obj, name, value)
    session.info.setdefault(_SYNCED, []).append(obj)


@event.listens_for(Session, "after_soft_rollback")
def _drop_after_rollback(session: Session, previous_transaction) -> None:
    if previous_transaction.parent is None:
        session.info.pop(_AFTER_COMMIT, None)
    # The session's rollback bookkeeping knows nothing of Core writes: detach the rows
    # attach_inserted attached, so none is taken for a row the rollback removed, and expire
    # what set_synced set. (After a savepoint rollback this also covers earlier writes: a
    # detached object keeps its values, an expired one reloads.)
    for obj in session.info.pop(_INSERTED, []):
        if obj in session:
            session.expunge(obj)
    for obj in session.info.pop(_SYNCED, []):
        if obj in session:
            session.expire(obj)
