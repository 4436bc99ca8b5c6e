"""The queue (node/jobs.py) and run_job's stages: one stage per claim, attempts counted by the
claim only, and exactly ``max_attempts`` deliveries to a real (pynetdicom) PACS that refuses."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Comprehensive3DSRStorage  # type: ignore[attr-defined]
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from node import jobs, pipeline
from node.config import RetrySettings, Settings
from node.db import Job, JobStage, JobState, Series, SeriesState, utcnow
from node.pipeline import Context
from node.schedule import tick_work
from node.service import open_state
from tests.peers import free_port

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
FAST_RETRY = {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.02}


def make_context(tmp_path: Path, pacs_port: int | None, retry: dict[str, Any]) -> Context:
    """Database, spool and settings in ``tmp_path``; results go to ``pacs`` at ``pacs_port``."""
    peers = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
    raw: dict[str, Any] = {
        "peers": [] if pacs_port is None else peers,
        "results": {"send_to": None if pacs_port is None else "pacs", "retry": retry},
        "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.sqlite3"},
    }
    settings = Settings.model_validate(raw).resolve(tmp_path)
    sessions, spool = open_state(settings)
    return Context(settings=settings, sessions=sessions, spool=spool, model=None)  # type: ignore[arg-type]


def add_job(sessions: sessionmaker[Any], n: int, **values: Any) -> int:
    """A complete series ``n`` with its analysis job (``values`` overwrite the job's columns)."""
    with sessions.begin() as session:
        series = Series(
            study_instance_uid=f"1.2.826.0.1.{n}",
            series_instance_uid=f"1.2.826.0.1.{n}.1",
            modality="CT",
            state=SeriesState.COMPLETE,
        )
        session.add(series)
        session.flush()
        job = jobs.enqueue(session, series)
        for name, value in values.items():
            setattr(job, name, value)
        session.flush()
        return job.id


def row(sessions: sessionmaker[Any], job_id: int) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def make_due(sessions: sessionmaker[Any], job_id: int) -> None:
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(next_attempt_at=utcnow()))


# --------------------------------------------------------------------------------------------------
# claim_next, analysed, attempt_failed


def test_claim_next_runs_a_due_job_once_and_counts_the_attempt(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, None, FAST_RETRY)
    job_id = add_job(ctx.sessions, 1)
    claimed = jobs.claim_next(ctx.sessions)
    assert claimed is not None
    assert (claimed.job_id, claimed.stage, claimed.attempts) == (job_id, JobStage.ANALYSE, 1)
    assert claimed.series_instance_uid == "1.2.826.0.1.1.1" and claimed.series_version == 1
    job = row(ctx.sessions, job_id)
    assert (job.state, job.stage, job.attempts) == (JobState.RUNNING, JobStage.ANALYSE, 1)
    assert job.started_at is not None
    assert jobs.claim_next(ctx.sessions) is None  # running: nobody claims it again


def test_claim_next_waits_for_the_due_time_and_takes_deliveries_first(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, None, FAST_RETRY)
    now = utcnow()
    add_job(ctx.sessions, 1, next_attempt_at=now + dt.timedelta(hours=1))  # backing off
    waiting = add_job(ctx.sessions, 2, next_attempt_at=now - dt.timedelta(minutes=5))
    analysed = add_job(ctx.sessions, 3, stage=JobStage.DELIVER)  # due later than job 2
    order = []
    while (claimed := jobs.claim_next(ctx.sessions)) is not None:
        order.append((claimed.job_id, claimed.stage))
    # a finished analysis reaches the PACS before the next series is analysed
    assert order == [(analysed, JobStage.DELIVER), (waiting, JobStage.ANALYSE)]


def test_analysed_queues_the_delivery_with_no_attempt_yet(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, None, FAST_RETRY)
    job_id = add_job(ctx.sessions, 1, attempts=3, last_error="attempt 2: disk full")
    claimed = jobs.claim_next(ctx.sessions)
    assert claimed is not None and claimed.attempts == 4
    jobs.analysed(ctx.sessions, job_id, sr_path="x.dcm")
    job = row(ctx.sessions, job_id)
    assert (job.state, job.stage, job.attempts) == (JobState.QUEUED, JobStage.DELIVER, 0)
    assert (job.last_error, job.sr_path) == ("", "x.dcm")
    delivery = jobs.claim_next(ctx.sessions)
    assert delivery is not None and (delivery.stage, delivery.attempts) == (JobStage.DELIVER, 1)


