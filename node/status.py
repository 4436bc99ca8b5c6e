"""Status: what the node holds and does, for ``triage-node status``, ``status --json`` and the web
console (UIDs only, no patient data).

One vocabulary of series states is defined here (``STATES``, ``STATE_HELP``, ``display_state``)
and used by all three, so the CLI, its JSON and the console name a series' state alike.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db import (
    Job,
    JobStage,
    JobState,
    Series,
    SeriesState,
    ShadowDelivery,
    make_engine,
    make_sessionmaker,
)

#: Series states in pipeline order: the CLI, ``status --json`` and the console use these names.
STATES = (
    "receiving",
    "complete",
    "rejected",
    "queued",
    "running",
    "reported",
    "shadow",
    "delivered",
    "failed",
)
#: What each state means (the console's legend, the README's table).
STATE_HELP = {
    "receiving": "instances arriving; complete after the quiet time",
    "complete": "complete, waiting for its job",
    "rejected": "not a series for this node (selection rules); the reason is shown",
    "queued": "waiting for analysis",
    "running": "being analysed, or its results being sent",
    "reported": "results written; waiting to be sent (retries with back-off) or kept locally",
    "shadow": "results written and withheld by shadow mode (results.mode); "
    "triage-node resend --since sends them",
    "delivered": "results accepted by the PACS",
    "failed": "dead letter: delivery gave up or the job crashed; retry requeues it",
}


def display_state(series: Series, job: Job | None, shadow: bool = False) -> tuple[str, str]:
    """The state of a series' current version and its job (one of ``STATES``), with the reason
    or error to show beside it.  ``shadow``: shadow mode withheld this job's results."""
    if series.state == SeriesState.RECEIVING:
        return "receiving", ""
    if series.state == SeriesState.REJECTED:
        return "rejected", series.reject_reason
    if job is None:
        return "complete", ""
    if job.state == JobState.FAILED:
        return "failed", job.last_error
    if job.stage == JobStage.ANALYSE:
        return ("running" if job.state == JobState.RUNNING else "queued"), "analysis"
    if job.state == JobState.DONE:
        if job.delivered_at is not None:
            return "delivered", ""
        if shadow:
            return "shadow", "shadow mode: not sent"
        return "reported", "results kept locally"
    if job.state == JobState.RUNNING:
        return "running", "sending the results"
    return "reported", job.last_error or "results waiting to be sent"


def withheld_jobs(session: Session, job_ids: Iterable[int] | None = None) -> set[int]:
    """Ids of jobs whose results shadow mode withheld and nobody resent (of ``job_ids``)."""
    query = select(ShadowDelivery.job_id).where(ShadowDelivery.resent_at.is_(None))
    if job_ids is not None:
        query = query.where(ShadowDelivery.job_id.in_(list(job_ids)))
    return set(session.scalars(query).all())


def state_counts(session: Session) -> dict[str, int]:
    """Series per state (all of ``STATES``, zeros included), each series at its current version."""
    rows = session.execute(
        select(Series, Job).outerjoin(
            Job, (Job.series_id == Series.id) & (Job.series_version == Series.version)
        )
    ).all()
    shadow = withheld_jobs(session)
    counts = dict.fromkeys(STATES, 0)
    for series, job in rows:
        state, _ = display_state(series, job, job is not None and job.id in shadow)
        counts[state] += 1
    return counts


