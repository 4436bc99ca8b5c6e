"""Baseline: the schema ``Base.metadata.create_all`` made before migrations existed.

A database made by that older code (its tables, no ``alembic_version``) is adopted as it stands:
every table here is created only if it is missing, so the tables an older node lacked (shadow
deliveries, labels) are added as ``create_all`` would have added them, and the revision is then
recorded as 0001.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _create(name: str, *elements: sa.schema.SchemaItem) -> bool:
    """Create table ``name`` unless it exists; True if created."""
    if sa.inspect(op.get_bind()).has_table(name):
        return False
    op.create_table(name, *elements)
    return True


def upgrade() -> None:
    if _create(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("study_date", sa.String(8), nullable=False),
        sa.Column("study_description", sa.String(64), nullable=False),
        sa.Column("series_description", sa.String(64), nullable=False),
        sa.Column("body_part", sa.String(16), nullable=False),
        sa.Column("image_type", sa.String(128), nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("calling_host", sa.String(64), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reject_reason", sa.Text(), nullable=False),
        sa.Column("first_received_at", sa.DateTime(), nullable=False),
        sa.Column("last_received_at", sa.DateTime(), nullable=False),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("series_instance_uid"),
    ):
        op.create_index("ix_series_last_received_at", "series", ["last_received_at"])
        op.create_index("ix_series_state", "series", ["state"])
        op.create_index("ix_series_study_instance_uid", "series", ["study_instance_uid"])
    if _create(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("purged", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["series_id"], ["series.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    ):
        op.create_index("ix_instances_series_id", "instances", ["series_id"])
    if _create(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("series_version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("analysed", sa.Integer(), nullable=True),
        sa.Column("finding", sa.String(64), nullable=False),
        sa.Column("series_score", sa.Float(), nullable=True),
        sa.Column("verdict_json", sa.Text(), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("sr_series_uid", sa.String(64), nullable=False),
        sa.Column("sr_sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sr_path", sa.Text(), nullable=False),
        sa.Column("analysis_s", sa.Float(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["series_id"], ["series.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("series_id", "series_version", name="uq_job_series_version"),
    ):
        op.create_index("ix_jobs_claim", "jobs", ["state", "next_attempt_at"])
        op.create_index("ix_jobs_series_id", "jobs", ["series_id"])
    if _create(
        "shadow_deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("peer", sa.String(64), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.Column("resent_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id"),
    ):
        op.create_index("ix_shadow_deliveries_recorded_at", "shadow_deliveries", ["recorded_at"])
    if _create(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_kind", sa.String(16), nullable=False),
        sa.Column("key_value", sa.String(64), nullable=False),
        sa.Column("pneumonia", sa.Integer(), nullable=False),
        sa.Column("covid", sa.Integer(), nullable=True),
        sa.Column("labelled_by", sa.String(64), nullable=False),
        sa.Column("labelled_at", sa.DateTime(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_kind", "key_value", name="uq_label_key"),
    ):
        op.create_index("ix_labels_key_value", "labels", ["key_value"])
    if _create(
        "label_audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("label_id", sa.Integer(), nullable=False),
        sa.Column("changed_by", sa.String(64), nullable=False),
        sa.Column("changed_at", sa.DateTime(), nullable=False),
        sa.Column("before_json", sa.Text(), nullable=False),
        sa.Column("after_json", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["label_id"], ["labels.id"]),
        sa.PrimaryKeyConstraint("id"),
    ):
        op.create_index("ix_label_audit_label_id", "label_audit", ["label_id"])


def downgrade() -> None:
    for name in ("label_audit", "labels", "shadow_deliveries", "jobs", "instances", "series"):
        op.drop_table(name)