def test_attempt_failed_backs_off_then_dead_letters_at_max_attempts(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, None, FAST_RETRY)
    retry = RetrySettings(max_attempts=2, initial_backoff_s=10, max_backoff_s=60)
    job_id = add_job(ctx.sessions, 1, stage=JobStage.DELIVER)

    first = jobs.claim_next(ctx.sessions)
    assert first is not None and first.attempts == 1
    before = utcnow()
    assert jobs.attempt_failed(ctx.sessions, first, "refused", retry) == JobState.QUEUED
    job = row(ctx.sessions, job_id)
    assert (job.state, job.stage, job.attempts) == (JobState.QUEUED, JobStage.DELIVER, 1)
    assert job.last_error == "attempt 1: refused (next try in 10 s)"
    assert job.next_attempt_at >= before + dt.timedelta(seconds=9.9)
    assert jobs.claim_next(ctx.sessions) is None  # not due before the backoff

    make_due(ctx.sessions, job_id)
    second = jobs.claim_next(ctx.sessions)
    assert second is not None and second.attempts == 2
    assert jobs.attempt_failed(ctx.sessions, second, "refused again", retry) == JobState.FAILED
    job = row(ctx.sessions, job_id)
    assert (job.state, job.stage, job.attempts) == (JobState.FAILED, JobStage.DELIVER, 2)
    assert job.last_error == "deliver failed 2 times, last: refused again"
    assert job.finished_at is not None
    make_due(ctx.sessions, job_id)
    assert jobs.claim_next(ctx.sessions) is None  # a dead letter waits for `retry`

    assert jobs.retry(ctx.sessions, job_id)
    again = jobs.claim_next(ctx.sessions)
    assert again is not None and (again.stage, again.attempts) == (JobStage.DELIVER, 1)


def test_backoff_doubles_from_the_first_failure_and_is_capped() -> None:
    retry = RetrySettings(max_attempts=8, initial_backoff_s=10, max_backoff_s=60)
    assert [jobs.backoff(n, retry) for n in range(1, 6)] == [10, 20, 40, 60, 60]


# --------------------------------------------------------------------------------------------------
# run_job against a real Storage SCP


@dataclass
class PACS:
    """A pynetdicom Storage SCP answering every C-STORE with ``status``.  At each C-STORE it
    reads the job's row as the node's database has it while the node is sending."""

    port: int
    status: int
    sessions: sessionmaker[Any] | None = None
    seen: list[tuple[str, str, int]] = field(default_factory=list)

    def handle_store(self, event: Event) -> int:
        assert self.sessions is not None
        with self.sessions() as session:
            job = session.scalars(select(Job)).one()
            self.seen.append((job.state, job.stage, job.attempts))
        return self.status


@pytest.fixture
def pacs() -> Iterator[Callable[[int], PACS]]:
    """``pacs(status)``: a Storage SCP (AE PACS) for Comprehensive 3D SR on a free port."""
    servers = []

    def start(status: int) -> PACS:
        peer = PACS(free_port(), status)
        ae = AE(ae_title="PACS")
        ae.add_supported_context(Comprehensive3DSRStorage)
        server = ae.start_server(
            ("127.0.0.1", peer.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, peer.handle_store)],
        )
        assert server is not None
        servers.append(server)
        return peer

    yield start
    for server in servers:
        server.shutdown()


