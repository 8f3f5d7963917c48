"""Per-process resources of a worker: settings, engine, sessions, storage.

Created on first use and dropped after fork (worker_process_init), so each pool child
has its own connections.
"""

from __future__ import annotations

from functools import cache

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from models.billing import BillingContext
from models.db import create_engine, make_session_factory
from settings import Settings
from storage import Storage, storage_from_settings
from stripe_gateway import billing_context


@cache
def settings() -> Settings:
    return Settings.from_env()


@cache
def engine() -> Engine:
    # Each child runs one task at a time: the session, the lease and a progress write.
    return create_engine(settings().database_url, pool_size=3, max_overflow=5)


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
    for fn in (engine, sessions, storage, billing):
        fn.cache_clear()
