"""Queue stage: the ``jobs`` table is the queue.

``queued -> running -> done | failed``.  A job has two stages: ``analyse`` (runs once per series
version; its failures become a "not analysed" report, not a retry) and ``deliver`` (sending the
result objects).  Each claim runs one stage: a finished analysis queues its delivery, which the
next claim takes (deliveries first).  Transient failures of either (network, disk full) are retried
with exponential backoff, then dead-lettered as ``failed`` with the reason.  In shadow mode a
delivery ends ``done`` with a ``shadow_deliveries`` mark instead of sending; ``resend_shadowed``
queues those deliveries again on request.

``attempts`` counts the claims of the current stage, and only ``claim_next`` counts them: a row
that is being delivered reads ``running``, ``deliver``, ``attempts`` = this attempt, and
``max_attempts`` claims of a stage are all it gets.

Any number of workers (threads or ``triage-node work`` processes on several machines) share the
queue.  A claim is a lease: ``worker_id`` runs the job until ``lease_expires_at``, which its
heartbeat (``extend_lease``) keeps pushing forward while the stage runs.  A worker that dies
stops beating; once its lease expires any worker claims the job again, so nobody has to
"requeue at start-up" (which would steal the running jobs of the other workers).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.config import RetrySettings
from node.db import (
    Instance,
    Job,
    JobStage,
    JobState,
    Series,
    SeriesState,
    ShadowDelivery,
    utcnow,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    stage: str
    attempts: int
    series_id: int
    series_version: int
    study_instance_uid: str
    series_instance_uid: str


def enqueue(session: Session, series: Series) -> Job:
    """The analysis job of ``series``' current version (created if missing: one per version)."""
    job = session.scalars(
        select(Job).where(Job.series_id == series.id, Job.series_version == series.version)
    ).one_or_none()
    if job is None:
        job = Job(
            series_id=series.id,
            series_version=series.version,
            state=JobState.QUEUED,
            stage=JobStage.ANALYSE,
        )
        session.add(job)
        session.flush()
    return job


def rerun(sessions: sessionmaker[Any], series_id: int) -> int:
    """Analyse a series again with the model loaded now: a new series version with a new job.

    The new SR names the previous one as its predecessor (as for a series reopened by new
    instances).  Returns the new job id.

    Raises
    ------
    ValueError
        With the reason, when the series cannot be re-run now.
    """
    with sessions.begin() as session:
        series = session.get(Series, series_id)
        if series is None:
            raise ValueError(f"no series with id {series_id}")
        if series.state == SeriesState.RECEIVING:
            raise ValueError("the series is still receiving; it is analysed when complete")
        busy = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.series_id == series_id, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
        )
        if busy:
            raise ValueError("a job for this series is already queued or running")
        kept = session.scalar(
            select(func.count())
            .select_from(Instance)
            .where(Instance.series_id == series_id, Instance.purged == 0)
        )
        if not kept:
            raise ValueError("its instances were purged from the spool: send it again")
        series.version += 1
        series.state = SeriesState.COMPLETE
        series.reject_reason = ""
        series.completed_at = utcnow()
        job = enqueue(session, series)
        logger.info(
            "series %s re-run as version %d, job %d",
            series.series_instance_uid,
            series.version,
            job.id,
        )
        return job.id


DEFAULT_LEASE_S = 60.0


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def worker_identity() -> str:
    """This process as a worker, ``host:pid-namespace:pid`` (what ``jobs.worker_id`` records):
    the namespace tells two containers with one host name apart."""
    return f"{socket.gethostname()}:{_pid_namespace()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def requeue_orphans(sessions: sessionmaker[Any]) -> int:
    """At a worker's start-up: jobs left ``running`` by a worker of this host (same host name
    and pid namespace) whose process is gone go back to ``queued`` at once, instead of waiting
    for their lease to expire.  Jobs of live workers, and of other hosts, are left to their
    leases: this never takes a job another worker is running."""
    host, namespace, _ = worker_identity().rsplit(":", 2)
    prefix = f"{host}:{namespace}:"
    now = utcnow()
    with sessions.begin() as session:
        running = session.execute(
            select(Job.id, Job.worker_id).where(
                Job.state == JobState.RUNNING, Job.worker_id.startswith(prefix, autoescape=True)
            )
        ).all()
        orphans = [
            (job_id, worker)
            for job_id, worker in running
            if worker[len(prefix) :].isdigit() and not _pid_alive(int(worker[len(prefix) :]))
        ]
        count = 0
        for job_id, worker in orphans:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.worker_id == worker)
                .values(state=JobState.QUEUED, next_attempt_at=now, lease_expires_at=None)
            )
            count += int(result.rowcount or 0)  # type: ignore[attr-defined]
    if count:
        logger.info(
            "requeued %d job(s) interrupted by a restart (their worker on this host is gone)",
            count,
        )
    return count


