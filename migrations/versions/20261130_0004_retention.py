"""Retention: an upload or a task output whose file was deleted keeps a note of when
(`uploads.expired_at`, `ai_tasks.output_expired_at`), and the retention job's scans have
partial indexes of the files still stored.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('ai_tasks', sa.Column('output_expired_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('uploads', sa.Column('expired_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_ai_tasks_output_unexpired', 'ai_tasks', ['completed_at', 'id'], unique=False,
                    postgresql_where=sa.text("status = 'completed' AND output_expired_at IS NULL"
                                             " AND (output -> 'file') IS NOT NULL"))
    op.create_index('ix_uploads_unexpired_created', 'uploads', ['created_at', 'id'], unique=False,
                    postgresql_where=sa.text('expired_at IS NULL'))


def downgrade() -> None:
    op.drop_index('ix_uploads_unexpired_created', table_name='uploads')
    op.drop_index('ix_ai_tasks_output_unexpired', table_name='ai_tasks')
    op.drop_column('uploads', 'expired_at')
    op.drop_column('ai_tasks', 'output_expired_at')
