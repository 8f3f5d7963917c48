"""A task message is sent only once the row it names is committed, and never on rollback,
through one outbox for every caller (the API, an operator's re-queue, the sweep)."""

from __future__ import annotations

import uuid
from datetime import timedelta

from models import AiTask
from models.db import enqueue_after_commit, set_sender
from models.tasks import admin_set_status, requeue_lost_tasks
from tests.support.builders import make_task, make_user


class Recorder:
    def __init__(self, check=None):
        self.sent: list[tuple[str, uuid.UUID]] = []
        self.check = check

    def __call__(self, task_type: str, task_id: uuid.UUID) -> None:
        if self.check is not None:
            self.check(task_id)
        self.sent.append((task_type, task_id))


class TestOutbox:
    def test_submission_is_sent_after_commit_and_the_row_is_visible_to_another_connection(self, e2e_db):
        seen = []

        def visible(task_id):
            with e2e_db() as other:  # a different connection, as a worker would be
                seen.append(other.get(AiTask, task_id) is not None)

        send = Recorder(visible)
        with e2e_db() as s:
            set_sender(s, send)
            user = make_user(s)
            task = make_task(s, user)
            assert send.sent == []
            s.commit()
        assert send.sent == [("image_analysis", task.id)] and seen == [True]

    def test_nothing_is_sent_on_rollback(self, e2e_db):
        send = Recorder()
        with e2e_db() as s:
            set_sender(s, send)
            user = make_user(s)
            make_task(s, user)
            s.rollback()
            s.commit()
        assert send.sent == []

    def test_a_savepoint_release_is_not_a_commit(self, e2e_db):
        send = Recorder()
        with e2e_db() as s:
            set_sender(s, send)
            with s.begin_nested():
                enqueue_after_commit(s, "image_analysis", uuid.uuid4())
            assert send.sent == []
            s.commit()
        assert len(send.sent) == 1

    def test_a_rolled_back_savepoint_takes_its_messages_with_it(self, e2e_db):
        send = Recorder()
        kept, dropped = uuid.uuid4(), uuid.uuid4()
        with e2e_db() as s:
            set_sender(s, send)
            enqueue_after_commit(s, "image_analysis", kept)
            nested = s.begin_nested()
            enqueue_after_commit(s, "image_analysis", dropped)
            nested.rollback()
            s.commit()
        assert send.sent == [("image_analysis", kept)]

    def test_a_failing_send_does_not_undo_the_committed_task(self, e2e_db):
        def broker_down(task_type, task_id):
            raise ConnectionError("broker down")  # logged; the sweep re-sends later

        with e2e_db() as s:
            set_sender(s, broker_down)
            user = make_user(s)
            task = make_task(s, user)
            s.commit()
        with e2e_db() as s:
            assert s.get(AiTask, task.id).status == "pending"

    def test_operator_requeue_and_sweep_use_the_same_outbox(self, e2e_db):
        send = Recorder()
        with e2e_db() as s:
            user = make_user(s)
            task = make_task(s, user)
            s.commit()
        with e2e_db() as s:
            set_sender(s, send)
            admin_set_status(s, task.id, "pending")
            s.commit()
        assert send.sent == [("image_analysis", task.id)]
        with e2e_db() as s:
            set_sender(s, send)
            assert requeue_lost_tasks(s, timedelta(seconds=-60)) == 1
            assert send.sent == [("image_analysis", task.id)]  # not before commit
            s.commit()
        assert send.sent == [("image_analysis", task.id)] * 2
