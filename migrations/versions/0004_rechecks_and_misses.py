"""lifecycle: terminal jobs re-checked (reopen window), reopen time, 404/403 streaks, cancel re-sends

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Only jobs still being re-checked are in this index, so claiming them costs nothing while
# the table fills with jobs that are over for good.
_RECHECKED = sa.text("recheck_until IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("recheck_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("reopened_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("miss_kind", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("miss_count", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("miss_since", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("cancel_answer", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("cancel_resend_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            "ix_jobs_recheck_next_check_at",
            ["next_check_at"],
            unique=False,
            sqlite_where=_RECHECKED,
            postgresql_where=_RECHECKED,
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_recheck_next_check_at")
        batch_op.drop_column("cancel_resend_at")
        batch_op.drop_column("cancel_answer")
        batch_op.drop_column("miss_since")
        batch_op.drop_column("miss_count")
        batch_op.drop_column("miss_kind")
        batch_op.drop_column("reopened_at")
        batch_op.drop_column("recheck_until")
