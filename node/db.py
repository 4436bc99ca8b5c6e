"""State stage: engine, sessions and ORM models (series, instances, jobs, shadow deliveries,
labels and their audit trail).

The database holds all state of the node, so a restart resumes where it stopped.  No patient
name, ID or birth date is ever stored: series are identified by UIDs only.  Written against
SQLAlchemy 2 with portable types, so PostgreSQL works by changing ``storage.database_url``;
the schema is made and changed by the versioned migrations in ``node/migrations`` (Alembic),
which ``make_engine`` applies at start-up, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import re
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
    inspect,
    text,
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
    # the claim (migration 0002): who runs the job and until when, extended by its heartbeat;
    # a running job whose lease expired is claimed again (node/jobs.py)
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


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
    """Create the engine and bring the schema to the newest migration (``migrate``).

    ``url``: ``sqlite:///path`` or ``postgresql+psycopg://user@host/db`` (a plain
    ``postgresql://`` URL is given the psycopg 3 driver the node ships).  ``busy_timeout_s``
    (SQLite only): how long a write waits for a lock held by another connection or process
    before failing with "database is locked" (ingest then answers Out of Resources).
    """
    kwargs: dict[str, Any] = {}
    sqlite = url.startswith("sqlite")
    if sqlite:
        # sqlite:///relative, sqlite:////absolute; sqlite:// and sqlite:///:memory: are in memory
        path = url.split("sqlite:///", 1)[1] if url.startswith("sqlite:///") else ""
        if path and path != ":memory:":
            _create_private(Path(path))
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_s}
    else:
        url = re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)
        kwargs["pool_pre_ping"] = True  # a server restart leaves dead pooled connections
    engine = create_engine(url, **kwargs)
    if sqlite:
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_s))
    migrate(engine)
    return engine


MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_PG_MIGRATION_LOCK = 0x74726961  # pg_advisory_xact_lock key: one migrating process at a time


def _alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


@functools.cache
def _head_revision() -> str | None:
    """The newest revision under ``node/migrations/versions`` (read once per process)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def migrate(engine: Engine) -> None:
    """Upgrade the database to the newest revision under ``node/migrations`` (Alembic), in one
    transaction that holds the database's write lock, so that several processes starting at
    once (a receiver and its workers) migrate it once.  Idempotent: at the newest revision it
    changes nothing.

    A database made by ``create_all`` before migrations existed (tables, no ``alembic_version``)
    is adopted as revision 0001 (the baseline adds any table it lacks) and then upgraded.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    config = _alembic_config()
    head = _head_revision()
    with engine.connect() as conn:  # read only: at the head (every start but the first) that is all
        if MigrationContext.configure(conn).get_current_revision() == head:
            return
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock, before reading the version
        elif engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        current = MigrationContext.configure(conn).get_current_revision()
        if current == head:  # another process migrated it meanwhile
            return
        if current is None and inspect(conn).has_table("jobs"):
            logger.info("database made before migrations: adopting it as revision 0001")
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    logger.info("database schema migrated from %s to %s", current or "empty", head)
    missing = set(Base.metadata.tables) - set(inspect(engine).get_table_names())
    if missing:  # a model added to this file without its revision: say so before a query fails
        logger.error(
            "tables %s are in node/db.py but in no migration: add a revision under %s",
            sorted(missing),
            MIGRATIONS_DIR / "versions",
        )


def make_sessionmaker(engine: Engine) -> sessionmaker[Any]:
    return sessionmaker(engine, expire_on_commit=False)


class DriftReport(Base):
    """One drift comparison (``node/drift.py``): the series analysed in a window against the
    reference summary in ``model.json``.  ``warning`` is empty when nothing shifted."""

    __tablename__ = "drift_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    computed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    window_start: Mapped[dt.datetime] = mapped_column(DateTime)
    window_end: Mapped[dt.datetime] = mapped_column(DateTime)
    model_name: Mapped[str] = mapped_column(String(64), default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    n_series: Mapped[int] = mapped_column(Integer, default=0)
    drifted: Mapped[int] = mapped_column(Integer, default=0)
    warning: Mapped[str] = mapped_column(Text, default="")
    report_json: Mapped[str] = mapped_column(Text, default="")


class ChallengerResult(Base):
    """The challenger model's verdict on a job's series (``node/challenger.py``): recorded,
    never sent."""

    __tablename__ = "challenger_results"
    __table_args__ = (
        UniqueConstraint("job_id", "model_name", "model_version", name="uq_challenger_job_model"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    analysed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finding: Mapped[str] = mapped_column(String(64), default="")
    series_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    verdict_json: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(Text, default="")
    analysis_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class JobInput(Base):
    """What went into a job's analysis, for drift monitoring (``node.drift.input_mix``): the
    scanner and reconstruction of the series, from its first header (no patient data)."""

    __tablename__ = "job_inputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    manufacturer: Mapped[str] = mapped_column(String(64), default="")
    scanner_model: Mapped[str] = mapped_column(String(64), default="")
    kernel: Mapped[str] = mapped_column(String(64), default="")
    slice_thickness_mm: Mapped[float | None] = mapped_column(Float, nullable=True)
    contrast: Mapped[str] = mapped_column(String(16), default="")
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
