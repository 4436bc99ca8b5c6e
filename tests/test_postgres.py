"""The database on SQLite and on a real PostgreSQL server: migrations (Alembic) that match the ORM,
adopt a database made before migrations and run once when several processes start together; the
queue's claim (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, a conditional UPDATE everywhere), its
leases and heartbeat; and a representative set of the database-touching unit tests (jobs, shadow
deliveries, labels and performance) run again on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, func, inspect, select, text, update
from sqlalchemy.orm import sessionmaker

import node.service
import node.status
from node import jobs
from node.config import Settings
from node.db import (
    MIGRATIONS_DIR,
    Base,
    Instance,
    Job,
    JobStage,
    JobState,
    Label,
    Series,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from node.tracking import InstanceHeader, record_instance
from tests import test_jobs, test_labels_performance, test_shadow
from tests.test_jobs import add_job as add_series_job

# Re-run on PostgreSQL (``on_postgres`` below points their databases there): collected here too.
from tests.test_jobs import (  # noqa: F401
    analysis_writes,
    pacs,
    test_a_disk_error_in_the_analysis_is_retried_at_the_analysis,
    test_a_pacs_that_accepts_gets_the_result_once_on_the_next_claim,
    test_analysed_queues_the_delivery_with_no_attempt_yet,
    test_attempt_failed_backs_off_then_dead_letters_at_max_attempts,
    test_claim_next_runs_a_due_job_once_and_counts_the_attempt,
    test_claim_next_waits_for_the_due_time_and_takes_deliveries_first,
    test_max_attempts_2_against_a_refusing_pacs_sends_twice_while_running,
    test_without_a_destination_the_job_ends_after_the_analysis,
)
from tests.test_jobs import row as job_row
from tests.test_labels_performance import (  # noqa: F401
    state,
    test_a_key_labelled_twice_in_one_file_is_an_error,
    test_import_writes_labels_with_an_audit_trail,
    test_one_bad_row_imports_nothing_and_names_row_and_column,
    test_performance_matches_the_hand_computation,
)
from tests.test_shadow import (  # noqa: F401
    test_resend_since_skips_older_shadow_results,
    test_shadow_sends_nothing_records_everything_and_resend_sends_on_request,
)

REUSED = {
    name
    for module in (test_jobs, test_labels_performance, test_shadow)
    for name in dir(module)
    if name.startswith("test_")
}


@pytest.fixture(autouse=True)
def on_postgres(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For the tests imported from the SQLite suites: every ``open_state`` (theirs and the CLI's)
    opens one new PostgreSQL database instead of the configured SQLite file."""
    if request.function.__name__ not in REUSED:
        yield
        return
    url = str(request.getfixturevalue("postgres_url"))
    original = node.service.open_state
    opened: list[sessionmaker[Any]] = []

    def open_on_postgres(settings: Settings) -> tuple[Any, Any]:
        storage = settings.storage.model_copy(update={"database_url": url})
        sessions, spool = original(settings.model_copy(update={"storage": storage}))
        opened.append(sessions)
        return sessions, spool

    def engine_on_postgres(_url: str, **kwargs: Any) -> Any:
        engine = make_engine(url, **kwargs)
        opened.append(make_sessionmaker(engine))
        return engine

    monkeypatch.setattr(node.service, "open_state", open_on_postgres)
    monkeypatch.setattr(node.status, "make_engine", engine_on_postgres)  # `status`
    for module in (test_jobs, test_labels_performance, test_shadow):
        monkeypatch.setattr(module, "open_state", open_on_postgres)
    yield
    for sessions in opened:  # psycopg warns about connections left to the garbage collector
        sessions.kw["bind"].dispose()


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------------
# migrations


def test_migrations_match_the_orm(database_url: str) -> None:
    """A database made by the migrations is what node/db.py describes: a model changed without
    its revision under node/migrations/versions fails here."""
    engine = make_engine(database_url)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert differences == []
    assert revision(database_url) == head_revision()


def test_the_revisions_are_one_chain_from_the_baseline() -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    chain = [r.revision for r in ScriptDirectory.from_config(config).walk_revisions()]
    assert chain[-2:] == ["0002", "0001"]  # walk_revisions goes from the head down


