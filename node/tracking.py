"""Tracking stage: one row per series, one per instance, recorded as instances arrive.

A duplicate SOP Instance is counted once.  A new instance arriving for a series that was already
complete reopens it as a new version (the old version's job and SR stay as they were).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.db import Instance, Series, SeriesState, utcnow

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceHeader:
    """What the node keeps of a received instance: UIDs and descriptive, non-identifying tags."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    study_date: str = ""
    study_description: str = ""
    series_description: str = ""
    body_part: str = ""
    image_type: str = ""


@dataclass(frozen=True)
class Recorded:
    series_id: int
    duplicate: bool
    reopened: bool
    version: int


def record_instance(
    sessions: sessionmaker[Any],
    header: InstanceHeader,
    path: str,
    size: int,
    calling_ae: str,
    calling_host: str,
) -> Recorded:
    """Record one spooled instance; safe against concurrent associations for one series."""
    for attempt in range(3):
        try:
            with sessions.begin() as session:
                return _record(session, header, path, size, calling_ae, calling_host)
        except IntegrityError:
            # Another association inserted the same series or instance first: re-read it.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _record(
    session: Session,
    header: InstanceHeader,
    path: str,
    size: int,
    calling_ae: str,
    calling_host: str,
) -> Recorded:
    now = utcnow()
    series = session.scalars(
        select(Series).where(Series.series_instance_uid == header.series_instance_uid)
    ).one_or_none()
    if series is None:
        series = Series(
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            modality=header.modality,
            study_date=header.study_date,
            study_description=header.study_description,
            series_description=header.series_description,
            body_part=header.body_part,
            image_type=header.image_type,
            calling_ae=calling_ae,
            calling_host=calling_host,
            instance_count=0,
            version=1,
            state=SeriesState.RECEIVING,
            first_received_at=now,
            last_received_at=now,
        )
        session.add(series)
        session.flush()
    existing = session.scalars(
        select(Instance.id).where(Instance.sop_instance_uid == header.sop_instance_uid)
    ).first()
    if existing is not None:
        return Recorded(series.id, duplicate=True, reopened=False, version=series.version)
    reopened = False
    if series.state != SeriesState.RECEIVING:
        series.version += 1
        series.state = SeriesState.RECEIVING
        series.reject_reason = ""
        series.completed_at = None
        reopened = True
        logger.info(
            "series %s reopened as version %d by a new instance",
            series.series_instance_uid,
            series.version,
        )
    session.add(
        Instance(
            series_id=series.id,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            path=path,
            size=size,
            received_at=now,
        )
    )
    series.instance_count += 1
    series.last_received_at = now
    return Recorded(series.id, duplicate=False, reopened=reopened, version=series.version)


def restart_quiet_timers(sessions: sessionmaker[Any]) -> int:
    """At start-up: series still receiving restart their quiet period now.

    While the node was down nobody could send to it, so the time it was down must not count as
    quiet: otherwise a sender resending after the restart would split the series into versions.
    """
    from sqlalchemy import update

    with sessions.begin() as session:
        result = session.execute(
            update(Series)
            .where(Series.state == SeriesState.RECEIVING)
            .values(last_received_at=utcnow())
        )
        count = int(result.rowcount or 0)  # type: ignore[attr-defined]
    if count:
        logger.info("%d series still receiving: quiet timers restarted", count)
    return count