def write_sr(results_dir: Path, study_uid: str | None = None) -> Path:
    """A minimal Comprehensive 3D SR where ``outputs.write_outputs`` puts one."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "TEST"
    ds.Modality = "SR"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    folder = results_dir / ds.SOPInstanceUID
    folder.mkdir(parents=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def analysis_writes(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], list[int]]:
    """Replace the analysis by one that records the SR at the given path, as the real one does
    (``jobs.analysed``); returns the ids of the jobs analysed."""

    def install(sr_path: Path) -> list[int]:
        analysed: list[int] = []

        def analyse_and_report(job: jobs.ClaimedJob, ctx: Context) -> Path:
            analysed.append(job.job_id)
            jobs.analysed(ctx.sessions, job.job_id, analysed=1, sr_path=str(sr_path))
            return sr_path

        monkeypatch.setattr(pipeline, "analyse_and_report", analyse_and_report)
        return analysed

    return install


def run_until_finished(ctx: Context, job_id: int, timeout: float = 20) -> Job:
    """Scheduler ticks (as ``tick_work`` runs them) until the job is done or failed."""
    deadline = dt.datetime.now() + dt.timedelta(seconds=timeout)
    while (job := row(ctx.sessions, job_id)).state not in (JobState.DONE, JobState.FAILED):
        assert dt.datetime.now() < deadline, f"job still {job.state} after {timeout} s"
        tick_work(ctx)
    return job


def test_max_attempts_2_against_a_refusing_pacs_sends_twice_while_running(
    tmp_path: Path,
    pacs: Callable[[int], PACS],
    analysis_writes: Callable[[Path], list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    refusing = pacs(OUT_OF_RESOURCES)
    ctx = make_context(tmp_path, refusing.port, FAST_RETRY)
    refusing.sessions = ctx.sessions
    analysed = analysis_writes(write_sr(ctx.spool.results))
    job_id = add_job(ctx.sessions, 1)
    caplog.set_level(logging.INFO, logger="node.pipeline")

    claimed = jobs.claim_next(ctx.sessions)
    assert claimed is not None
    assert pipeline.run_job(claimed, ctx) == JobState.QUEUED  # the analysis, and nothing sent
    assert analysed == [job_id] and refusing.seen == []
    job = row(ctx.sessions, job_id)
    assert (job.state, job.stage, job.attempts) == (JobState.QUEUED, JobStage.DELIVER, 0)

    job = run_until_finished(ctx, job_id)
    # exactly max_attempts deliveries, each a claim of its own: the row says so while sending
    assert refusing.seen == [
        (JobState.RUNNING, JobStage.DELIVER, 1),
        (JobState.RUNNING, JobStage.DELIVER, 2),
    ]
    assert (job.state, job.attempts) == (JobState.FAILED, 2)
    assert job.last_error == "deliver failed 2 times, last: pacs: C-STORE status 0xA700"
    assert analysed == [job_id]  # a failed delivery never re-runs the analysis
    failures = [r.getMessage() for r in caplog.records if "delivery to pacs failed" in r.message]
    assert len(failures) == 2, failures
    assert "(attempt 1 of 2, now queued)" in failures[0]
    assert "(attempt 2 of 2, now failed)" in failures[1]


def test_a_pacs_that_accepts_gets_the_result_once_on_the_next_claim(
    tmp_path: Path, pacs: Callable[[int], PACS], analysis_writes: Callable[[Path], list[int]]
) -> None:
    accepting = pacs(SUCCESS)
    ctx = make_context(tmp_path, accepting.port, FAST_RETRY)
    accepting.sessions = ctx.sessions
    analysis_writes(write_sr(ctx.spool.results))
    job_id = add_job(ctx.sessions, 1)
    assert tick_work(ctx) == 2  # analysis, then its delivery, in one tick
    job = row(ctx.sessions, job_id)
    assert (job.state, job.stage, job.attempts) == (JobState.DONE, JobStage.DELIVER, 1)
    assert job.delivered_at is not None and job.last_error == ""
    assert accepting.seen == [(JobState.RUNNING, JobStage.DELIVER, 1)]


def test_without_a_destination_the_job_ends_after_the_analysis(
    tmp_path: Path, analysis_writes: Callable[[Path], list[int]]
) -> None:
    ctx = make_context(tmp_path, None, FAST_RETRY)
    analysis_writes(write_sr(ctx.spool.results))
    job_id = add_job(ctx.sessions, 1)
    assert tick_work(ctx) == 2
    job = row(ctx.sessions, job_id)
    assert (job.state, job.delivered_at, job.finished_at is not None) == (JobState.DONE, None, True)


def test_a_disk_error_in_the_analysis_is_retried_at_the_analysis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = make_context(tmp_path, None, FAST_RETRY)

    def disk_full(job: jobs.ClaimedJob, ctx: Context) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "analyse_and_report", disk_full)
    job_id = add_job(ctx.sessions, 1)
    job = run_until_finished(ctx, job_id)
    assert (job.state, job.stage, job.attempts) == (JobState.FAILED, JobStage.ANALYSE, 2)
    assert job.last_error == "analyse failed 2 times, last: [Errno 28] No space left on device"
