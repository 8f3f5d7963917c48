"""Billing: credit packs (seeded), purchases, subscriptions, plan changes, the state of each
Stripe event (handled, attempts, last error), and ledger entries keyed by Stripe object.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 23:33:03.606043
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

TYPES = ("'signup_grant', 'monthly_reset', 'credit_expiry', 'credit_deduction', 'credit_refund', 'credit_purchase',"
         " 'plan_upgrade', 'admin_adjustment'")
NEW_TYPES = ", 'credit_clawback', 'credit_reinstated'"


def upgrade() -> None:
    op.create_table('credit_packs',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('credits', sa.Integer(), nullable=False),
    sa.Column('price_cents', sa.Integer(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('stripe_price_id', sa.String(length=128), nullable=True),
    sa.Column('active', sa.Boolean(), server_default='true', nullable=False),
    sa.Column('sort_order', sa.Integer(), nullable=False),
    sa.CheckConstraint('credits > 0', name=op.f('ck_credit_packs_credits_positive')),
    sa.CheckConstraint('price_cents > 0', name=op.f('ck_credit_packs_price_positive')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_credit_packs'))
    )
    op.create_table('sync_cursors',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('position', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_sync_cursors'))
    )
    op.create_table('plan_changes',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('from_plan_id', sa.String(length=32), nullable=False),
    sa.Column('to_plan_id', sa.String(length=32), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('subscription_id', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['from_plan_id'], ['plans.id'], name=op.f('fk_plan_changes_from_plan_id_plans')),
    sa.ForeignKeyConstraint(['to_plan_id'], ['plans.id'], name=op.f('fk_plan_changes_to_plan_id_plans')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_plan_changes_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_plan_changes'))
    )
    op.create_index(op.f('ix_plan_changes_user_id'), 'plan_changes', ['user_id'], unique=False)
    op.create_table('purchases',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('pack_id', sa.String(length=32), nullable=False),
    sa.Column('credits', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), server_default='pending', nullable=False),
    sa.Column('stripe_session_id', sa.String(length=255), nullable=False),
    sa.Column('payment_intent', sa.String(length=255), nullable=True),
    sa.Column('amount_paid', sa.Integer(), nullable=True),
    sa.Column('currency', sa.String(length=3), nullable=True),
    sa.Column('amount_refunded', sa.Integer(), server_default='0', nullable=False),
    sa.Column('refund_claim', sa.Integer(), server_default='0', nullable=False),
    sa.Column('dispute_id', sa.String(length=255), nullable=True),
    sa.Column('dispute_state', sa.String(length=16), nullable=True),
    sa.Column('dispute_amount', sa.Integer(), nullable=True),
    sa.Column('dispute_claim', sa.Integer(), server_default='0', nullable=False),
    sa.Column('dispute_taken', sa.Integer(), server_default='0', nullable=False),
    sa.Column('dispute_reinstated', sa.Integer(), server_default='0', nullable=False),
    sa.Column('credits_taken_back', sa.Integer(), server_default='0', nullable=False),
    sa.Column('shortfall', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('paid_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("dispute_state IS NULL OR dispute_state IN ('open', 'reinstated', 'lost')", name=op.f('ck_purchases_dispute_state_known')),
    sa.CheckConstraint("status IN ('pending', 'paid', 'failed', 'expired')", name=op.f('ck_purchases_status_known')),
    sa.CheckConstraint('amount_refunded >= 0 AND refund_claim >= 0 AND dispute_claim >= 0 AND dispute_taken >= 0 AND dispute_reinstated >= 0 AND credits_taken_back >= 0 AND shortfall >= 0', name=op.f('ck_purchases_amounts_nonnegative')),
    sa.CheckConstraint('credits > 0', name=op.f('ck_purchases_credits_positive')),
    sa.CheckConstraint('credits_taken_back + shortfall <= credits', name=op.f('ck_purchases_takes_within_grant')),
    sa.CheckConstraint('dispute_taken <= dispute_claim AND dispute_reinstated <= dispute_taken', name=op.f('ck_purchases_reinstated_within_taken')),
    sa.CheckConstraint("refund_claim + CASE WHEN dispute_state = 'reinstated' THEN 0 ELSE dispute_claim END <= credits", name=op.f('ck_purchases_claims_within_grant')),
    sa.ForeignKeyConstraint(['pack_id'], ['credit_packs.id'], name=op.f('fk_purchases_pack_id_credit_packs')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_purchases_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_purchases')),
    sa.UniqueConstraint('payment_intent', name=op.f('uq_purchases_payment_intent')),
    sa.UniqueConstraint('stripe_session_id', name=op.f('uq_purchases_stripe_session_id'))
    )
    op.create_index(op.f('ix_purchases_user_id'), 'purchases', ['user_id'], unique=False)
    op.create_table('subscriptions',
    sa.Column('id', sa.String(length=255), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('plan_id', sa.String(length=32), nullable=True),
    sa.Column('price_id', sa.String(length=255), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('current_period_start', sa.DateTime(timezone=True), nullable=True),
    sa.Column('current_period_end', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancel_at_period_end', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('state_as_of', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_event_id', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['plan_id'], ['plans.id'], name=op.f('fk_subscriptions_plan_id_plans')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_subscriptions_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subscriptions'))
    )
    op.create_index(op.f('ix_subscriptions_user_id'), 'subscriptions', ['user_id'], unique=False)
    op.add_column('stripe_events', sa.Column('livemode', sa.Boolean(), server_default='false', nullable=False))
    op.add_column('stripe_events', sa.Column('created', sa.DateTime(timezone=True), nullable=True))
    op.alter_column('stripe_events', 'processed_at', new_column_name='handled_at')
    op.add_column('stripe_events', sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))
    op.add_column('stripe_events', sa.Column('last_error', sa.Text(), nullable=True))
    op.add_column('stripe_events', sa.Column('outcome', sa.String(length=64), nullable=True))
    op.create_index('ix_stripe_events_created', 'stripe_events', ['created'], unique=False)
    op.create_index('ix_stripe_events_unhandled', 'stripe_events', ['received_at'], unique=False, postgresql_where=sa.text('handled_at IS NULL'))
    op.add_column('transactions', sa.Column('stripe_object_id', sa.String(length=255), nullable=True))
    op.add_column('transactions', sa.Column('purchase_id', sa.Uuid(), nullable=True))
    op.create_index(op.f('ix_transactions_purchase_id'), 'transactions', ['purchase_id'], unique=False)
    op.create_index('uq_transactions_stripe_object', 'transactions', ['type', 'stripe_object_id'], unique=True, postgresql_where=sa.text('stripe_object_id IS NOT NULL'))
    op.create_foreign_key(op.f('fk_transactions_purchase_id_purchases'), 'transactions', 'purchases', ['purchase_id'], ['id'])
    op.drop_constraint(op.f('ck_transactions_type_known'), 'transactions', type_='check')
    op.create_check_constraint(op.f('ck_transactions_type_known'), 'transactions', f"type IN ({TYPES + NEW_TYPES})")
    op.create_check_constraint(
        op.f('ck_transactions_stripe_object_types'), 'transactions',
        "stripe_object_id IS NULL OR type IN ('credit_purchase', 'plan_upgrade', 'monthly_reset', 'credit_expiry',"
        " 'credit_clawback', 'credit_reinstated')")
    op.create_check_constraint(
        op.f('ck_transactions_clawbacks_name_purchase'), 'transactions',
        "type NOT IN ('credit_clawback', 'credit_reinstated')"
        " OR (purchase_id IS NOT NULL AND stripe_object_id IS NOT NULL AND plan_delta = 0)")
    # Beat's periods stay unique per user; a paid period is unique by its invoice instead.
    op.drop_index('uq_transactions_user_period', table_name='transactions')
    op.create_index('uq_transactions_user_period', 'transactions', ['user_id', 'type', 'period'], unique=True,
                    postgresql_where=sa.text('period IS NOT NULL AND stripe_object_id IS NULL'))

    # What can be bought is data the routes rely on, seeded here like the plans.
    packs = sa.table(
        "credit_packs",
        sa.column("id", sa.String), sa.column("name", sa.String), sa.column("credits", sa.Integer),
        sa.column("price_cents", sa.Integer), sa.column("currency", sa.String), sa.column("stripe_price_id", sa.String),
        sa.column("active", sa.Boolean), sa.column("sort_order", sa.Integer),
    )
    op.bulk_insert(packs, [
        {"id": "credits_100", "name": "100 credits", "credits": 100, "price_cents": 500, "currency": "usd",
         "stripe_price_id": None, "active": True, "sort_order": 0},
        {"id": "credits_500", "name": "500 credits", "credits": 500, "price_cents": 2000, "currency": "usd",
         "stripe_price_id": None, "active": True, "sort_order": 1},
        {"id": "credits_2000", "name": "2,000 credits", "credits": 2000, "price_cents": 6000, "currency": "usd",
         "stripe_price_id": None, "active": True, "sort_order": 2},
    ])


def downgrade() -> None:
    # The ledger keeps its billing rows' money; only the entries of the new types cannot stay.
    op.execute("DELETE FROM transactions WHERE type IN ('credit_clawback', 'credit_reinstated')")
    op.drop_index('uq_transactions_user_period', table_name='transactions')
    op.create_index('uq_transactions_user_period', 'transactions', ['user_id', 'type', 'period'], unique=True,
                    postgresql_where=sa.text('period IS NOT NULL'))
    op.drop_constraint(op.f('ck_transactions_clawbacks_name_purchase'), 'transactions', type_='check')
    op.drop_constraint(op.f('ck_transactions_stripe_object_types'), 'transactions', type_='check')
    op.drop_constraint(op.f('ck_transactions_type_known'), 'transactions', type_='check')
    op.create_check_constraint(op.f('ck_transactions_type_known'), 'transactions', f"type IN ({TYPES})")
    op.drop_constraint(op.f('fk_transactions_purchase_id_purchases'), 'transactions', type_='foreignkey')
    op.drop_index('uq_transactions_stripe_object', table_name='transactions', postgresql_where=sa.text('stripe_object_id IS NOT NULL'))
    op.drop_index(op.f('ix_transactions_purchase_id'), table_name='transactions')
    op.drop_column('transactions', 'purchase_id')
    op.drop_column('transactions', 'stripe_object_id')
    op.alter_column('stripe_events', 'handled_at', new_column_name='processed_at')
    op.drop_index('ix_stripe_events_unhandled', table_name='stripe_events', postgresql_where=sa.text('handled_at IS NULL'))
    op.drop_index('ix_stripe_events_created', table_name='stripe_events')
    op.drop_column('stripe_events', 'outcome')
    op.drop_column('stripe_events', 'last_error')
    op.drop_column('stripe_events', 'attempts')
    op.drop_column('stripe_events', 'created')
    op.drop_column('stripe_events', 'livemode')
    op.drop_index(op.f('ix_subscriptions_user_id'), table_name='subscriptions')
    op.drop_table('subscriptions')
    op.drop_index(op.f('ix_purchases_user_id'), table_name='purchases')
    op.drop_table('purchases')
    op.drop_index(op.f('ix_plan_changes_user_id'), table_name='plan_changes')
    op.drop_table('plan_changes')
    op.drop_table('sync_cursors')
    op.drop_table('credit_packs')
