"""Completion stage: a series quiet for ``series_quiet_seconds`` is complete.

Complete series pass the selection rules (is this a chest CT for us?) and get exactly one job per
series version, or are recorded as ``rejected: <rule>: <value>``.  All state is in the database,
so timers resume after a restart.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from node.config import SelectionSettings
from node.db import Series, SeriesState, utcnow
from node.jobs import enqueue

logger = logging.getLogger(__name__)


def selection_failure(series: Series, rules: SelectionSettings) -> str | None:
    """Return why ``series`` is not ours to analyse, or None when it is."""
    if series.modality.upper() not in {m.upper() for m in rules.modalities}:
        return f"modality: {series.modality!r} not in {rules.modalities}"
    image_types = {t.strip().upper() for t in series.image_type.split("\\") if t.strip()}
    excluded = image_types & {t.upper() for t in rules.exclude_image_types}
    if excluded:
        return f"image type: {sorted(excluded)} is excluded"
    if re.search(rules.exclude_series_pattern, series.series_description):
        return (
            f"series description: {series.series_description!r} matches "
            f"exclude_series_pattern {rules.exclude_series_pattern!r}"
        )
    descriptions = [series.study_description, series.series_description, series.body_part]
    present = [d for d in descriptions if d]
    if present:
        if not any(re.search(rules.description_pattern, d) for d in present):
            return (
                f"descriptions: none of {present} matches description_pattern "
                f"{rules.description_pattern!r}"
            )
    elif not rules.accept_missing_descriptions:
        return "descriptions: study/series description and body part are all empty"
    if series.instance_count < rules.min_instances:
        return f"instance count: {series.instance_count} < min_instances {rules.min_instances}"
    return None


def complete_quiet_series(
    sessions: sessionmaker[Any], quiet_seconds: float, rules: SelectionSettings
) -> list[int]:
    """Complete every series quiet for ``quiet_seconds``; return the ids of the jobs queued."""
    cutoff = utcnow() - dt.timedelta(seconds=quiet_seconds)
    queued: list[int] = []
    with sessions.begin() as session:
        candidates = session.scalars(
            select(Series).where(
                Series.state == SeriesState.RECEIVING, Series.last_received_at <= cutoff
            )
        ).all()
        for series in candidates:
            series.completed_at = utcnow()
            reason = selection_failure(series, rules)
            if reason is not None:
                series.state = SeriesState.REJECTED
                series.reject_reason = reason
                logger.info(
                    "series %s v%d complete (%d instances), rejected: %s",
                    series.series_instance_uid,
                    series.version,
                    series.instance_count,
                    reason,
                )
                continue
            series.state = SeriesState.COMPLETE
            job = enqueue(session, series)
            queued.append(job.id)
            logger.info(
                "series %s v%d complete (%d instances), job %d queued",
                series.series_instance_uid,
                series.version,
                series.instance_count,
                job.id,
            )
    return queued