def _claimable(now: dt.datetime) -> ColumnElement[bool]:
    """Due queued jobs, and running jobs whose worker's lease expired (the worker died, hung or
    lost the database; a row without a lease was left running by a node older than leases)."""
    return or_(
        and_(Job.state == JobState.QUEUED, Job.next_attempt_at <= now),
        and_(
            Job.state == JobState.RUNNING,
            or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now),
        ),
    )


def claim_next(
    sessions: sessionmaker[Any],
    *,
    worker_id: str | None = None,
    lease_s: float = DEFAULT_LEASE_S,
    max_attempts: int | None = None,
) -> ClaimedJob | None:
    """Atomically move the next due job to ``running`` for ``worker_id``, leased for
    ``lease_s`` seconds, count the attempt, and return it (None if nothing is due).

    Due deliveries come first: a finished analysis reaches the PACS before the next series is
    analysed.  A running job whose lease expired is claimable again: its worker is gone, so the
    stage it was running is started over as a new attempt.  The worker keeps its lease alive
    with ``extend_lease`` while the stage runs.  ``ClaimedJob.attempts`` is this attempt
    (1-based); an expired job that already had ``max_attempts`` is dead-lettered instead (a
    series that kills its worker every time must not kill them all).

    Safe with any number of workers in any number of processes: on PostgreSQL the candidate
    rows are locked with ``SELECT ... FOR UPDATE SKIP LOCKED`` (a worker never waits for, nor
    takes, a row another is claiming); everywhere the claim itself is a conditional UPDATE that
    repeats the claimable condition, so of two racing workers only one sees a row count of 1
    (on SQLite writers are serialised and the second one's WHERE no longer matches).
    """
    worker = worker_id or worker_identity()
    now = utcnow()
    delivery_first = case((Job.stage == JobStage.DELIVER, 0), else_=1)
    with sessions.begin() as session:
        candidates = session.execute(
            select(Job.id, Job.state, Job.attempts)
            .where(_claimable(now))
            .order_by(delivery_first, Job.next_attempt_at, Job.id)
            .limit(5)
            .with_for_update(skip_locked=True)
        ).all()
        for job_id, state, attempts in candidates:
            if state == JobState.RUNNING and max_attempts is not None and attempts >= max_attempts:
                _dead_letter_lost(session, job_id, now, attempts)
                continue
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, _claimable(now))
                .values(
                    state=JobState.RUNNING,
                    started_at=now,
                    attempts=Job.attempts + 1,
                    worker_id=worker,
                    lease_expires_at=now + dt.timedelta(seconds=lease_s),
                )
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                job = session.get(Job, job_id)
                assert job is not None
                series = session.get(Series, job.series_id)
                assert series is not None
                if state == JobState.RUNNING:
                    logger.warning(
                        "job %d series %s: lease of the worker running its %s expired; "
                        "reclaimed by %s as attempt %d",
                        job.id,
                        series.series_instance_uid,
                        job.stage,
                        worker,
                        job.attempts,
                    )
                return ClaimedJob(
                    job_id=job.id,
                    stage=job.stage,
                    attempts=job.attempts,
                    series_id=series.id,
                    series_version=job.series_version,
                    study_instance_uid=series.study_instance_uid,
                    series_instance_uid=series.series_instance_uid,
                )
    return None


def _dead_letter_lost(session: Session, job_id: int, now: dt.datetime, attempts: int) -> None:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, _claimable(now))
        .values(
            state=JobState.FAILED,
            finished_at=now,
            lease_expires_at=None,
            last_error=f"its worker was lost (lease expired) in each of {attempts} attempts",
        )
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        logger.error("job %d: worker lost in each of %d attempts: dead-lettered", job_id, attempts)


