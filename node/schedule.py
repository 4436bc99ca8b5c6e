"""Scheduling stage: APScheduler only ticks; all state lives in the database.

Ticks: complete quiet series, run due jobs (analysis and delivery retries), purge old spool
files, and (optionally) catch up on studies the PACS failed to forward.  A receiving process
ticks completion, purge and catch-up; a working process ticks the jobs; ``serve`` ticks all.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select, update

from node import jobs
from node.db import Instance, Job, JobState, Series, SeriesState, utcnow
from node.pipeline import Context, run_job
from node.series_complete import complete_quiet_series

logger = logging.getLogger(__name__)


def tick_complete(ctx: Context) -> None:
    complete_quiet_series(ctx.sessions, ctx.settings.series_quiet_seconds, ctx.settings.selection)


def tick_work(ctx: Context, max_jobs: int = 50, *, worker_id: str | None = None) -> int:
    """Run due jobs one after another, each under this worker's lease (one worker per process:
    inference uses every core anyway; more workers are more ``triage-node work`` processes)."""
    worker = worker_id or jobs.worker_identity()
    lease_s = ctx.settings.workers.lease_s
    done = 0
    while done < max_jobs:
        job = jobs.claim_next(
            ctx.sessions,
            worker_id=worker,
            lease_s=lease_s,
            max_attempts=ctx.settings.results.retry.max_attempts,
        )
        if job is None:
            break
        with jobs.leased(ctx.sessions, job, worker, lease_s):
            run_job(job, ctx)
        done += 1
    return done


def tick_purge(ctx: Context) -> int:
    """Delete spooled instances older than the retention of series whose jobs are all finished."""
    cutoff = utcnow() - dt.timedelta(days=ctx.settings.storage.retention_days)
    busy = select(Job.series_id).where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
    with ctx.sessions.begin() as session:
        rows = session.execute(
            select(Instance.id, Instance.path)
            .join(Series, Series.id == Instance.series_id)
            .where(
                Instance.purged == 0,
                Instance.received_at < cutoff,
                Series.state != SeriesState.RECEIVING,
                Instance.series_id.not_in(busy),
            )
            .limit(10000)
        ).all()
        for _, path in rows:
            Path(path).unlink(missing_ok=True)
        if rows:
            session.execute(
                update(Instance).where(Instance.id.in_([r[0] for r in rows])).values(purged=1)
            )
    if rows:
        logger.info("purged %d spooled instance(s) older than the retention", len(rows))
    return len(rows)


def make_scheduler(
    ctx: Context,
    extra: Sequence[tuple[Callable[[], object], float]] = (),
    *,
    receive: bool = True,
    work: bool = True,
) -> BackgroundScheduler:
    """The ticks of a process that ``receive``s (completion, purge, ``extra``: catch-up),
    ``work``s (claim and run jobs), or both (``serve``)."""
    scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
    tick = ctx.settings.scheduler_tick_s
    if receive:
        scheduler.add_job(tick_complete, "interval", seconds=tick, args=[ctx], id="complete")
        scheduler.add_job(tick_purge, "interval", seconds=3600, args=[ctx], id="purge")
    if work:
        worker = jobs.worker_identity()
        scheduler.add_job(
            tick_work, "interval", seconds=tick, args=[ctx], kwargs={"worker_id": worker}, id="work"
        )
    for i, (func, seconds) in enumerate(extra):
        scheduler.add_job(
            func, "interval", seconds=seconds, id=f"extra{i}", next_run_time=dt.datetime.now()
        )
    return scheduler
