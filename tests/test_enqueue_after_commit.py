"""A task message is sent only once the row it names is committed, and never on rollback."""

from __future__ import annotations

import uuid

from models import AiTask
from models.db import on_commit
from models.tasks import submit_task
from models.users import initialize_user


class TestAfterCommit:
    def test_callback_runs_after_commit_and_sees_the_row_from_another_connection(self, e2e_db):
        seen = []
        with e2e_db() as s:
            user, _ = initialize_user(s, f"u_{uuid.uuid4().hex[:8]}")
            task, _ = submit_task(s, user, "image_analysis", "x", {})

            def check():
                with e2e_db() as other:  # a different connection, as a worker would be
                    seen.append(other.get(AiTask, task.id) is not None)

            on_commit(s, check)
            assert seen == []
            s.commit()
        assert seen == [True]

    def test_callback_is_dropped_on_rollback(self, e2e_db):
        called = []
        with e2e_db() as s:
            initialize_user(s, f"u_{uuid.uuid4().hex[:8]}")
            on_commit(s, lambda: called.append(1))
            s.rollback()
            s.commit()
        assert called == []

    def test_a_savepoint_release_is_not_a_commit(self, e2e_db):
        called = []
        with e2e_db() as s:
            with s.begin_nested():
                on_commit(s, lambda: called.append(1))
            assert called == []
            s.commit()
        assert called == [1]

    def test_a_failing_send_does_not_undo_the_committed_task(self, e2e_db):
        with e2e_db() as s:
            user, _ = initialize_user(s, f"u_{uuid.uuid4().hex[:8]}")
            task, _ = submit_task(s, user, "image_analysis", "x", {})
            on_commit(s, lambda: 1 / 0)  # the broker is down: logged, the sweeper re-sends later
            s.commit()
        with e2e_db() as s:
            assert s.get(AiTask, task.id).status == "pending"
