"""Per-process resources of a worker: settings, engine, sessions, storage.

Created on first use and dropped after fork (worker_process_init), so each pool child
has its own connections.
"""

from __future__ import annotations

from functools import cache

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from models.billing import BillingContext
from models.db import create_engine, make_session_factory
from models.events import Notify, set_notifier
from settings import Settings
from storage import Storage, storage_from_settings
from stripe_gateway import billing_context


@cache
def settings() -> Settings:
    return Settings.from_env()


@cache
def engine() -> Engine:
    # Each child runs one task at a time: the session, the lease and a progress write.
    made = create_engine(settings().database_url, pool_size=3, max_overflow=5)
    if settings().events_redis_url:
        from notify import RedisNotifier

        _notifiers[made] = RedisNotifier(settings().events_redis_url)
    return made


# Engine -> the notifier of every session that runs on it (see _give_notifier).
_notifiers: dict[Engine, Notify] = {}


@event.listens_for(Session, "after_begin")
def _give_notifier(session: Session, transaction, connection) -> None:
    # Event wake-ups (notify.py) for every session on this process's engine: those of
    # sessions() and also those a task's lease makes on its own connection (models/leases.py),
    # which carry the task's start, progress and completion.
    notify = _notifiers.get(connection.engine)
    if notify is not None:
        set_notifier(session, notify)


@cache
def sessions() -> sessionmaker[Session]:
    # Task messages a job commits (the sweep's re-sends) go out through the worker's app.
    from .app import app
    from .queue import TaskQueue

    return make_session_factory(engine(), send_task=TaskQueue(app).send)


@cache
def storage() -> Storage:
    # Made after fork like the engine: a boto3 client must not be shared across processes.
    return storage_from_settings(settings())


@cache
def billing() -> BillingContext:
    return billing_context(settings())


def reset() -> None:
    if engine.cache_info().currsize:
        # Forget the parent's pooled connections without closing them under its feet.
        engine().dispose(close=False)
    _notifiers.clear()
    for fn in (engine, sessions, storage, billing):
        fn.cache_clear()
