"""Monthly resets keep each user's own anchor day (`credit_reset_day`: a reset anchored on
the 31st lands on the last day of shorter months and back on the 31st after them).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 02:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('users', sa.Column('credit_reset_day', sa.SmallInteger(), nullable=True))
    op.create_check_constraint(op.f('ck_users_credit_reset_day_in_month'), 'users',
                               'credit_reset_day BETWEEN 1 AND 31')
    op.execute("UPDATE users SET credit_reset_day = extract(day FROM credit_reset_at AT TIME ZONE 'UTC')"
               " WHERE credit_reset_at IS NOT NULL")


def downgrade() -> None:
    op.drop_constraint(op.f('ck_users_credit_reset_day_in_month'), 'users', type_='check')
    op.drop_column('users', 'credit_reset_day')