#: The schema ``Base.metadata.create_all`` made before migrations (node/db.py at 8bbf9e9), as
#: SQLAlchemy 2.0.44 emitted it for SQLite; PostgreSQL's differs only in the types replaced below.
LEGACY_SQLITE = """
CREATE TABLE labels (
    id INTEGER NOT NULL,
    key_kind VARCHAR(16) NOT NULL,
    key_value VARCHAR(64) NOT NULL,
    pneumonia INTEGER NOT NULL,
    covid INTEGER,
    labelled_by VARCHAR(64) NOT NULL,
    labelled_at DATETIME NOT NULL,
    source TEXT NOT NULL,
    updated_at DATETIME NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT uq_label_key UNIQUE (key_kind, key_value)
);
CREATE INDEX ix_labels_key_value ON labels (key_value);
CREATE TABLE series (
    id INTEGER NOT NULL,
    study_instance_uid VARCHAR(64) NOT NULL,
    series_instance_uid VARCHAR(64) NOT NULL,
    modality VARCHAR(16) NOT NULL,
    study_date VARCHAR(8) NOT NULL,
    study_description VARCHAR(64) NOT NULL,
    series_description VARCHAR(64) NOT NULL,
    body_part VARCHAR(16) NOT NULL,
    image_type VARCHAR(128) NOT NULL,
    calling_ae VARCHAR(16) NOT NULL,
    calling_host VARCHAR(64) NOT NULL,
    instance_count INTEGER NOT NULL,
    version INTEGER NOT NULL,
    state VARCHAR(16) NOT NULL,
    reject_reason TEXT NOT NULL,
    first_received_at DATETIME NOT NULL,
    last_received_at DATETIME NOT NULL,
    completed_at DATETIME,
    PRIMARY KEY (id),
    UNIQUE (series_instance_uid)
);
CREATE INDEX ix_series_last_received_at ON series (last_received_at);
CREATE INDEX ix_series_state ON series (state);
CREATE INDEX ix_series_study_instance_uid ON series (study_instance_uid);
CREATE TABLE instances (
    id INTEGER NOT NULL,
    series_id INTEGER NOT NULL,
    sop_instance_uid VARCHAR(64) NOT NULL,
    sop_class_uid VARCHAR(64) NOT NULL,
    transfer_syntax_uid VARCHAR(64) NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at DATETIME NOT NULL,
    purged INTEGER NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(series_id) REFERENCES series (id),
    UNIQUE (sop_instance_uid)
);
CREATE INDEX ix_instances_series_id ON instances (series_id);
CREATE TABLE jobs (
    id INTEGER NOT NULL,
    series_id INTEGER NOT NULL,
    series_version INTEGER NOT NULL,
    state VARCHAR(16) NOT NULL,
    stage VARCHAR(16) NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at DATETIME NOT NULL,
    last_error TEXT NOT NULL,
    created_at DATETIME NOT NULL,
    started_at DATETIME,
    finished_at DATETIME,
    analysed INTEGER,
    finding VARCHAR(64) NOT NULL,
    series_score FLOAT,
    verdict_json TEXT NOT NULL,
    model_name VARCHAR(64) NOT NULL,
    model_version VARCHAR(64) NOT NULL,
    sr_series_uid VARCHAR(64) NOT NULL,
    sr_sop_instance_uid VARCHAR(64) NOT NULL,
    sr_path TEXT NOT NULL,
    analysis_s FLOAT,
    delivered_at DATETIME,
    PRIMARY KEY (id),
    CONSTRAINT uq_job_series_version UNIQUE (series_id, series_version),
    FOREIGN KEY(series_id) REFERENCES series (id)
);
CREATE INDEX ix_jobs_claim ON jobs (state, next_attempt_at);
CREATE INDEX ix_jobs_series_id ON jobs (series_id);
CREATE TABLE label_audit (
    id INTEGER NOT NULL,
    label_id INTEGER NOT NULL,
    changed_by VARCHAR(64) NOT NULL,
    changed_at DATETIME NOT NULL,
    before_json TEXT NOT NULL,
    after_json TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(label_id) REFERENCES labels (id)
);
CREATE INDEX ix_label_audit_label_id ON label_audit (label_id);
CREATE TABLE shadow_deliveries (
    id INTEGER NOT NULL,
    job_id INTEGER NOT NULL,
    peer VARCHAR(64) NOT NULL,
    recorded_at DATETIME NOT NULL,
    resent_at DATETIME,
    PRIMARY KEY (id),
    UNIQUE (job_id),
    FOREIGN KEY(job_id) REFERENCES jobs (id)
);
CREATE INDEX ix_shadow_deliveries_recorded_at ON shadow_deliveries (recorded_at);
"""


