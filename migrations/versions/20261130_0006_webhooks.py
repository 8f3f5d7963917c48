"""Webhooks: users' endpoints, deliveries fanned out from the event log with each attempt,
the users' own signing secrets, the fan-out's cursor; a task's own webhook; the low-balance
threshold (a default per plan, a user's override).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

# credits.low fires when a balance falls below these (a user may choose their own).
LOW_CREDITS_THRESHOLD = {"free": 5, "pro": 50, "enterprise": 200}


def upgrade() -> None:
    op.add_column('plans', sa.Column('low_credits_threshold', sa.Integer(), server_default='0', nullable=False))
    op.create_check_constraint(op.f('ck_plans_low_credits_threshold_nonnegative'), 'plans',
                               'low_credits_threshold >= 0')
    for plan, threshold in LOW_CREDITS_THRESHOLD.items():
        op.execute(sa.text("UPDATE plans SET low_credits_threshold = :t WHERE id = :p").bindparams(t=threshold, p=plan))
    op.add_column('users', sa.Column('low_credits_threshold', sa.Integer(), nullable=True))
    op.create_check_constraint(op.f('ck_users_low_credits_threshold_nonnegative'), 'users',
                               'low_credits_threshold >= 0')

    op.add_column('ai_tasks', sa.Column('webhook_url', sa.Text(), nullable=True))
    op.add_column('ai_tasks', sa.Column('webhook_events', postgresql.ARRAY(sa.String(length=32)), nullable=True))
    op.create_check_constraint(op.f('ck_ai_tasks_webhook_with_events'), 'ai_tasks',
                               '(webhook_url IS NULL) = (webhook_events IS NULL)')

    op.create_table('webhook_endpoints',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('events', postgresql.ARRAY(sa.String(length=32)), nullable=False),
    sa.Column('secret', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('failing_since', sa.DateTime(timezone=True), nullable=True),
    sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('disabled_reason', sa.Text(), nullable=True),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint('(disabled_at IS NULL) = (disabled_reason IS NULL)',
                       name=op.f('ck_webhook_endpoints_disabled_with_reason')),
    sa.CheckConstraint('cardinality(events) > 0', name=op.f('ck_webhook_endpoints_events_not_empty')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_webhook_endpoints_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_endpoints'))
    )
    op.create_index('ix_webhook_endpoints_user_id_created_at', 'webhook_endpoints', ['user_id', 'created_at'],
                    unique=False)

    op.create_table('webhook_deliveries',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=True), nullable=False),
    sa.Column('message_id', sa.Uuid(), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('endpoint_id', sa.Uuid(), nullable=True),
    sa.Column('task_id', sa.Uuid(), nullable=True),
    sa.Column('event_id', sa.BigInteger(), nullable=False),
    sa.Column('event_type', sa.String(length=32), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=16), server_default='pending', nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('(endpoint_id IS NULL) <> (task_id IS NULL)', name=op.f('ck_webhook_deliveries_one_target')),
    sa.CheckConstraint("(status = 'pending') = (next_attempt_at IS NOT NULL)",
                       name=op.f('ck_webhook_deliveries_pending_has_next_attempt')),
    sa.CheckConstraint('attempts >= 0', name=op.f('ck_webhook_deliveries_attempts_nonnegative')),
    sa.CheckConstraint("status IN ('pending', 'delivered', 'failed', 'cancelled')",
                       name=op.f('ck_webhook_deliveries_status_known')),
    sa.ForeignKeyConstraint(['endpoint_id'], ['webhook_endpoints.id'],
                            name=op.f('fk_webhook_deliveries_endpoint_id_webhook_endpoints')),
    sa.ForeignKeyConstraint(['event_id'], ['events.id'], name=op.f('fk_webhook_deliveries_event_id_events')),
    sa.ForeignKeyConstraint(['task_id'], ['ai_tasks.id'], name=op.f('fk_webhook_deliveries_task_id_ai_tasks')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_webhook_deliveries_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries')),
    sa.UniqueConstraint('message_id', name=op.f('uq_webhook_deliveries_message_id'))
    )
    op.create_index('uq_webhook_deliveries_endpoint_id_event_id', 'webhook_deliveries', ['endpoint_id', 'event_id'],
                    unique=True, postgresql_where=sa.text('endpoint_id IS NOT NULL'))
    op.create_index('uq_webhook_deliveries_task_id_event_id', 'webhook_deliveries', ['task_id', 'event_id'],
                    unique=True, postgresql_where=sa.text('task_id IS NOT NULL'))
    op.create_index('ix_webhook_deliveries_due', 'webhook_deliveries', ['next_attempt_at'], unique=False,
                    postgresql_where=sa.text("status = 'pending'"))
    op.create_index('ix_webhook_deliveries_endpoint_id_id', 'webhook_deliveries', ['endpoint_id', sa.text('id DESC')],
                    unique=False, postgresql_where=sa.text('endpoint_id IS NOT NULL'))
    op.create_index('ix_webhook_deliveries_task_id_id', 'webhook_deliveries', ['task_id', sa.text('id DESC')],
                    unique=False, postgresql_where=sa.text('task_id IS NOT NULL'))

    op.create_table('webhook_attempts',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=True), nullable=False),
    sa.Column('delivery_id', sa.BigInteger(), nullable=False),
    sa.Column('attempted_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('latency_ms', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['delivery_id'], ['webhook_deliveries.id'],
                            name=op.f('fk_webhook_attempts_delivery_id_webhook_deliveries')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_attempts'))
    )
    op.create_index('ix_webhook_attempts_delivery_id_id', 'webhook_attempts', ['delivery_id', 'id'], unique=False)

    op.create_table('webhook_signing_secrets',
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('secret', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_webhook_signing_secrets_user_id_users')),
    sa.PrimaryKeyConstraint('user_id', name=op.f('pk_webhook_signing_secrets'))
    )

    op.create_table('webhook_fanout',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('position', sa.BigInteger(), nullable=False),
    sa.Column('gaps', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_webhook_fanout'))
    )
    # The log before this release has no subscriber: the fan-out starts after it.
    op.execute("INSERT INTO webhook_fanout (name, position) SELECT 'events', coalesce(max(id), 0) FROM events")


def downgrade() -> None:
    op.drop_table('webhook_fanout')
    op.drop_table('webhook_signing_secrets')
    op.drop_index('ix_webhook_attempts_delivery_id_id', table_name='webhook_attempts')
    op.drop_table('webhook_attempts')
    op.drop_index('ix_webhook_deliveries_task_id_id', table_name='webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_endpoint_id_id', table_name='webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_due', table_name='webhook_deliveries')
    op.drop_index('uq_webhook_deliveries_task_id_event_id', table_name='webhook_deliveries')
    op.drop_index('uq_webhook_deliveries_endpoint_id_event_id', table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_index('ix_webhook_endpoints_user_id_created_at', table_name='webhook_endpoints')
    op.drop_table('webhook_endpoints')
    op.drop_constraint(op.f('ck_ai_tasks_webhook_with_events'), 'ai_tasks', type_='check')
    op.drop_column('ai_tasks', 'webhook_events')
    op.drop_column('ai_tasks', 'webhook_url')
    op.drop_constraint(op.f('ck_users_low_credits_threshold_nonnegative'), 'users', type_='check')
    op.drop_column('users', 'low_credits_threshold')
    op.drop_constraint(op.f('ck_plans_low_credits_threshold_nonnegative'), 'plans', type_='check')
    op.drop_column('plans', 'low_credits_threshold')