def status_report(
    sessions: sessionmaker[Any], mode: str, send_to: str | None, limit: int = 20
) -> dict[str, Any]:
    """The status as a dict (``status --json``); ``state``/``by_state`` use ``STATES``."""
    with sessions() as session:
        series_counts = dict(
            session.execute(select(Series.state, func.count()).group_by(Series.state)).all()
        )
        job_counts = dict(
            session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        )
        by_state = state_counts(session)
        recent = session.execute(
            select(Series, Job)
            .outerjoin(Job, (Job.series_id == Series.id) & (Job.series_version == Series.version))
            .order_by(Series.last_received_at.desc())
            .limit(limit)
        ).all()
        shadow_jobs = withheld_jobs(session)
        failed = session.execute(
            select(Job, Series.series_instance_uid)
            .join(Series, Series.id == Job.series_id)
            .where(Job.state == JobState.FAILED)
            .order_by(Job.id.desc())
            .limit(limit)
        ).all()
    rows = []
    for series, job in recent:
        shadow = bool(job and job.id in shadow_jobs)
        state, detail = display_state(series, job, shadow)
        rows.append(
            {
                "series_instance_uid": series.series_instance_uid,
                "study_instance_uid": series.study_instance_uid,
                "series_description": series.series_description,
                "sender": series.calling_ae,
                "instances": series.instance_count,
                "version": series.version,
                "state": state,
                "detail": detail,
                "series_state": series.state,
                "reject_reason": series.reject_reason,
                "last_received_at": series.last_received_at,
                "job_id": job.id if job else None,
                "job_state": job.state if job else None,
                "job_stage": job.stage if job else None,
                "finding": job.finding if job else None,
                "series_score": job.series_score if job else None,
                "attempts": job.attempts if job else None,
                "last_error": job.last_error if job else None,
                "delivered_at": job.delivered_at if job else None,
                "shadow": shadow,
            }
        )
    return {
        "mode": mode,
        "send_to": send_to,
        "shadow_jobs": len(shadow_jobs),
        "states": list(STATES),
        "by_state": by_state,
        "series_by_state": series_counts,
        "jobs_by_state": job_counts,
        "recent_series": rows,
        "dead_letter": [
            {
                "job_id": job.id,
                "series_instance_uid": uid,
                "stage": job.stage,
                "error": job.last_error,
            }
            for job, uid in failed
        ],
    }


def collect_status(settings: Settings, limit: int = 20) -> dict[str, Any]:
    sessions = make_sessionmaker(make_engine(settings.storage.database_url))
    return status_report(sessions, settings.results.mode, settings.results.send_to, limit)


def _age(then: dt.datetime | None, now: dt.datetime) -> str:
    if then is None:
        return "-"
    seconds = (now - then).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def format_status(report: dict[str, Any], now: dt.datetime) -> str:
    mode = report.get("mode", "live")
    if mode == "shadow":
        headline = (
            f"mode:   shadow: nothing is sent to {report.get('send_to')}; "
            f"{report.get('shadow_jobs', 0)} result(s) withheld (`triage-node resend --since`)"
        )
    else:
        headline = f"mode:   live: results go to {report.get('send_to') or 'nobody (kept local)'}"
        if report.get("shadow_jobs"):
            headline += f"; {report['shadow_jobs']} shadow result(s) unsent (`resend --since`)"
    jobs = report["jobs_by_state"]
    lines = [
        headline,
        "series: " + (", ".join(f"{k} {v}" for k, v in report["by_state"].items() if v) or "none"),
        "jobs:   "
        + (
            ", ".join(f"{k} {jobs[k]}" for k in ("queued", "running", "failed") if jobs.get(k))
            or "none waiting or failed"
        )
        + f" ({sum(jobs.values())} in all, every version)",
        "",
        f"{'SERIES INSTANCE UID':<66} {'N':>4} {'V':>2} {'STATE':<9} {'JOB':>4} "
        f"{'FINDING':<14} {'AGE':>6}",
    ]
    for r in report["recent_series"]:
        finding = r["finding"] or ""
        if r["series_score"] is not None:
            finding = f"{finding} {r['series_score']:.2f}"
        lines.append(
            f"{r['series_instance_uid']:<66} {r['instances']:>4} {r['version']:>2} "
            f"{r['state']:<9} {r['job_id'] or '-':>4} "
            f"{finding[:14]:<14} {_age(r['last_received_at'], now):>6}"
        )
        if r["detail"]:
            lines.append(f"    {r['state']}: {r['detail']}")
        if r["last_error"] and r["last_error"] != r["detail"]:
            lines.append(f"    last error: {r['last_error']}")
    if report["dead_letter"]:
        lines += ["", "dead letter (retry with `triage-node retry <job>`):"]
        lines += [
            f"  job {d['job_id']} {d['series_instance_uid']} [{d['stage']}]: {d['error']}"
            for d in report["dead_letter"]
        ]
    return "\n".join(lines)
