"""claim priority: what a job's next check is for, so that claims take enforcing polls first

Revision ID: 0009_perf
Revises: 0008_outbox
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_perf"
down_revision = "0008_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0 (enforcing) for the rows already there: the safe default until their next poll
    # says what their next check is for.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("check_priority", sa.SmallInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("check_priority")
