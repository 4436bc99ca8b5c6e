"""Drift monitoring and champion/challenger: the input mix of each analysed job, the stored
drift comparisons (``node.drift``) and the challenger model's shadow verdicts
(``node.challenger``).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drift_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("computed_at", sa.DateTime(), nullable=False),
        sa.Column("window_start", sa.DateTime(), nullable=False),
        sa.Column("window_end", sa.DateTime(), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("n_series", sa.Integer(), nullable=False),
        sa.Column("drifted", sa.Integer(), nullable=False),
        sa.Column("warning", sa.Text(), nullable=False),
        sa.Column("report_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_drift_reports_computed_at", "drift_reports", ["computed_at"])
    op.create_table(
        "challenger_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("analysed", sa.Integer(), nullable=True),
        sa.Column("finding", sa.String(64), nullable=False),
        sa.Column("series_score", sa.Float(), nullable=True),
        sa.Column("verdict_json", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("analysis_s", sa.Float(), nullable=True),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "job_id", "model_name", "model_version", name="uq_challenger_job_model"
        ),
    )
    op.create_index("ix_challenger_results_job_id", "challenger_results", ["job_id"])
    op.create_index("ix_challenger_results_recorded_at", "challenger_results", ["recorded_at"])
    op.create_table(
        "job_inputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("manufacturer", sa.String(64), nullable=False),
        sa.Column("scanner_model", sa.String(64), nullable=False),
        sa.Column("kernel", sa.String(64), nullable=False),
        sa.Column("slice_thickness_mm", sa.Float(), nullable=True),
        sa.Column("contrast", sa.String(16), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id"),
    )
    op.create_index("ix_job_inputs_recorded_at", "job_inputs", ["recorded_at"])


def downgrade() -> None:
    op.drop_index("ix_job_inputs_recorded_at", table_name="job_inputs")
    op.drop_table("job_inputs")
    op.drop_index("ix_challenger_results_recorded_at", table_name="challenger_results")
    op.drop_index("ix_challenger_results_job_id", table_name="challenger_results")
    op.drop_table("challenger_results")
    op.drop_index("ix_drift_reports_computed_at", table_name="drift_reports")
    op.drop_table("drift_reports")
