"""Tracking stage: one row per series, one per instance, recorded as instances arrive.

A duplicate SOP Instance is counted once.  A new instance arriving for a series that was already
complete reopens it as a new version (the old version's job and SR stay as they were).  Safe for
concurrent associations on SQLite and PostgreSQL: the series row is locked (PostgreSQL) and its
count and version change by single UPDATEs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
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
    # FOR UPDATE: on PostgreSQL, associations recording instances of one series at once take
    # turns on its row (count, version, reopening); SQLite has one writer at a time anyway.
    series = session.scalars(
        select(Series)
        .where(Series.series_instance_uid == header.series_instance_uid)
        .with_for_update()
    ).one_or_none()
    if series is None:
        series = Series(
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            modality=_fit("modality", header.modality),
            study_date=_fit("study_date", header.study_date),
            study_description=_fit("study_description", header.study_description),
            series_description=_fit("series_description", header.series_description),
            body_part=_fit("body_part", header.body_part),
            image_type=_fit("image_type", header.image_type),
            calling_ae=_fit("calling_ae", calling_ae),
            calling_host=_fit("calling_host", calling_host),
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
    # Both changes of the series row are single UPDATEs computed by the database, not a value
    # read earlier: concurrent associations for one series (SQLite reads outside the write
    # transaction) would otherwise lose counts or reopen it twice.
    reopened = (
        session.execute(
            update(Series)
            .where(Series.id == series.id, Series.state != SeriesState.RECEIVING)
            .values(
                version=Series.version + 1,
                state=SeriesState.RECEIVING,
                reject_reason="",
                completed_at=None,
            )
        ).rowcount  # type: ignore[attr-defined]
        == 1
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
    version = session.execute(
        update(Series)
        .where(Series.id == series.id)
        .values(instance_count=Series.instance_count + 1, last_received_at=now)
        .returning(Series.version)
    ).scalar_one()
    if reopened:
        logger.info(
            "series %s reopened as version %d by a new instance",
            series.series_instance_uid,
            version,
        )
    return Recorded(series.id, duplicate=False, reopened=reopened, version=version)


def _fit(column: str, value: str) -> str:
    """``value`` cut to the declared length of ``series.<column>``: PostgreSQL enforces
    VARCHAR(n) (an over-long Modality would fail the C-STORE), SQLite does not."""
    length = getattr(Series.__table__.c[column].type, "length", None)
    return value[:length] if length else value


def restart_quiet_timers(sessions: sessionmaker[Any]) -> int:
    """At a receiver's start-up: series still receiving restart their quiet period now.

    While the node was down nobody could send to it, so the time it was down must not count as
    quiet: otherwise a sender resending after the restart would split the series into versions.
    """
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
