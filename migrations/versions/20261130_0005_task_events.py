"""Client features: the event log (`events`), task deadlines (`start_by`, status `expired`,
a default per plan), retries linked to the task they retry, and an index for queue
positions.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

OLD_STATUSES = "'pending', 'processing', 'completed', 'failed', 'cancelled'"
# Default deadlines: a free task waits an hour at most, a pro one six, an enterprise one a day.
DEFAULT_START_BY = {"free": 3600, "pro": 6 * 3600, "enterprise": 24 * 3600}


def upgrade() -> None:
    op.create_table('events',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=True), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('task_id', sa.Uuid(), nullable=True),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('data', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("(task_id IS NOT NULL) = (type LIKE 'task.%')", name=op.f('ck_events_task_events_name_task')),
    sa.CheckConstraint("type IN ('task.started', 'task.progress', 'task.completed', 'task.failed', 'task.cancelled',"
                       " 'task.expired', 'credits.low')", name=op.f('ck_events_type_known')),
    sa.ForeignKeyConstraint(['task_id'], ['ai_tasks.id'], name=op.f('fk_events_task_id_ai_tasks')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_events_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events'))
    )
    op.create_index('ix_events_task_id_id', 'events', ['task_id', 'id'], unique=False,
                    postgresql_where=sa.text('task_id IS NOT NULL'))
    op.create_index('ix_events_user_id_id', 'events', ['user_id', 'id'], unique=False)

    op.drop_constraint(op.f('ck_ai_tasks_status_known'), 'ai_tasks', type_='check')
    op.create_check_constraint(op.f('ck_ai_tasks_status_known'), 'ai_tasks',
                               f"status IN ({OLD_STATUSES}, 'expired')")
    op.add_column('ai_tasks', sa.Column('start_by', sa.DateTime(timezone=True), nullable=True))
    op.add_column('ai_tasks', sa.Column('retry_of_id', sa.Uuid(), nullable=True))
    op.create_foreign_key(op.f('fk_ai_tasks_retry_of_id_ai_tasks'), 'ai_tasks', 'ai_tasks', ['retry_of_id'], ['id'])
    op.create_index('ix_ai_tasks_retry_of_id', 'ai_tasks', ['retry_of_id'], unique=False,
                    postgresql_where=sa.text('retry_of_id IS NOT NULL'))
    op.create_index('ix_ai_tasks_pending_queue', 'ai_tasks', ['queue', 'created_at', 'id'], unique=False,
                    postgresql_where=sa.text("status = 'pending'"))

    op.add_column('plans', sa.Column('default_start_by_seconds', sa.Integer(), nullable=True))
    op.create_check_constraint(op.f('ck_plans_default_start_by_positive'), 'plans', 'default_start_by_seconds > 0')
    for plan, seconds in DEFAULT_START_BY.items():
        op.execute(sa.text("UPDATE plans SET default_start_by_seconds = :s WHERE id = :p").bindparams(s=seconds, p=plan))


def downgrade() -> None:
    op.drop_constraint(op.f('ck_plans_default_start_by_positive'), 'plans', type_='check')
    op.drop_column('plans', 'default_start_by_seconds')
    op.drop_index('ix_ai_tasks_pending_queue', table_name='ai_tasks')
    op.drop_index('ix_ai_tasks_retry_of_id', table_name='ai_tasks')
    op.drop_constraint(op.f('fk_ai_tasks_retry_of_id_ai_tasks'), 'ai_tasks', type_='foreignkey')
    op.drop_column('ai_tasks', 'retry_of_id')
    op.drop_column('ai_tasks', 'start_by')
    # An expired task was never charged: it reads as cancelled in the older schema.
    op.execute("UPDATE ai_tasks SET status = 'cancelled' WHERE status = 'expired'")
    op.drop_constraint(op.f('ck_ai_tasks_status_known'), 'ai_tasks', type_='check')
    op.create_check_constraint(op.f('ck_ai_tasks_status_known'), 'ai_tasks', f"status IN ({OLD_STATUSES})")
    op.drop_index('ix_events_user_id_id', table_name='events')
    op.drop_index('ix_events_task_id_id', table_name='events')
    op.drop_table('events')