def legacy_ddl(dialect: str) -> list[str]:
    ddl = LEGACY_SQLITE
    if dialect == "postgresql":
        ddl = ddl.replace("id INTEGER NOT NULL,\n", "id SERIAL NOT NULL,\n")
        ddl = ddl.replace("DATETIME", "TIMESTAMP WITHOUT TIME ZONE")
    return [s.strip() for s in ddl.split(";") if s.strip()]


def test_a_database_made_before_migrations_is_adopted_then_upgraded(database_url: str) -> None:
    legacy = create_engine(database_url)
    now = utcnow()
    with legacy.begin() as conn:
        for statement in legacy_ddl(legacy.dialect.name):
            conn.execute(text(statement))
        conn.execute(
            text(
                "INSERT INTO series (study_instance_uid, series_instance_uid, modality, "
                "study_date, study_description, series_description, body_part, image_type, "
                "calling_ae, calling_host, instance_count, version, state, reject_reason, "
                "first_received_at, last_received_at) VALUES ('1.2.3', '1.2.3.4', 'CT', '', "
                "'', '', '', '', 'ORTHANC', '127.0.0.1', 30, 1, 'complete', '', :t, :t)"
            ),
            {"t": now},
        )
        conn.execute(
            text(
                "INSERT INTO jobs (series_id, series_version, state, stage, attempts, "
                "next_attempt_at, last_error, created_at, finding, verdict_json, model_name, "
                "model_version, sr_series_uid, sr_sop_instance_uid, sr_path) VALUES "
                "(1, 1, 'running', 'analyse', 1, :t, '', :t, '', '', '', '', '', '', '')"
            ),
            {"t": now},
        )
    assert not inspect(legacy).has_table("alembic_version")
    legacy.dispose()

    engine = make_engine(database_url)  # what a node of this version does at start-up
    assert revision(database_url) == head_revision()
    assert {"worker_id", "lease_expires_at"} <= {
        c["name"] for c in inspect(engine).get_columns("jobs")
    }
    sessions = make_sessionmaker(engine)
    # the old row is kept; left running by the old node, without a lease: claimable at once
    claimed = jobs.claim_next(sessions, worker_id="w1")
    assert claimed is not None and (claimed.job_id, claimed.stage) == (1, JobStage.ANALYSE)
    assert claimed.attempts == 2 and claimed.series_instance_uid == "1.2.3.4"
    # the migrated tables take new rows (their id sequences work on PostgreSQL)
    new_job = add_series_job(sessions, 2)
    assert new_job == 2
    with sessions.begin() as session:
        session.add(
            Label(
                key_kind="series",
                key_value="1.2.3.4",
                pneumonia=1,
                labelled_by="x",
                labelled_at=now,
            )
        )
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def test_a_database_missing_newer_baseline_tables_gets_them(tmp_path: Path) -> None:
    """A node older still (no shadow deliveries, no labels): the baseline adds those tables, as
    ``create_all`` would have."""
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    legacy = create_engine(url)
    with legacy.begin() as conn:
        for statement in legacy_ddl("sqlite"):
            if not any(t in statement for t in ("labels", "label_audit", "shadow_deliveries")):
                conn.execute(text(statement))
    legacy.dispose()
    engine = make_engine(url)
    assert {"labels", "label_audit", "shadow_deliveries"} <= set(inspect(engine).get_table_names())
    assert revision(url) == head_revision()
    engine.dispose()


