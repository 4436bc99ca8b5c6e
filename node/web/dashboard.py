"""Web console, dashboard: what the node holds and does, and the two admin actions.

Rows show descriptive, non-identifying tags only (study date, series description, sender AE,
UIDs): never patient name, ID or birth date, which the database does not hold anyway.  The
verdict shown is the category (``node.assess``, the job row's ``finding``) and PO from the stored
verdict JSON; the CNN's class and score are kept beside it for reference.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from node.assess import CATEGORIES, CATEGORY_TEXT, NEGATIVE
from node.db import Job, JobStage, JobState, Series, SeriesState, utcnow

logger = logging.getLogger(__name__)

#: Display states, in pipeline order (the legend and the summary use this order).
STATES = (
    "receiving",
    "complete",
    "rejected",
    "queued",
    "running",
    "reported",
    "delivered",
    "failed",
)


@dataclass(frozen=True)
class SeriesRow:
    series_id: int
    series_instance_uid: str
    study_date: str
    series_description: str
    modality: str
    sender: str
    instances: int
    version: int
    state: str
    detail: str
    last_received_at: dt.datetime
    job_id: int | None = None
    analysed: bool | None = None
    category: str = ""  # node.assess category; "" when analysed by a node before the analysis
    po: float | None = None  # PO of both lungs (%)
    reason: str = ""  # why it was not analysed
    cnn_finding: str = ""  # the CNN's class, for reference
    probabilities: dict[str, float] = field(default_factory=dict)  # the CNN's
    series_score: float | None = None  # the CNN's
    model: str = ""
    turnaround_s: float | None = None
    attempts: int = 0

    @property
    def category_text(self) -> str:
        return CATEGORY_TEXT.get(self.category, self.category)

    @property
    def flagged(self) -> bool:
        """Pneumonia-range opacity (typical, indeterminate, atypical): read this one first."""
        return self.category in CATEGORIES and self.category != NEGATIVE

    @property
    def can_retry(self) -> bool:
        return self.state == "failed" and self.job_id is not None

    @property
    def can_rerun(self) -> bool:
        return self.state in ("rejected", "reported", "delivered", "failed", "complete")


def display_state(series: Series, job: Job | None) -> tuple[str, str]:
    """One state for a series version and its job, with the reason or error to show."""
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
        return (
            ("delivered", "") if job.delivered_at is not None else ("reported", "SR kept locally")
        )
    if job.state == JobState.RUNNING:
        return "running", "sending the SR"
    return "reported", job.last_error or "SR waiting to be sent"


def _row(series: Series, job: Job | None, now: dt.datetime) -> SeriesRow:
    state, detail = display_state(series, job)
    extra: dict[str, Any] = {}
    if job is not None:
        verdict: dict[str, Any] = json.loads(job.verdict_json) if job.verdict_json else {}
        extra = {
            "job_id": job.id,
            "attempts": job.attempts,
            "analysed": None if job.analysed is None else bool(job.analysed),
            "category": job.finding if job.finding in CATEGORIES else "",
            "po": _total_po(verdict),
            "reason": str(verdict.get("reason") or "") if job.analysed == 0 else "",
            "cnn_finding": str(verdict.get("finding") or ""),
            "probabilities": dict(verdict.get("probabilities") or {}),
            "series_score": job.series_score,
            "model": f"{job.model_name} {job.model_version}".strip(),
        }
        if job.delivered_at is not None:
            extra["turnaround_s"] = (job.delivered_at - series.last_received_at).total_seconds()
    return SeriesRow(
        series_id=series.id,
        series_instance_uid=series.series_instance_uid,
        study_date=series.study_date,
        series_description=series.series_description,
        modality=series.modality,
        sender=series.calling_ae,
        instances=series.instance_count,
        version=series.version,
        state=state,
        detail=detail,
        last_received_at=series.last_received_at,
        **extra,
    )


def _total_po(verdict: dict[str, Any]) -> float | None:
    """PO of both lungs from a stored verdict (None: not analysed, or an earlier node's)."""
    total = (verdict.get("quantification") or {}).get("total") or {}
    po = total.get("po")
    return None if po is None else float(po)


def recent_series(sessions: sessionmaker[Any], limit: int = 100) -> list[SeriesRow]:
    """The latest series (by last instance received), each with the job of its current version."""
    now = utcnow()
    with sessions() as session:
        rows = session.execute(
            select(Series, Job)
            .outerjoin(Job, (Job.series_id == Series.id) & (Job.series_version == Series.version))
            .order_by(Series.last_received_at.desc())
            .limit(limit)
        ).all()
    return [_row(series, job, now) for series, job in rows]


def summary(rows: list[SeriesRow]) -> dict[str, int]:
    """Series per display state, and ``flagged``: those to read first."""
    counts = dict.fromkeys(STATES, 0)
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    counts["flagged"] = sum(row.flagged for row in rows)
    return counts
