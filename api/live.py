"""Waiting on a task: `Prefer: wait` (RFC 7240) and the task's Server-Sent Events stream.

Both wait the same way, with no polling loop while Redis is there: subscribe to the task's
channel (`notify.task_channel`), then read (so nothing committed between is missed), then
wait on the subscription for the time left, and read again on each wake-up. A process has
one Redis subscription (`Hub`), shared by all its waiters; a waiter holds no database
connection while it waits (each read is a short session of its own or a commit ends it).

Without Redis (RabbitMQ as the broker and no EVENTS_REDIS_URL), or while the subscription is
down, waiters read every `events_poll_seconds` instead: a bounded poll.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import falcon
import redis
from pydantic import Field
from sqlalchemy import exists, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from models import AiTask
from models.errors import InvalidInput, TaskNotFound
from models.events import TASK_EVENT_TYPES, Event
from models.tasks import FINAL_STATUSES, get_task_of, queue_positions
from notify import redis_client, task_channel
from settings import Settings

from . import schemas
from .context import parse_uuid
from .openapi import operation
from .serialize import media

log = logging.getLogger("studiox.api.live")

# RFC 7240 leaves the most a server waits to the server: a minute, and plain `wait` is that.
MAX_WAIT_SECONDS = 60
FINAL_EVENT_TYPES = tuple(f"task.{status}" for status in FINAL_STATUSES)


# --- the shared subscription ----------------------------------------------------------------

class Watch:
    """One waiter's interest in one channel. `ready` once the subscription is confirmed by
    Redis (reads after that miss nothing); until then, and while Redis is away, `wait`
    returns after `poll` seconds at most, so the waiter polls."""

    def __init__(self, hub: Hub | None, channel: str, poll: float):
        self.hub, self.channel, self.poll = hub, channel, poll
        self.ready = threading.Event()
        self._woken = threading.Event()

    def clear(self) -> None:
        """Call before each read: a wake-up that lands after it is kept for the next wait."""
        self._woken.clear()

    def wake(self) -> None:
        self._woken.set()

    def wait(self, timeout: float) -> bool:
        """Until woken or `timeout` seconds (at most `poll` unless subscribed); True if woken."""
        if not self.ready.is_set():
            timeout = min(timeout, self.poll)
        return self._woken.wait(max(0.0, timeout))

    def close(self) -> None:
        if self.hub is not None:
            self.hub.forget(self)


class Hub:
    """This process's Redis subscription, shared by every waiter: channels are subscribed
    while someone waits on them, and a message wakes that channel's waiters.

    A listener thread (a greenlet under gunicorn's gevent workers) reads the subscription.
    If it fails, every waiter is woken and polls until the listener has subscribed again on
    a new connection and Redis confirmed it; then they are woken once more to re-read."""

    CONFIRM_SECONDS = 2.0  # a waiter waits this long for Redis to confirm its subscription
    LISTEN_SECONDS = 5.0
    RECONNECT_SECONDS = 1.0

    _hubs: ClassVar[dict[tuple[int, str], Hub]] = {}
    _hubs_lock = threading.Lock()

    @classmethod
    def for_url(cls, url: str) -> Hub:
        """One hub per process and Redis URL (a forked process makes its own)."""
        key = (os.getpid(), url)
        with cls._hubs_lock:
            hub = cls._hubs.get(key)
            if hub is None:
                hub = cls._hubs[key] = cls(url)
            return hub

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.Lock()
        self._watches: dict[str, set[Watch]] = {}
        self._unconfirmed: dict[str, int] = {}  # SUBSCRIBEs sent on this connection, not yet confirmed
        self._pubsub: redis.client.PubSub | None = None
        self._thread: threading.Thread | None = None
        self._down = False

    # SUBSCRIBE and UNSUBSCRIBE are sent under the lock, so that they reach Redis in the
    # order the registry changed (an UNSUBSCRIBE overtaking a newer SUBSCRIBE of the same
    # channel would leave a waiter subscribed to nothing).

    def watch(self, channel: str, poll: float) -> Watch:
        watch = Watch(self, channel, poll)
        error = None
        with self._lock:
            self._start()
            pubsub = self._pubsub
            peers = self._watches.setdefault(channel, set())
            subscribe = not peers and pubsub is not None
            peers.add(watch)
            if subscribe:
                self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
                try:
                    pubsub.subscribe(channel)
                except redis.RedisError as exc:
                    error = exc
            elif pubsub is not None and not self._unconfirmed.get(channel):
                watch.ready.set()
        if error is not None:
            self._failed(pubsub, error)
        elif pubsub is not None:
            watch.ready.wait(self.CONFIRM_SECONDS)
        # Otherwise Redis is away: the waiter polls until the listener subscribed again.
        return watch

    def forget(self, watch: Watch) -> None:
        error = None
        with self._lock:
            peers = self._watches.get(watch.channel)
            if peers is None:
                return
            peers.discard(watch)
            if peers:
                return
            del self._watches[watch.channel]
            pubsub = self._pubsub
            if pubsub is not None:
                try:
                    pubsub.unsubscribe(watch.channel)
                except redis.RedisError as exc:
                    error = exc
        if error is not None:
            self._failed(pubsub, error)

    # -- the listener --------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._pubsub = redis_client(self.url, timeout=self.CONFIRM_SECONDS).pubsub()
            self._thread = threading.Thread(target=self._listen, name="studiox-events-hub", daemon=True)
            self._thread.start()

    def _listen(self) -> None:
        while True:
            pubsub = self._pubsub
            try:
                if pubsub is None:
                    pubsub = self._reconnect()
                message = pubsub.get_message(timeout=self.LISTEN_SECONDS)
                if message is not None:
                    self._dispatch(message)
            except Exception as exc:  # a lost connection, or anything else: start afresh
                self._failed(pubsub, exc)
                time.sleep(self.RECONNECT_SECONDS)

    def _reconnect(self) -> redis.client.PubSub:
        pubsub = redis_client(self.url, timeout=self.CONFIRM_SECONDS).pubsub()
        try:
            with self._lock:
                channels = set(self._watches)
            if channels:
                pubsub.subscribe(*channels)
            else:
                pubsub.ping()  # fails here while Redis is still away
            with self._lock:
                # Waiters came and went while it subscribed: catch up with them.
                missing, gone = set(self._watches) - channels, channels - set(self._watches)
                if missing:
                    pubsub.subscribe(*missing)
                if gone:
                    pubsub.unsubscribe(*gone)
                self._unconfirmed = dict.fromkeys(channels | missing, 1)
                self._pubsub = pubsub
                was_down, self._down = self._down, False
        except BaseException:
            pubsub.close()
            raise
        if was_down:
            log.info("event wake-ups: subscribed again (%d channel(s))", len(channels | missing))
        return pubsub

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        kind = message["type"]
        with self._lock:
            peers = list(self._watches.get(channel, ()))
            if kind == "subscribe":
                left = max(0, self._unconfirmed.get(channel, 0) - 1)
                if left:
                    self._unconfirmed[channel] = left
                    return
                self._unconfirmed.pop(channel, None)
        if kind == "subscribe":
            for watch in peers:
                if not watch.ready.is_set():
                    watch.ready.set()
                    watch.wake()  # it may have read before the subscription: read again
        elif kind == "message":
            for watch in peers:
                watch.wake()

    def _failed(self, pubsub: redis.client.PubSub | None, exc: Exception) -> None:
        with self._lock:
            if pubsub is not None and pubsub is not self._pubsub:
                return  # already handled
            self._pubsub = None
            self._unconfirmed = {}
            peers = [watch for group in self._watches.values() for watch in group]
            was_down, self._down = self._down, True
        if not was_down:
            log.warning("event wake-ups: the Redis subscription failed (%s); waiters poll the database every "
                        "few seconds until it is back", exc)
        for watch in peers:
            watch.ready.clear()
            watch.wake()
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:
                pass


# --- waiting --------------------------------------------------------------------------------

class Waits:
    """Waiting in this process: the shared subscription (or polling) and the cap on requests
    held by `Prefer: wait`. Event streams are not counted: the events process's
    worker_connections bound them."""

    def __init__(self, redis_url: str = "", *, limit: int = 0, poll_seconds: float = 2.0):
        self.redis_url, self.limit, self.poll_seconds = redis_url, limit, poll_seconds
        self._held = 0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Waits:
        return cls(settings.events_redis_url, limit=settings.wait_max_per_process,
                   poll_seconds=settings.events_poll_seconds)

    @property
    def held(self) -> int:
        return self._held

    @contextmanager
    def slot(self) -> Iterator[bool]:
        """True if this request may wait (under the cap), held until the block ends."""
        with self._lock:
            granted = self._held < self.limit
            if granted:
                self._held += 1
        try:
            yield granted
        finally:
            if granted:
                with self._lock:
                    self._held -= 1

    @contextmanager
    def watch(self, task_id: uuid.UUID) -> Iterator[Watch]:
        hub = Hub.for_url(self.redis_url) if self.redis_url else None
        watch = hub.watch(task_channel(task_id), self.poll_seconds) if hub else Watch(None, "", self.poll_seconds)
        try:
            yield watch
        finally:
            watch.close()


def preferred_wait(req: falcon.Request) -> int | None:
    """Seconds the client prefers to wait (`Prefer: wait=N`, plain `wait` = the most), capped
    at MAX_WAIT_SECONDS; None when it did not ask. A malformed preference is ignored, as
    RFC 7240 asks of preferences a server does not understand."""
    header = req.get_header("Prefer")
    if not header:
        return None
    for preference in header.split(","):
        token = preference.split(";", 1)[0].strip()
        name, _, value = token.partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        if not value:
            return MAX_WAIT_SECONDS
        if not value.isdigit():
            return None
        return min(int(value), MAX_WAIT_SECONDS) or None
    return None


def wait_for_task(req: falcon.Request, resp: falcon.Response, waits: Waits | None, task: AiTask) -> None:
    """Honour `Prefer: wait` on a responder that answers with `task`: hold the answer until
    the task is final or the time is up, with `task` re-read, and say so in
    `Preference-Applied`. The request's session is committed before each wait, so a waiting
    request holds no pooled connection (a read after it checks one out again)."""
    seconds = preferred_wait(req)
    if seconds is None or waits is None or task.is_final:
        if seconds is not None and waits is not None:
            _applied(resp, seconds)  # nothing to wait for: the answer is already final
        return
    session: Session = req.context.session
    with waits.slot() as granted:
        if not granted:
            log.info("Prefer: wait not applied: %d request(s) already wait in this process", waits.limit)
            return
        session.commit()
        deadline = time.monotonic() + seconds
        with waits.watch(task.id) as watch:
            while True:
                watch.clear()
                session.refresh(task)
                session.commit()
                remaining = deadline - time.monotonic()
                if task.is_final or remaining <= 0:
                    break
                watch.wait(remaining)
    _applied(resp, seconds)


def _applied(resp: falcon.Response, seconds: int) -> None:
    resp.set_header("Preference-Applied", f"wait={seconds}")
    resp.append_header("Vary", "Prefer")


PREFER_HEADER = {
    "name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"}, "examples": {
        "wait": {"value": "wait=10", "summary": "answer once the task is final, or after 10 s"}},
    "description": f"`wait=N` (RFC 7240; at most {MAX_WAIT_SECONDS} s, plain `wait` is {MAX_WAIT_SECONDS}): hold "
                   "the answer until the task is completed, failed, cancelled or expired, or N seconds passed, "
                   "then answer with the task as it is then, with `Preference-Applied: wait=N`. When too many "
                   "requests already wait in the process, it answers at once without Preference-Applied.",
}
PREFERENCE_APPLIED = {"Preference-Applied": {
    "description": "`wait=N` when the answer waited (RFC 7240); absent when it did not", "required": False,
    "schema": {"type": "string", "pattern": "^wait=[0-9]+$"}}}
WAIT_NOTE = (" With `Prefer: wait=N` the answer waits until the task is final or N seconds passed "
             "(`Preference-Applied: wait=N` says it did).")


# --- the event stream -----------------------------------------------------------------------

class TaskEventsQuery(schemas.RequestSchema):
    last_event_id: int | None = Field(None, ge=0, le=2**63 - 1, description=(
        "As the Last-Event-ID header, for clients that cannot send headers on a reconnect"))
    error_codes: ClassVar[dict[str, str]] = {"lastEventId": "invalid_last_event_id"}


LAST_EVENT_ID_HEADER = {
    "name": "Last-Event-ID", "in": "header", "required": False,
    "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
    "description": "The id of the last event received: the stream starts after it (an EventSource sends it "
                   "when it reconnects)",
}
# OpenAPI 3.1 reads the schema of an event stream as the schema of each event.
EVENT_STREAM_DOC = {"text/event-stream": {
    "schema": {
        "type": "object", "required": ["event", "data"],
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9]+$",
                   "description": "The event's id in the log (none on `queue` events); send it back as Last-Event-ID"},
            "event": {"type": "string", "enum": [*TASK_EVENT_TYPES, "queue"]},
            "data": {"type": "string", "contentMediaType": "application/json", "description": (
                "JSON: the event's data (status, progress, errorCode, attempt, queuePosition); the final event's "
                "also has `task`, the task as GET /api/tasks/{task_id} shows it")},
            "retry": {"type": "integer", "description": "Milliseconds to wait before reconnecting"},
        },
    },
    "example": (
        'retry: 2000\n\n'
        'id: 41\nevent: task.started\ndata: {"status":"processing","attempt":1}\n\n'
        ': keep-alive\n\n'
        'id: 42\nevent: task.progress\ndata: {"status":"processing","progress":10}\n\n'
        'id: 53\nevent: task.completed\ndata: {"status":"completed","task":{"id":"...","status":"completed"}}\n\n'),
}}


def _frame(kind: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class TaskEventsResource:
    """GET /api/tasks/{id}/events: the task's rows of the event log as Server-Sent Events."""

    PAGE = 100  # events read at a time
    RECONNECT_MILLISECONDS = 2000

    def __init__(self, sessions: sessionmaker[Session] | None, waits: Waits | None, *, keepalive_seconds: float = 15.0):
        self.sessions, self.waits, self.keepalive_seconds = sessions, waits or Waits(), keepalive_seconds

    @operation(
        "Follow a task as Server-Sent Events until it is final", query=TaskEventsQuery,
        headers=(LAST_EVENT_ID_HEADER,), responses={200: EVENT_STREAM_DOC, 204: {}}, errors=(404,),
        description="One event per change of the task, in order: `id` is the event's id, `event` its type "
                    "(task.started, task.progress at each tenth, task.completed, task.failed, task.cancelled, "
                    "task.expired), `data` its JSON; the final one carries the whole task as GET "
                    "/api/tasks/{id} shows it, and the stream ends after it. While the task is pending, `queue` "
                    "events (no id) give its queuePosition. An idle stream gets a `: keep-alive` comment every "
                    "15 s. A reconnecting client sends Last-Event-ID (or lastEventId) and gets exactly what it "
                    "missed; once the final event was received there is nothing more: 204, which tells an "
                    "EventSource to stop reconnecting. Serve it from the `events` process (Procfile).")
    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str, query: TaskEventsQuery) -> None:
        after = self._last_event_id(req, query)
        session: Session = req.context.session
        task = get_task_of(session, req.context.identity.clerk_id, parse_uuid(task_id, not_found=TaskNotFound))
        if after is not None and task.is_final and not session.scalar(select(exists().where(
                Event.task_id == task.id, Event.id > after))):
            resp.status = falcon.HTTP_204  # the client has the final event: stop reconnecting
            return
        resp.content_type = "text/event-stream"
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")  # nginx: pass each event on at once
        resp.stream = self._stream(task.id, after or 0)

    @staticmethod
    def _last_event_id(req: falcon.Request, query: TaskEventsQuery) -> int | None:
        header = req.get_header("Last-Event-ID")
        if header is None or not header.strip():
            return query.last_event_id
        header = header.strip()
        if not header.isdigit() or len(header) > 18:
            raise InvalidInput("Last-Event-ID must be the id of an event of this stream",
                               code="invalid_last_event_id")
        return int(header)

    def _stream(self, task_id: uuid.UUID, after: int) -> Iterator[bytes]:
        # The session of the request is closed by now (the middleware ends it before the body
        # is sent): each read below is a short session of its own, never held while waiting.
        yield f"retry: {self.RECONNECT_MILLISECONDS}\n\n".encode()
        position: int | None = None
        with self.waits.watch(task_id) as watch:
            next_keepalive = time.monotonic() + self.keepalive_seconds
            while True:
                watch.clear()
                try:
                    frames, after, done, now_position, more = self._read(task_id, after)
                except DBAPIError:
                    # Past the headers an error cannot be answered: end the stream, and the
                    # client reconnects (after `retry`) from its Last-Event-ID.
                    log.warning("event stream of task %s ended: the database failed", task_id, exc_info=True)
                    return
                yield from frames
                if done:
                    return
                if now_position is not None and now_position != position:
                    position = now_position
                    yield _frame("queue", {"status": "pending", "queuePosition": position})
                if more:
                    continue
                remaining = next_keepalive - time.monotonic()
                if remaining <= 0:
                    # Also the safety net: a wake-up that was lost (Redis restarting) is
                    # caught up at the next keep-alive by the read above.
                    yield b": keep-alive\n\n"
                    next_keepalive = time.monotonic() + self.keepalive_seconds
                    continue
                watch.wait(remaining)

    def _read(self, task_id: uuid.UUID, after: int) -> tuple[list[bytes], int, bool, int | None, bool]:
        """(frames, the last id sent, whether the stream is done, the queue position while
        pending, whether more events wait to be read)."""
        with self.sessions() as session:
            events = session.scalars(select(Event).where(Event.task_id == task_id, Event.id > after)
                                     .order_by(Event.id).limit(self.PAGE)).all()
            frames: list[bytes] = []
            for event in events:
                data = dict(event.data or {})
                final = event.type in FINAL_EVENT_TYPES
                if final:
                    data["task"] = self._task_json(session, task_id)
                frames.append(_frame(event.type, data, event.id))
                after = event.id
                if final:
                    return frames, after, True, None, False
            if len(events) == self.PAGE:
                return frames, after, False, None, True
            task = session.get(AiTask, task_id)
            if task is None:
                return frames, after, True, None, False
            if task.is_final:
                # Each statement reads its own snapshot: the task may have ended after the events
                # were read, and then its final event is there to read now.
                final_id = session.scalar(select(Event.id).where(
                    Event.task_id == task_id, Event.type.in_(FINAL_EVENT_TYPES)).order_by(Event.id.desc()).limit(1))
                if final_id is not None and final_id > after:
                    return frames, after, False, None, True
                if final_id is None:
                    # It ended before the event log existed: the task itself is the end.
                    frames.append(_frame(f"task.{task.status}", {"status": task.status,
                                                                 "task": self._task_json(session, task_id)}))
                return frames, after, True, None, False
            position = queue_positions(session, [task]).get(task.id) if task.status == "pending" else None
            return frames, after, False, position, False

    @staticmethod
    def _task_json(session: Session, task_id: uuid.UUID) -> dict[str, Any]:
        from .tasks import task_view

        return media(task_view(session, session.get(AiTask, task_id, populate_existing=True)))