def test_several_processes_starting_at_once_migrate_once(database_url: str) -> None:
    """Four processes open a new database at the same moment (a receiver and its workers)."""
    code = (
        "import sys; from node.db import make_engine; "
        "make_engine(sys.argv[1]).dispose(); print('ok')"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, database_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, results
    assert revision(database_url) == head_revision()
    engine = make_engine(database_url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


# --------------------------------------------------------------------------------------------------
# the claim, leases and heartbeat


@pytest.fixture
def queue(database_url: str) -> Iterator[tuple[str, sessionmaker[Any]]]:
    engine = make_engine(database_url)
    yield database_url, make_sessionmaker(engine)
    engine.dispose()


def test_racing_workers_claim_each_job_exactly_once(
    queue: tuple[str, sessionmaker[Any]],
) -> None:
    """Six workers, each with its own engine (as separate processes have), empty a queue of 60
    jobs at once: every job is claimed by exactly one of them."""
    url, sessions = queue
    ids = [add_series_job(sessions, n) for n in range(60)]
    claims: dict[str, list[int]] = {}
    start = threading.Barrier(6)
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        engine = make_engine(url)
        own = make_sessionmaker(engine)
        got = claims.setdefault(name, [])
        try:
            start.wait()
            while (job := jobs.claim_next(own, worker_id=name)) is not None:
                got.append(job.job_id)
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    claimed = sorted(j for got in claims.values() for j in got)
    assert claimed == sorted(ids)  # each once, none lost
    with sessions() as session:
        rows = session.execute(select(Job.id, Job.worker_id, Job.attempts)).all()
    owner = {j: name for name, got in claims.items() for j in got}
    assert all(worker_id == owner[job_id] and attempts == 1 for job_id, worker_id, attempts in rows)


def test_on_postgresql_a_row_being_claimed_is_skipped_not_waited_for(postgres_url: str) -> None:
    """``FOR UPDATE SKIP LOCKED``: while one transaction holds the first job's row, another
    worker's claim returns the second job at once (it neither waits nor takes the first)."""
    engine = make_engine(postgres_url)
    sessions = make_sessionmaker(engine)
    first, second = add_series_job(sessions, 1), add_series_job(sessions, 2)
    with engine.connect() as holder:
        holder.execute(select(Job.id).where(Job.id == first).with_for_update())
        # every connection of the other worker gives up on a lock after 5 s: waiting would fail
        other = make_engine(f"{postgres_url}&options=-c%20lock_timeout%3D5000")
        claimed = jobs.claim_next(make_sessionmaker(other), worker_id="w2")
        other.dispose()
        holder.rollback()
    assert claimed is not None and claimed.job_id == second
    assert job_row(sessions, first).state == JobState.QUEUED
    engine.dispose()


def expire(sessions: sessionmaker[Any], job_id: int) -> None:
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - dt.timedelta(seconds=1))
        )


def test_a_running_job_is_reclaimed_only_after_its_lease_expires(
    queue: tuple[str, sessionmaker[Any]],
) -> None:
    _, sessions = queue
    job_id = add_series_job(sessions, 1)
    first = jobs.claim_next(sessions, worker_id="w1", lease_s=60)
    assert first is not None and first.attempts == 1
    row = job_row(sessions, job_id)
    assert row.worker_id == "w1" and row.lease_expires_at is not None
    assert row.lease_expires_at > utcnow()
    assert jobs.claim_next(sessions, worker_id="w2") is None  # w1's lease holds
    assert jobs.extend_lease(sessions, job_id, "w1", 60)
    assert not jobs.extend_lease(sessions, job_id, "w2", 60)  # only the holder renews
    expire(sessions, job_id)  # w1 died: no heartbeat, the lease runs out
    second = jobs.claim_next(sessions, worker_id="w2")
    assert second is not None and (second.job_id, second.stage) == (job_id, JobStage.ANALYSE)
    assert second.attempts == 2  # a reclaim is an attempt, counted by the claim
    assert job_row(sessions, job_id).worker_id == "w2"
    assert not jobs.extend_lease(sessions, job_id, "w1", 60)  # w1, back, has lost it


def test_a_worker_lost_in_every_attempt_is_dead_lettered(
    queue: tuple[str, sessionmaker[Any]],
) -> None:
    _, sessions = queue
    job_id = add_series_job(sessions, 1)
    for attempt in (1, 2):
        claimed = jobs.claim_next(sessions, worker_id=f"w{attempt}", max_attempts=2)
        assert claimed is not None and claimed.attempts == attempt
        expire(sessions, job_id)
    assert jobs.claim_next(sessions, worker_id="w3", max_attempts=2) is None
    row = job_row(sessions, job_id)
    assert row.state == JobState.FAILED and "worker was lost" in row.last_error


