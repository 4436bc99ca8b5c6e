"""Status: what the node holds and does, for ``triage-node status`` (UIDs only, no patient data)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select

from node.config import Settings
from node.db import Job, JobState, Series, ShadowDelivery, make_engine, make_sessionmaker


def collect_status(settings: Settings, limit: int = 20) -> dict[str, Any]:
    sessions = make_sessionmaker(make_engine(settings.storage.database_url))
    with sessions() as session:
        series_counts = dict(
            session.execute(select(Series.state, func.count()).group_by(Series.state)).all()
        )
        job_counts = dict(
            session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        )
        recent = session.execute(
            select(Series, Job)
            .outerjoin(Job, (Job.series_id == Series.id) & (Job.series_version == Series.version))
            .order_by(Series.last_received_at.desc())
            .limit(limit)
        ).all()
        shadow_jobs = set(
            session.scalars(
                select(ShadowDelivery.job_id).where(ShadowDelivery.resent_at.is_(None))
            ).all()
        )
        failed = session.execute(
            select(Job, Series.series_instance_uid)
            .join(Series, Series.id == Job.series_id)
            .where(Job.state == JobState.FAILED)
            .order_by(Job.id.desc())
            .limit(limit)
        ).all()
    rows = []
    for series, job in recent:
        rows.append(
            {
                "series_instance_uid": series.series_instance_uid,
                "study_instance_uid": series.study_instance_uid,
                "series_description": series.series_description,
                "sender": series.calling_ae,
                "instances": series.instance_count,
                "version": series.version,
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
                "shadow": bool(job and job.id in shadow_jobs),
            }
        )
    return {
        "mode": settings.results.mode,
        "send_to": settings.results.send_to,
        "shadow_jobs": len(shadow_jobs),
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
    lines = [
        headline,
        "series: "
        + (", ".join(f"{k} {v}" for k, v in sorted(report["series_by_state"].items())) or "none"),
        "jobs:   "
        + (", ".join(f"{k} {v}" for k, v in sorted(report["jobs_by_state"].items())) or "none"),
        "",
        f"{'SERIES INSTANCE UID':<66} {'N':>4} {'V':>2} {'SERIES':<9} {'JOB':>4} {'STATE':<8} "
        f"{'STAGE':<8} {'FINDING':<14} {'AGE':>6}",
    ]
    for r in report["recent_series"]:
        finding = r["finding"] or ""
        state = "shadow" if r.get("shadow") else (r["job_state"] or "-")
        if r["series_score"] is not None:
            finding = f"{finding} {r['series_score']:.2f}"
        lines.append(
            f"{r['series_instance_uid']:<66} {r['instances']:>4} {r['version']:>2} "
            f"{r['series_state']:<9} {r['job_id'] or '-':>4} {state:<8} "
            f"{r['job_stage'] or '-':<8} {finding[:14]:<14} {_age(r['last_received_at'], now):>6}"
        )
        if r["reject_reason"]:
            lines.append(f"    rejected: {r['reject_reason']}")
        if r["last_error"]:
            lines.append(f"    last error: {r['last_error']}")
    if report["dead_letter"]:
        lines += ["", "dead letter (retry with `triage-node retry <job>`):"]
        lines += [
            f"  job {d['job_id']} {d['series_instance_uid']} [{d['stage']}]: {d['error']}"
            for d in report["dead_letter"]
        ]
    return "\n".join(lines)
