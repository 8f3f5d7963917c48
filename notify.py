"""Wake-ups for the event log: each committed event's id PUBLISHed on Redis pub/sub.

`models.events` calls a session's notifier after the outermost commit with the new events
(`Notice`s); `RedisNotifier` publishes each id on its task's channel and its user's. The API
(`create_app`) and the workers (`worker/runtime.py`) set it on their sessions; the API's
waiting requests and event streams subscribe (`api/live.py`).

A notice is only a wake-up: readers re-read the `events` table, so a lost one delays a
waiter (until its deadline or the stream's next keep-alive), it never loses an event. So a
publish that fails is logged and dropped, and the transaction it follows stands.
"""

from __future__ import annotations

import logging
import time
import uuid

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from models.events import Notice

log = logging.getLogger(__name__)

# Pub/sub channels are server-wide (not per Redis database): the prefix keeps ours apart.
TASK_CHANNEL = "studiox:task:"
USER_CHANNEL = "studiox:user:"


def task_channel(task_id: uuid.UUID | str) -> str:
    return f"{TASK_CHANNEL}{task_id}"


def user_channel(user_id: uuid.UUID | str) -> str:
    return f"{USER_CHANNEL}{user_id}"


def redis_client(url: str, *, timeout: float) -> redis.Redis:
    """A client that fails fast and never retries by itself: a wake-up is worth little once late."""
    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                socket_keepalive=True, retry=Retry(NoBackoff(), 0))


class RedisNotifier:
    """A `models.events.Notify`: one round trip per commit (a pipeline of PUBLISHes)."""

    # A publish runs after every commit that wrote events (a worker's progress included): a
    # Redis that hangs must not slow them down, so a failure pauses publishing for a while.
    TIMEOUT_SECONDS = 0.5
    PAUSE_AFTER_FAILURE_SECONDS = 5.0

    def __init__(self, url: str):
        self.url = url
        self._redis = redis_client(url, timeout=self.TIMEOUT_SECONDS)
        self._paused_until = 0.0

    def __call__(self, notices: list[Notice]) -> None:
        if time.monotonic() < self._paused_until:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            for notice in notices:
                if notice.task_id is not None:
                    pipe.publish(task_channel(notice.task_id), notice.id)
                pipe.publish(user_channel(notice.user_id), notice.id)
            pipe.execute()
        except redis.RedisError as exc:
            # At most one warning per pause.
            self._paused_until = time.monotonic() + self.PAUSE_AFTER_FAILURE_SECONDS
            log.warning("publishing %d event wake-up(s) failed (%s); paused for %.0f s, waiters re-read "
                        "on their own deadline", len(notices), exc, self.PAUSE_AFTER_FAILURE_SECONDS)
