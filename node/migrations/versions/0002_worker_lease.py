"""Worker leases: which worker runs a job and until when its claim holds.

A ``running`` job whose lease expired (its worker died or lost the database) is claimed again by
any worker (``node.jobs.claim_next``); a running row left by an older node has no lease and is
therefore reclaimable at once, as that node's start-up requeue made it.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("worker_id", sa.String(128), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("worker_id")
