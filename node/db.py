"""State stage: engine, sessions and ORM models (series, instances, jobs, shadow deliveries,
labels and their audit trail).

The database holds all state of the node, so a restart resumes where it stopped.  No patient
name, ID or birth date is ever stored: series are identified by UIDs only.  Written against
SQLAlchemy 2 with portable types, so PostgreSQL works by changing ``storage.database_url``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

logger = logging.getLogger(__name__)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class SeriesState:
    RECEIVING = "receiving"
    COMPLETE = "complete"  # complete and selected: a job exists for this version
    REJECTED = "rejected"  # complete, but not ours to analyse (selection rules)


class JobState:
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # dead letter: visible in `status`, requeued by `retry`


class JobStage:
    ANALYSE = "analyse"
    DELIVER = "deliver"


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part: Mapped[str] = mapped_column(String(16), default="")
    image_type: Mapped[str] = mapped_column(String(128), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    calling_host: Mapped[str] = mapped_column(String(64), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING, index=True)
    reject_reason: Mapped[str] = mapped_column(Text, default="")
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    purged: Mapped[int] = mapped_column(Integer, default=0)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("series_id", "series_version", name="uq_job_series_version"),
        Index("ix_jobs_claim", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    series_version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    stage: Mapped[str] = mapped_column(String(16), default=JobStage.ANALYSE)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # results (filled by the pipeline)
    analysed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finding: Mapped[str] = mapped_column(String(64), default="")
    series_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    verdict_json: Mapped[str] = mapped_column(Text, default="")
    model_name: Mapped[str] = mapped_column(String(64), default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    sr_series_uid: Mapped[str] = mapped_column(String(64), default="")
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    sr_path: Mapped[str] = mapped_column(Text, default="")
    analysis_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class ShadowDelivery(Base):
    """A delivery shadow mode (``results.mode: shadow``) withheld: the job is done, its result
    objects are written, nothing was sent.  ``resent_at`` is set when ``resend`` requeues it."""

    __tablename__ = "shadow_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    peer: Mapped[str] = mapped_column(String(64), default="")
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    resent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Label(Base):
    """Ground truth for a series (``series_instance_uid``), a study or an accession number: one
    of the three keys is set.  ``covid`` is None when the source did not say."""

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("key_kind", "key_value", name="uq_label_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_kind: Mapped[str] = mapped_column(String(16))  # series | study | accession
    key_value: Mapped[str] = mapped_column(String(64), index=True)
    pneumonia: Mapped[int] = mapped_column(Integer)
    covid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    labelled_by: Mapped[str] = mapped_column(String(64))
    labelled_at: Mapped[dt.datetime] = mapped_column(DateTime)
    source: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class LabelAudit(Base):
    """Every change of a label: who, when, the label before (empty for a new one) and after."""

    __tablename__ = "label_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id"), index=True)
    changed_by: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    before_json: Mapped[str] = mapped_column(Text, default="")
    after_json: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text, default="")


def _sqlite_pragmas(busy_timeout_s: float) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the receiving writer
        # FULL: each commit is on disk before the C-STORE is answered, like the spooled file
        # itself (NORMAL survives a process kill but may roll back the last rows on power loss,
        # leaving an acknowledged instance outside its series).
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.close()

    return on_connect


def _create_private(path: Path) -> None:
    """Create the SQLite file owner-only (0600) before SQLite does; its -wal/-shm files follow.

    Creating it first (instead of chmod afterwards) leaves no moment in which another user could
    open it; the folder is created 0700 for the same reason.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return  # an existing database keeps its owner and mode (`status` may run as another user)
    path.chmod(0o600)  # in case the umask took bits away from 0600


def make_engine(url: str, *, busy_timeout_s: float = 10.0) -> Engine:
    """Create the engine and the tables (idempotent).

    ``busy_timeout_s``: how long a write waits for a lock held by another connection or process
    before failing with "database is locked" (ingest then answers Out of Resources).
    """
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        path = url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            _create_private(Path(path))
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_s}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_s))
    Base.metadata.create_all(engine)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Any]:
    return sessionmaker(engine, expire_on_commit=False)
