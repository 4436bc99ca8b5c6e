"""Completion stage: when is a series complete?  On release (confirmed) or when quiet.

DICOM has no "end of series" message, so the node decides.  Two ways, whichever comes first:

1. **On release, confirmed by the sender** (``complete_on_release``): the association that carried
   instances of the series was released normally (an abort leaves it to the timer), the calling
   AE title and host are a configured peer, that peer answers a C-FIND with exactly as many
   instances in the series as the node holds (``NumberOfSeriesRelatedInstances``), and the series
   passes the geometry checks of ``node/series_check.py`` (one orientation, one size, no gaps, no
   shared positions).  This is the PACS forward: Orthanc's ``OnStableSeries`` sends a stable
   series in one association and can say how many instances it has.
2. **Quiet** (``complete_quiet_series``): nothing arrived for ``series_quiet_seconds``.  Everything
   else: modalities and ``storescu`` (they cannot be asked), counts that differ, gaps, aborts.

Why not the geometry alone: the first of two associations that split a series is often a
contiguous slab (the first 15 of 30 slices pass every check), and completing it would analyse
half a chest and make the rest a second version.  Nor "the lungs are covered": 4 of the 6 whole
chest series in ../shared/data have lung in their lowest slice, so it would rarely fire, and it
costs a lung segmentation per release.

Complete series pass the selection rules (is this a chest CT for us?) and get exactly one job per
series version, or are recorded as ``rejected: <rule>: <value>``.  All state is in the database,
so timers resume after a restart.  A later instance reopens the series as a new version
(``node/tracking.py``), whichever way it was completed.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import Peer, SelectionSettings, Settings
from node.db import Instance, Series, SeriesState, utcnow
from node.errors import NodeError, SeriesRejected
from node.jobs import enqueue
from node.series_check import order_and_check, read_headers

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


def _complete(session: Session, series: Series, rules: SelectionSettings, how: str) -> int | None:
    """Mark ``series`` complete now: queue its job (returned) or record why it is not ours."""
    series.completed_at = utcnow()
    reason = selection_failure(series, rules)
    if reason is not None:
        series.state = SeriesState.REJECTED
        series.reject_reason = reason
        logger.info(
            "series %s v%d complete %s (%d instances), rejected: %s",
            series.series_instance_uid,
            series.version,
            how,
            series.instance_count,
            reason,
        )
        return None
    series.state = SeriesState.COMPLETE
    job = enqueue(session, series)
    logger.info(
        "series %s v%d complete %s (%d instances), job %d queued",
        series.series_instance_uid,
        series.version,
        how,
        series.instance_count,
        job.id,
    )
    return job.id


def complete_quiet_series(
    sessions: sessionmaker[Any], quiet_seconds: float, rules: SelectionSettings
) -> list[int]:
    """Complete every series quiet for ``quiet_seconds``; return the ids of the jobs queued."""
    cutoff = utcnow() - dt.timedelta(seconds=quiet_seconds)
    queued: list[int] = []
    with sessions.begin() as session:
        # locked (PostgreSQL; SQLite's writer lock serialises anyway) so that an instance
        # recorded right now waits and then opens a new version, instead of landing in the
        # version being completed; SKIP LOCKED: a series being recorded is quiet no longer
        candidates = session.scalars(
            select(Series)
            .where(Series.state == SeriesState.RECEIVING, Series.last_received_at <= cutoff)
            .with_for_update(skip_locked=True)
        ).all()
        for series in candidates:
            job_id = _complete(session, series, rules, f"after {quiet_seconds:g} s quiet")
            if job_id is not None:
                queued.append(job_id)
    return queued


# --------------------------------------------------------------------------------------------------
# Completion on release


@dataclass(frozen=True)
class Caller:
    """Who sent an association: the calling AE title and the remote address."""

    ae_title: str
    host: str


@dataclass(frozen=True)
class _Snapshot:
    series_id: int
    study_instance_uid: str
    version: int
    instance_count: int
    paths: list[Path]


class ReleaseChecks:
    """Runs ``complete_on_release`` for released associations, one at a time, in a daemon thread.

    Not in the association's thread: pynetdicom counts a live association thread towards
    ``max_associations``, and a peer slow to answer the C-FIND would hold it.  Checks still
    queued when the process stops are dropped: the quiet timer completes those series.
    ``counters["release_checks"]`` counts the releases checked.
    """

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Any], counters: dict[str, int]
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._counters = counters
        self._queue: queue.SimpleQueue[tuple[set[str], Caller]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, series_instance_uids: set[str], caller: Caller) -> None:
        """Check these series (carried by one association ``caller`` released) soon."""
        self._queue.put((series_instance_uids, caller))
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="release-checks", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            series_instance_uids, caller = self._queue.get()
            for uid in sorted(series_instance_uids):
                try:
                    complete_on_release(self._sessions, self._settings, uid, caller)
                except Exception:  # a thread of its own: log, and the quiet timer decides
                    logger.exception("series %s: completion on release failed", uid)
            self._counters["release_checks"] = self._counters.get("release_checks", 0) + 1


def complete_on_release(
    sessions: sessionmaker[Any], settings: Settings, series_instance_uid: str, caller: Caller
) -> int | None:
    """Complete a series at once after ``caller`` released an association that carried it.

    Only when the caller is a configured peer that confirms the instance count (C-FIND) and the
    series passes the geometry checks; otherwise nothing changes and the quiet timer decides.

    Returns
    -------
    int or None
        The id of the job queued; None when the series stays receiving (or was rejected by the
        selection rules, or something else completed or changed it meanwhile).
    """
    uid = series_instance_uid
    peer = sending_peer(settings, caller)
    if peer is None:
        logger.debug("series %s: %s is not a peer to ask; the quiet timer decides", uid, caller)
        return None
    snapshot = _snapshot(sessions, uid)
    if snapshot is None:
        return None
    remote = count_at_peer(settings, peer, snapshot.study_instance_uid, uid)
    if remote != snapshot.instance_count:
        logger.info(
            "series %s: %d instances here, %s at %s: not complete on release; the quiet timer "
            "decides",
            uid,
            snapshot.instance_count,
            "unknown" if remote is None else remote,
            peer.name,
        )
        return None
    try:
        order_and_check(
            read_headers(snapshot.paths),
            require_axial=settings.analysis.require_axial,
            max_gap_factor=settings.analysis.max_gap_factor,
        )
    except SeriesRejected as exc:
        logger.info("series %s: not complete on release (%s); the quiet timer decides", uid, exc)
        return None
    return _complete_if_unchanged(
        sessions,
        settings.selection,
        snapshot,
        f"on release by {caller.ae_title}, count confirmed by {peer.name}",
    )


def _snapshot(sessions: sessionmaker[Any], series_instance_uid: str) -> _Snapshot | None:
    """The receiving series and its spooled files, or None when it is not receiving."""
    with sessions() as session:
        series = session.scalars(
            select(Series).where(
                Series.series_instance_uid == series_instance_uid,
                Series.state == SeriesState.RECEIVING,
            )
        ).one_or_none()
        if series is None:
            return None
        paths = session.scalars(
            select(Instance.path).where(Instance.series_id == series.id, Instance.purged == 0)
        ).all()
        return _Snapshot(
            series.id,
            series.study_instance_uid,
            series.version,
            series.instance_count,
            [Path(p) for p in paths],
        )


def _complete_if_unchanged(
    sessions: sessionmaker[Any], rules: SelectionSettings, snapshot: _Snapshot, how: str
) -> int | None:
    """Complete the series only if it is still the version and count that were checked.

    The conditional UPDATE comes first, so it takes the write lock and decides atomically: an
    instance recorded meanwhile (count or version changed) or the quiet timer (state) wins.
    """
    with sessions.begin() as session:
        claimed = session.execute(
            update(Series)
            .where(
                Series.id == snapshot.series_id,
                Series.state == SeriesState.RECEIVING,
                Series.version == snapshot.version,
                Series.instance_count == snapshot.instance_count,
            )
            .values(completed_at=utcnow())
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return None
        series = session.get(Series, snapshot.series_id)
        assert series is not None
        return _complete(session, series, rules, how)


def sending_peer(settings: Settings, caller: Caller) -> Peer | None:
    """The configured peer that is ``caller`` (same AE title, host resolving to its address)."""
    for peer in settings.peers:
        if peer.ae_title == caller.ae_title and caller.host in _addresses(peer.host):
            return peer
    return None


def _addresses(host: str) -> set[str]:
    try:
        return {host} | {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return {host}


def count_at_peer(
    settings: Settings, peer: Peer, study_instance_uid: str, series_instance_uid: str
) -> int | None:
    """How many instances ``peer`` holds in the series (C-FIND), or None if it cannot say."""
    from node.pull import _remote_count, find_series  # pull imports this module

    try:
        matches = find_series(settings, peer, study_instance_uid)
    except NodeError as exc:
        logger.info("series %s: C-FIND at %s failed: %s", series_instance_uid, peer.name, exc)
        return None
    for match in matches:
        if str(match.get("SeriesInstanceUID", "")) == series_instance_uid:
            return _remote_count(match)
    return None
