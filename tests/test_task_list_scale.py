"""The task list stays an index range scan with 100,000 tasks for one user: no OFFSET, no
sort of the user's whole history, whichever page and filter."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from models import AiTask
from models.tasks import encode_cursor, list_tasks, list_tasks_query
from tests.support.builders import make_user

N = 100_000


@pytest.fixture
def busy_user(session):
    user, other = make_user(session), make_user(session)
    for owner, n in ((user.id, N), (other.id, 5_000)):
        session.execute(text("""
            INSERT INTO ai_tasks (id, user_id, type, status, input, params, credits_used, queue, created_at)
            SELECT gen_random_uuid(), :uid,
                   (ARRAY['image_analysis','advanced_editing','video_generation'])[1 + i % 3],
                   (ARRAY['completed','failed','cancelled','completed'])[1 + i % 4],
                   to_jsonb('in-' || i), '{}', 1, 'q', now() - make_interval(secs => i)
            FROM generate_series(1, :n) AS i"""), {"uid": owner, "n": n})
    session.execute(text("ANALYZE ai_tasks"))
    return user


def plan_of(session, query) -> dict:
    compiled = query.compile(session.get_bind(), compile_kwargs={"literal_binds": True})
    return session.execute(text(f"EXPLAIN (FORMAT JSON) {compiled}")).scalar()[0]["Plan"]


def nodes(plan):
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


class TestTaskListAtScale:
    @pytest.mark.parametrize("filters", [{}, {"status": "failed"}, {"task_type": "video_generation"}])
    def test_a_deep_page_is_an_index_range_without_a_sort(self, session, busy_user, filters):
        rows, _ = list_tasks(session, busy_user, limit=100, **filters)
        assert len(rows) == 100
        # Jump deep: the cursor of a task 90,000 rows in.
        deep = session.execute(text(
            "SELECT created_at, id FROM ai_tasks WHERE user_id = :u ORDER BY created_at DESC, id DESC OFFSET 90000 LIMIT 1"
        ), {"u": busy_user.id}).one()
        deep_cursor = encode_cursor(AiTask(created_at=deep.created_at, id=deep.id))
        plan = plan_of(session, list_tasks_query(busy_user.id, cursor=deep_cursor, limit=20, **filters))
        kinds = [n["Node Type"] for n in nodes(plan)]
        assert "Sort" not in kinds and "Seq Scan" not in kinds, json.dumps(plan)[:2000]
        index_nodes = [n for n in nodes(plan) if n["Node Type"] in ("Index Scan", "Index Only Scan")]
        assert index_nodes and index_nodes[0]["Index Name"].startswith("ix_ai_tasks_user_")
        # The keyset condition is part of the index range, not a filter applied row by row.
        assert "created_at" in index_nodes[0].get("Index Cond", "")

    def test_pages_cover_the_history_in_order_without_overlap(self, session, busy_user):
        seen, cursor = [], None
        for _ in range(5):
            rows, cursor = list_tasks(session, busy_user, cursor=cursor, limit=100)
            seen += [(r.created_at, r.id) for r in rows]
        assert len(seen) == len(set(seen)) == 500
        assert seen == sorted(seen, reverse=True)
