"""Initial schema: plans (seeded), users, ai_tasks, transactions (the ledger), stripe_events, uploads.

Revision ID: 0001
Revises: 
Create Date: 2026-11-25 06:21:45.410144
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('plans',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('monthly_credits', sa.Integer(), nullable=False),
    sa.Column('price_cents', sa.Integer(), nullable=False),
    sa.Column('stripe_price_id', sa.String(length=128), nullable=True),
    sa.Column('allowed_task_types', postgresql.ARRAY(sa.String(length=32)), nullable=False),
    sa.Column('max_concurrent_tasks', sa.Integer(), nullable=False),
    sa.Column('sort_order', sa.Integer(), nullable=False),
    sa.CheckConstraint('max_concurrent_tasks > 0', name=op.f('ck_plans_max_concurrent_positive')),
    sa.CheckConstraint('monthly_credits >= 0', name=op.f('ck_plans_monthly_credits_nonnegative')),
    sa.CheckConstraint('price_cents >= 0', name=op.f('ck_plans_price_nonnegative')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_plans'))
    )
    op.create_table('stripe_events',
    sa.Column('id', sa.String(length=255), nullable=False),
    sa.Column('type', sa.String(length=128), nullable=False),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stripe_events'))
    )
    op.create_table('users',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('clerk_id', sa.String(length=255), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=True),
    sa.Column('name', sa.String(length=255), nullable=True),
    sa.Column('plan_id', sa.String(length=32), nullable=False),
    sa.Column('plan_credits', sa.Integer(), server_default='0', nullable=False),
    sa.Column('purchased_credits', sa.Integer(), server_default='0', nullable=False),
    sa.Column('credits', sa.Integer(), sa.Computed('plan_credits + purchased_credits', persisted=True), nullable=False),
    sa.Column('credit_reset_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('stripe_customer_id', sa.String(length=255), nullable=True),
    sa.Column('stripe_subscription_id', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('plan_credits >= 0', name=op.f('ck_users_plan_credits_nonnegative')),
    sa.CheckConstraint('purchased_credits >= 0', name=op.f('ck_users_purchased_credits_nonnegative')),
    sa.ForeignKeyConstraint(['plan_id'], ['plans.id'], name=op.f('fk_users_plan_id_plans')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('clerk_id', name=op.f('uq_users_clerk_id')),
    sa.UniqueConstraint('stripe_customer_id', name=op.f('uq_users_stripe_customer_id'))
    )
    op.create_index(op.f('ix_users_credit_reset_at'), 'users', ['credit_reset_at'], unique=False)
    op.create_index(op.f('ix_users_plan_id'), 'users', ['plan_id'], unique=False)
    op.create_table('ai_tasks',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), server_default='pending', nullable=False),
    sa.Column('input', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('params', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('output', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('credits_used', sa.Integer(), nullable=False),
    sa.Column('progress', sa.Integer(), server_default='0', nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('queue', sa.String(length=64), nullable=False),
    sa.Column('attempt', sa.Integer(), server_default='0', nullable=False),
    sa.Column('idempotency_key', sa.String(length=255), nullable=True),
    sa.Column('request_hash', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')", name=op.f('ck_ai_tasks_status_known')),
    sa.CheckConstraint("type IN ('image_analysis', 'advanced_editing', 'video_generation')", name=op.f('ck_ai_tasks_type_known')),
    sa.CheckConstraint('attempt >= 0', name=op.f('ck_ai_tasks_attempt_nonnegative')),
    sa.CheckConstraint('credits_used > 0', name=op.f('ck_ai_tasks_credits_used_positive')),
    sa.CheckConstraint('progress BETWEEN 0 AND 100', name=op.f('ck_ai_tasks_progress_range')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_ai_tasks_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ai_tasks'))
    )
    op.create_index('ix_ai_tasks_in_flight', 'ai_tasks', ['status', 'created_at'], unique=False, postgresql_where=sa.text("status IN ('pending', 'processing')"))
    op.create_index('ix_ai_tasks_user_created', 'ai_tasks', ['user_id', sa.literal_column('created_at DESC'), sa.literal_column('id DESC')], unique=False)
    op.create_index('ix_ai_tasks_user_status_created', 'ai_tasks', ['user_id', 'status', sa.literal_column('created_at DESC'), sa.literal_column('id DESC')], unique=False)
    op.create_index('ix_ai_tasks_user_type_created', 'ai_tasks', ['user_id', 'type', sa.literal_column('created_at DESC'), sa.literal_column('id DESC')], unique=False)
    op.create_index('uq_ai_tasks_user_idempotency_key', 'ai_tasks', ['user_id', 'idempotency_key'], unique=True, postgresql_where=sa.text('idempotency_key IS NOT NULL'))
    op.create_table('uploads',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=True),
    sa.Column('content_type', sa.String(length=127), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('storage_key', sa.String(length=512), nullable=False),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('size >= 0', name=op.f('ck_uploads_size_nonnegative')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_uploads_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_uploads'))
    )
    op.create_index(op.f('ix_uploads_user_id'), 'uploads', ['user_id'], unique=False)
    op.create_table('transactions',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=True), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('amount', sa.Integer(), nullable=False),
    sa.Column('plan_delta', sa.Integer(), nullable=False),
    sa.Column('purchased_delta', sa.Integer(), nullable=False),
    sa.Column('bucket', sa.String(length=16), nullable=False),
    sa.Column('balance_after', sa.Integer(), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('task_id', sa.Uuid(), nullable=True),
    sa.Column('refund_of_id', sa.BigInteger(), nullable=True),
    sa.Column('refund_of_amount', sa.Integer(), nullable=True),
    sa.Column('stripe_event_id', sa.String(length=255), nullable=True),
    sa.Column('period', sa.Date(), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("(period IS NOT NULL) = (type IN ('monthly_reset', 'credit_expiry'))", name=op.f('ck_transactions_period_for_resets')),
    sa.CheckConstraint("(type = 'credit_refund') = (refund_of_id IS NOT NULL) AND (refund_of_id IS NULL OR (task_id IS NOT NULL AND refund_of_amount < 0 AND amount = -refund_of_amount))", name=op.f('ck_transactions_refund_mirrors_charge')),
    sa.CheckConstraint("bucket IN ('plan', 'purchased', 'both')", name=op.f('ck_transactions_bucket_known')),
    sa.CheckConstraint("type <> 'credit_deduction' OR (task_id IS NOT NULL AND amount < 0)", name=op.f('ck_transactions_deduction_names_task')),
    sa.CheckConstraint("type IN ('signup_grant', 'monthly_reset', 'credit_expiry', 'credit_deduction', 'credit_refund', 'credit_purchase', 'plan_upgrade', 'admin_adjustment')", name=op.f('ck_transactions_type_known')),
    sa.CheckConstraint('amount <> 0', name=op.f('ck_transactions_amount_nonzero')),
    sa.CheckConstraint('amount = plan_delta + purchased_delta', name=op.f('ck_transactions_amount_is_sum_of_deltas')),
    sa.CheckConstraint('balance_after >= 0', name=op.f('ck_transactions_balance_after_nonnegative')),
    sa.ForeignKeyConstraint(['refund_of_id', 'task_id', 'refund_of_amount'], ['transactions.id', 'transactions.task_id', 'transactions.amount'], name='fk_transactions_refund_of_charge'),
    sa.ForeignKeyConstraint(['task_id'], ['ai_tasks.id'], name=op.f('fk_transactions_task_id_ai_tasks')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_transactions_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_transactions')),
    sa.UniqueConstraint('id', 'task_id', 'amount', name='uq_transactions_id_task_amount')
    )
    op.create_index(op.f('ix_transactions_task_id'), 'transactions', ['task_id'], unique=False)
    op.create_index('ix_transactions_user_id_id', 'transactions', ['user_id', sa.literal_column('id DESC')], unique=False)
    op.create_index('uq_transactions_one_charge_per_task', 'transactions', ['task_id'], unique=True, postgresql_where=sa.text("type = 'credit_deduction'"))
    op.create_index('uq_transactions_one_refund_per_charge', 'transactions', ['refund_of_id'], unique=True, postgresql_where=sa.text('refund_of_id IS NOT NULL'))
    op.create_index('uq_transactions_stripe_event', 'transactions', ['stripe_event_id', 'type'], unique=True, postgresql_where=sa.text('stripe_event_id IS NOT NULL'))
    op.create_index('uq_transactions_user_period', 'transactions', ['user_id', 'type', 'period'], unique=True, postgresql_where=sa.text('period IS NOT NULL'))

    # The plans are data the code relies on (the free plan is every new user's), so they
    # are seeded here rather than by a script that could be forgotten.
    plans = sa.table(
        "plans",
        sa.column("id", sa.String), sa.column("name", sa.String), sa.column("monthly_credits", sa.Integer),
        sa.column("price_cents", sa.Integer), sa.column("stripe_price_id", sa.String),
        sa.column("allowed_task_types", postgresql.ARRAY(sa.String)), sa.column("max_concurrent_tasks", sa.Integer),
        sa.column("sort_order", sa.Integer),
    )
    op.bulk_insert(plans, [
        {"id": "free", "name": "Free", "monthly_credits": 20, "price_cents": 0, "stripe_price_id": None,
         "allowed_task_types": ["image_analysis", "advanced_editing"], "max_concurrent_tasks": 2, "sort_order": 0},
        {"id": "pro", "name": "Pro", "monthly_credits": 500, "price_cents": 1900, "stripe_price_id": None,
         "allowed_task_types": ["image_analysis", "advanced_editing", "video_generation"],
         "max_concurrent_tasks": 5, "sort_order": 1},
        {"id": "enterprise", "name": "Enterprise", "monthly_credits": 5000, "price_cents": 9900,
         "stripe_price_id": None, "allowed_task_types": ["image_analysis", "advanced_editing", "video_generation"],
         "max_concurrent_tasks": 20, "sort_order": 2},
    ])


def downgrade() -> None:
    op.drop_index('uq_transactions_user_period', table_name='transactions', postgresql_where=sa.text('period IS NOT NULL'))
    op.drop_index('uq_transactions_stripe_event', table_name='transactions', postgresql_where=sa.text('stripe_event_id IS NOT NULL'))
    op.drop_index('uq_transactions_one_refund_per_charge', table_name='transactions', postgresql_where=sa.text('refund_of_id IS NOT NULL'))
    op.drop_index('uq_transactions_one_charge_per_task', table_name='transactions', postgresql_where=sa.text("type = 'credit_deduction'"))
    op.drop_index('ix_transactions_user_id_id', table_name='transactions')
    op.drop_index(op.f('ix_transactions_task_id'), table_name='transactions')
    op.drop_table('transactions')
    op.drop_index(op.f('ix_uploads_user_id'), table_name='uploads')
    op.drop_table('uploads')
    op.drop_index('uq_ai_tasks_user_idempotency_key', table_name='ai_tasks', postgresql_where=sa.text('idempotency_key IS NOT NULL'))
    op.drop_index('ix_ai_tasks_user_type_created', table_name='ai_tasks')
    op.drop_index('ix_ai_tasks_user_status_created', table_name='ai_tasks')
    op.drop_index('ix_ai_tasks_user_created', table_name='ai_tasks')
    op.drop_index('ix_ai_tasks_in_flight', table_name='ai_tasks', postgresql_where=sa.text("status IN ('pending', 'processing')"))
    op.drop_table('ai_tasks')
    op.drop_index(op.f('ix_users_plan_id'), table_name='users')
    op.drop_index(op.f('ix_users_credit_reset_at'), table_name='users')
    op.drop_table('users')
    op.drop_table('stripe_events')
    op.drop_table('plans')