def test_the_heartbeat_keeps_a_long_stage_leased(queue: tuple[str, sessionmaker[Any]]) -> None:
    _, sessions = queue
    job_id = add_series_job(sessions, 1)
    job = jobs.claim_next(sessions, worker_id="w1", lease_s=1)
    assert job is not None
    before = job_row(sessions, job_id).lease_expires_at
    assert before is not None
    renewed = threading.Event()

    def lease_moved() -> bool:
        after = job_row(sessions, job_id).lease_expires_at
        return after is not None and after > before

    with jobs.leased(sessions, job, "w1", lease_s=1):
        for _ in range(100):  # the stage runs; the heartbeat beats every 1/3 s
            if lease_moved():
                renewed.set()
                break
            threading.Event().wait(0.05)
        assert renewed.is_set()
        assert jobs.claim_next(sessions, worker_id="w2", lease_s=1) is None


def test_a_restarted_worker_requeues_only_its_own_hosts_dead_workers_jobs(
    queue: tuple[str, sessionmaker[Any]],
) -> None:
    _, sessions = queue
    host, namespace, _ = jobs.worker_identity().rsplit(":", 2)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    owners = {
        "dead here": f"{host}:{namespace}:{gone.pid}",
        "alive here": jobs.worker_identity(),
        "other host": f"elsewhere:{namespace}:{gone.pid}",
    }
    ids = {}
    for n, (what, owner) in enumerate(owners.items()):
        ids[what] = add_series_job(
            sessions,
            n,
            state=JobState.RUNNING,
            worker_id=owner,
            lease_expires_at=utcnow() + dt.timedelta(hours=1),
        )
    assert jobs.requeue_orphans(sessions) == 1
    states = {what: job_row(sessions, i).state for what, i in ids.items()}
    assert states == {
        "dead here": JobState.QUEUED,
        "alive here": JobState.RUNNING,
        "other host": JobState.RUNNING,
    }


def test_timestamps_round_trip_naive_utc(queue: tuple[str, sessionmaker[Any]]) -> None:
    """DateTime columns hold naive UTC on both engines (no time zone shift on PostgreSQL)."""
    _, sessions = queue
    job_id = add_series_job(sessions, 1)
    when = dt.datetime(2026, 12, 1, 12, 34, 56, 123456)
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(next_attempt_at=when))
    assert job_row(sessions, job_id).next_attempt_at == when


# --------------------------------------------------------------------------------------------------
# tracking: concurrent associations, column lengths


def header(series_uid: str, sop_uid: str, **values: str) -> InstanceHeader:
    return InstanceHeader(
        study_instance_uid="1.2.826.0.9.100",
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        **values,
    )


def test_associations_recording_one_series_at_once_count_every_instance(
    queue: tuple[str, sessionmaker[Any]],
) -> None:
    """Four associations record 25 instances each of one series at the same time: one series
    row, version 1, 100 instances counted (no lost update of the count on PostgreSQL)."""
    url, sessions = queue
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def association(n: int) -> None:
        engine = make_engine(url)
        own = make_sessionmaker(engine)
        try:
            start.wait()
            for i in range(25):
                record_instance(own, header("1.2.826.0.9.100.1", f"1.2.826.0.9.100.1.{n}.{i}"),
                                f"/spool/{n}/{i}.dcm", 1000, "STORESCU", "127.0.0.1")  # fmt: skip
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=association, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with sessions() as session:
        series = session.scalars(select(Series)).all()
        instances = session.scalar(select(func.count()).select_from(Instance))
    assert [(s.instance_count, s.version) for s in series] == [(100, 1)]
    assert instances == 100


def test_over_long_header_values_are_cut_to_their_columns(
    queue: tuple[str, sessionmaker[Any]],
) -> None:
    """PostgreSQL enforces VARCHAR(n): a sender's over-long Modality must not fail the store."""
    _, sessions = queue
    record_instance(
        sessions,
        header(
            "1.2.826.0.9.101.1", "1.2.826.0.9.101.1.1", modality="CT" * 20, image_type="X" * 300
        ),
        "/spool/x.dcm",
        1000,
        "STORESCU",
        "127.0.0.1",
    )
    with sessions() as session:
        series = session.scalars(select(Series)).one()
    assert (series.modality, series.image_type) == (("CT" * 20)[:16], "X" * 128)