@contextmanager
def leased(
    sessions: sessionmaker[Any], job: ClaimedJob, worker_id: str, lease_s: float
) -> Iterator[None]:
    """Keep ``worker_id``'s lease on ``job`` alive while the block runs: a heartbeat thread
    renews it every third of ``lease_s``.  Should the lease be lost anyway (the worker stalled
    longer than ``lease_s`` and another worker reclaimed the job) the heartbeat says so and
    stops; the result objects' deterministic UIDs make a second delivery harmless."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(lease_s / 3):
            try:
                if extend_lease(sessions, job.job_id, worker_id, lease_s):
                    continue
                holder = _holder(sessions, job.job_id)
            except SQLAlchemyError as exc:  # the database is away: try again next beat
                logger.warning("job %d: lease not renewed: %s", job.job_id, exc)
                continue
            if holder is not None and not stop.is_set():
                logger.warning(
                    "job %d series %s: lease lost, the job is now %s's",
                    job.job_id,
                    job.series_instance_uid,
                    holder,
                )
            return

    thread = threading.Thread(target=beat, name=f"lease-job-{job.job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _holder(sessions: sessionmaker[Any], job_id: int) -> str | None:
    """The worker now running ``job_id``, or None when it is not running."""
    with sessions() as session:
        row = session.execute(
            select(Job.state, Job.worker_id).where(Job.id == job_id)
        ).one_or_none()
    return row[1] if row is not None and row[0] == JobState.RUNNING else None


def extend_lease(
    sessions: sessionmaker[Any], job_id: int, worker_id: str, lease_s: float = DEFAULT_LEASE_S
) -> bool:
    """The heartbeat: keep ``worker_id``'s claim on the running job ``job_id`` for another
    ``lease_s`` seconds.  False when the claim is no longer this worker's (the lease expired and
    another worker reclaimed the job, or the job left ``running``)."""
    with sessions.begin() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.worker_id == worker_id)
            .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_s))
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def update_job(sessions: sessionmaker[Any], job_id: int, **values: Any) -> None:
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def analysed(sessions: sessionmaker[Any], job_id: int, **results: Any) -> None:
    """Analysis finished (verdict or not-analysed): the job is queued for delivery, due now,
    with no delivery attempt yet."""
    update_job(
        sessions,
        job_id,
        state=JobState.QUEUED,
        stage=JobStage.DELIVER,
        attempts=0,
        next_attempt_at=utcnow(),
        last_error="",
        **results,
    )


def delivered(sessions: sessionmaker[Any], job_id: int) -> None:
    now = utcnow()
    update_job(
        sessions, job_id, state=JobState.DONE, finished_at=now, delivered_at=now, last_error=""
    )


def finished_without_delivery(sessions: sessionmaker[Any], job_id: int) -> None:
    update_job(sessions, job_id, state=JobState.DONE, finished_at=utcnow(), last_error="")


def shadowed(sessions: sessionmaker[Any], job_id: int, peer: str) -> None:
    """Shadow mode withheld the delivery to ``peer``: the job is done, marked shadow, unsent."""
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state=JobState.DONE, finished_at=utcnow(), last_error="")
        )
        mark = session.scalars(
            select(ShadowDelivery).where(ShadowDelivery.job_id == job_id)
        ).one_or_none()
        if mark is None:
            session.add(ShadowDelivery(job_id=job_id, peer=peer))
        else:  # resent while the node was still in shadow mode: withheld again
            mark.peer, mark.recorded_at, mark.resent_at = peer, utcnow(), None


def resend_shadowed(sessions: sessionmaker[Any], since: dt.datetime) -> list[int]:
    """Queue for delivery the jobs shadow mode withheld since ``since`` and not resent yet;
    return their ids.  Nothing else is ever re-sent: going live alone sends no old result."""
    now = utcnow()
    with sessions.begin() as session:
        marks = session.scalars(
            select(ShadowDelivery)
            .join(Job, Job.id == ShadowDelivery.job_id)
            .where(
                ShadowDelivery.recorded_at >= since,
                ShadowDelivery.resent_at.is_(None),
                Job.state == JobState.DONE,
                Job.sr_path != "",
            )
            .order_by(ShadowDelivery.job_id)
        ).all()
        ids = [m.job_id for m in marks]
        for mark in marks:
            mark.resent_at = now
        if ids:
            session.execute(
                update(Job)
                .where(Job.id.in_(ids))
                .values(
                    state=JobState.QUEUED,
                    stage=JobStage.DELIVER,
                    attempts=0,
                    next_attempt_at=now,
                    finished_at=None,
                    last_error="",
                )
            )
    if ids:
        logger.info("requeued %d shadow delivery(ies) for sending: jobs %s", len(ids), ids)
    return ids


def backoff(attempts: int, retry: RetrySettings) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based): doubling, capped."""
    return float(min(retry.max_backoff_s, retry.initial_backoff_s * 2 ** max(0, attempts - 1)))


def attempt_failed(
    sessions: sessionmaker[Any], job: ClaimedJob, error: str, retry: RetrySettings
) -> str:
    """A transient failure (delivery, disk) of the claimed attempt: queue the same stage again
    with backoff, or dead-letter it when that was attempt ``max_attempts``; return the new state.

    ``job.attempts`` is the row's count, made by ``claim_next``; it is not written here.
    """
    if job.attempts >= retry.max_attempts:
        update_job(
            sessions,
            job.job_id,
            state=JobState.FAILED,
            finished_at=utcnow(),
            last_error=f"{job.stage} failed {job.attempts} times, last: {error}",
        )
        return JobState.FAILED
    delay = backoff(job.attempts, retry)
    update_job(
        sessions,
        job.job_id,
        state=JobState.QUEUED,
        next_attempt_at=utcnow() + dt.timedelta(seconds=delay),
        last_error=f"attempt {job.attempts}: {error} (next try in {delay:.0f} s)",
    )
    return JobState.QUEUED


def failed(sessions: sessionmaker[Any], job_id: int, error: str) -> None:
    update_job(
        sessions, job_id, state=JobState.FAILED, finished_at=utcnow(), last_error=error[:2000]
    )


def retry(sessions: sessionmaker[Any], job_id: int) -> bool:
    """Requeue a failed (dead-lettered) job at its current stage.  False if not failed."""
    with sessions.begin() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.FAILED)
            .values(state=JobState.QUEUED, attempts=0, next_attempt_at=utcnow(), finished_at=None)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]
