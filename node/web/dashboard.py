"""Web console, dashboard: what the node holds and does, the two admin actions, and each
series' label (ground truth) beside its verdict.

Rows show descriptive, non-identifying tags only (study date, series description, sender AE,
UIDs): never patient name, ID or birth date, which the database does not hold anyway.  The
verdict shown is the category (``node.assess``, the job row's ``finding``) and PO from the stored
verdict JSON; the CNN's class and score are kept beside it for reference.  States are
``node.status``'s, the names the CLI and ``status --json`` use.
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
from node.db import Job, Series
from node.labels import LabelView, labels_for
from node.status import STATES, display_state, withheld_jobs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesRow:
    series_id: int
    series_instance_uid: str
    study_instance_uid: str
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
    model_version: str = ""
    turnaround_s: float | None = None
    attempts: int = 0
    label: LabelView | None = None  # ground truth, the series' own or its study's

    @property
    def agrees(self) -> bool | None:
        """Whether the label agrees with the flag (pneumonia-range opacity); None: no label or
        no category to compare."""
        if self.label is None or not self.category:
            return None
        return self.label.pneumonia == self.flagged

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
        return self.state in ("rejected", "reported", "shadow", "delivered", "failed", "complete")


def _row(series: Series, job: Job | None, shadow: bool, label: LabelView | None) -> SeriesRow:
    state, detail = display_state(series, job, shadow)
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
            "model_version": job.model_version,
        }
        if job.delivered_at is not None:
            extra["turnaround_s"] = (job.delivered_at - series.last_received_at).total_seconds()
    return SeriesRow(
        series_id=series.id,
        series_instance_uid=series.series_instance_uid,
        study_instance_uid=series.study_instance_uid,
        study_date=series.study_date,
        series_description=series.series_description,
        modality=series.modality,
        sender=series.calling_ae,
        instances=series.instance_count,
        version=series.version,
        state=state,
        detail=detail,
        last_received_at=series.last_received_at,
        label=label,
        **extra,
    )


def _total_po(verdict: dict[str, Any]) -> float | None:
    """PO of both lungs from a stored verdict (None: not analysed, or an earlier node's)."""
    total = (verdict.get("quantification") or {}).get("total") or {}
    po = total.get("po")
    return None if po is None else float(po)


def recent_series(sessions: sessionmaker[Any], limit: int = 100) -> list[SeriesRow]:
    """The latest series (by last instance received), each with the job of its current version."""
    with sessions() as session:
        rows = session.execute(
            select(Series, Job)
            .outerjoin(Job, (Job.series_id == Series.id) & (Job.series_version == Series.version))
            .order_by(Series.last_received_at.desc())
            .limit(limit)
        ).all()
        shadow = withheld_jobs(session, [job.id for _, job in rows if job is not None])
        labels = labels_for(
            session, [(s.series_instance_uid, s.study_instance_uid) for s, _ in rows]
        )
    return [
        _row(s, job, job is not None and job.id in shadow, labels.get(s.series_instance_uid))
        for s, job in rows
    ]


def one_series(sessions: sessionmaker[Any], series_id: int) -> SeriesRow | None:
    """One series at its current version, as a dashboard row; None if there is no such id."""
    with sessions() as session:
        found = session.execute(
            select(Series, Job)
            .outerjoin(Job, (Job.series_id == Series.id) & (Job.series_version == Series.version))
            .where(Series.id == series_id)
        ).one_or_none()
        if found is None:
            return None
        series, job = found
        shadow = job is not None and bool(withheld_jobs(session, [job.id]))
        label = labels_for(session, [(series.series_instance_uid, series.study_instance_uid)])
    return _row(series, job, shadow, label.get(series.series_instance_uid))


def summary(rows: list[SeriesRow]) -> dict[str, int]:
    """Series per display state, and ``flagged``: those to read first."""
    counts = dict.fromkeys(STATES, 0)
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    counts["flagged"] = sum(row.flagged for row in rows)
    return counts


def row_json(row: SeriesRow) -> dict[str, Any]:
    """A row for ``/api/series``: plain JSON types."""
    label = row.label
    return {
        **{k: v for k, v in row.__dict__.items() if k != "label"},
        "last_received_at": row.last_received_at.isoformat(),
        "label": None
        if label is None
        else {**label.__dict__, "labelled_at": label.labelled_at.isoformat()},
        "agrees": row.agrees,
    }
