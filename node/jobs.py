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
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select, update
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


def claim_next(sessions: sessionmaker[Any]) -> ClaimedJob | None:
    """Atomically move the next due job to ``running``, count the attempt, and return it (None if
    nothing is due).

    Due deliveries come first: a finished analysis reaches the PACS before the next series is
    analysed.  The conditional UPDATE (``WHERE state = 'queued'``) is the claim: if two workers
    race, only one sees a row count of 1.  ``ClaimedJob.attempts`` is this attempt (1-based).
    """
    now = utcnow()
    delivery_first = case((Job.stage == JobStage.DELIVER, 0), else_=1)
    with sessions.begin() as session:
        candidates = session.execute(
            select(Job.id)
            .where(Job.state == JobState.QUEUED, Job.next_attempt_at <= now)
            .order_by(delivery_first, Job.next_attempt_at, Job.id)
            .limit(5)
        ).scalars()
        for job_id in candidates:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.QUEUED)
                .values(state=JobState.RUNNING, started_at=now, attempts=Job.attempts + 1)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                job = session.get(Job, job_id)
                assert job is not None
                series = session.get(Series, job.series_id)
                assert series is not None
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


def requeue_interrupted(sessions: sessionmaker[Any]) -> int:
    """At start-up: jobs left ``running`` by a crash go back to ``queued``."""
    with sessions.begin() as session:
        result = session.execute(
            update(Job)
            .where(Job.state == JobState.RUNNING)
            .values(state=JobState.QUEUED, next_attempt_at=utcnow())
        )
        count = int(result.rowcount or 0)  # type: ignore[attr-defined]
    if count:
        logger.info("requeued %d job(s) interrupted by a restart", count)
    return count


def retry(sessions: sessionmaker[Any], job_id: int) -> bool:
    """Requeue a failed (dead-lettered) job at its current stage.  False if not failed."""
    with sessions.begin() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.FAILED)
            .values(state=JobState.QUEUED, attempts=0, next_attempt_at=utcnow(), finished_at=None)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]
