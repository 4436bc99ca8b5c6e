"""Pull stage: query a peer (C-FIND) and retrieve series (C-GET, or C-MOVE to our own AE).

Pulled instances take the same path as pushed ones: C-GET binds ``node.receive.handle_store`` to
the retrieving association, and C-MOVE makes the peer send to the running node's Storage SCP.
Either way the instances are spooled and recorded, and the scheduler completes the series.
``catch_up`` is the scheduler's safety net for forwards the PACS dropped while the node was down.
Only UIDs are logged, never patient name, ID or birth date.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom import build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from node.config import Peer, Settings
from node.db import Series, SeriesState
from node.errors import NodeError
from node.receive import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, handle_store
from node.scu import associate
from node.series_complete import selection_failure
from node.spool import Spool

if TYPE_CHECKING:
    from node.pipeline import Context

logger = logging.getLogger(__name__)

# Query/retrieve status codes (PS3.4 C.4)
SUCCESS = 0x0000
PENDING = frozenset({0xFF00, 0xFF01})
SUB_OPERATIONS_WARNING = 0xB000

#: Studies examined per catch-up tick (newest first), so one tick stays short.


class PullFailed(NodeError):
    """A query or retrieve failed (association refused, failure status, sub-operations failed)."""


# --------------------------------------------------------------------------------------------------
# Associations


def _associate(
    settings: Settings, peer: Peer, contexts: list[PresentationContext], **kwargs: Any
) -> AbstractContextManager[Association]:
    """``scu.associate`` with the node's AE title, network timeout and PDU size."""
    return associate(
        peer,
        contexts,
        calling_ae=settings.node.ae_title,
        timeout_s=settings.node.network_timeout_s,
        max_pdu=settings.node.max_pdu_size,
        error=PullFailed,
        **kwargs,
    )


def _status_code(status: Dataset | None) -> int | None:
    if status is None or "Status" not in status:
        return None
    return int(status.Status)


def _find(settings: Settings, peer: Peer, query: Dataset) -> list[Dataset]:
    """Run one Study Root C-FIND and return the matches."""
    matches: list[Dataset] = []
    with _associate(
        settings, peer, [build_context(StudyRootQueryRetrieveInformationModelFind)]
    ) as assoc:
        responses: Iterator[tuple[Dataset, Dataset | None]] = assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        )
        for status, identifier in responses:
            code = _status_code(status)
            if code is None:
                raise PullFailed(f"{peer.name}: no C-FIND response (timeout or abort)")
            if code in PENDING:
                if identifier is not None:
                    matches.append(identifier)
                continue
            if code != SUCCESS:
                raise PullFailed(f"{peer.name}: C-FIND status 0x{code:04X}")
    return matches


# --------------------------------------------------------------------------------------------------
# Queries


def find_studies(
    settings: Settings,
    peer: Peer,
    *,
    study_uid: str | None = None,
    accession: str | None = None,
    modality: str | None = "CT",
    since: dt.date | None = None,
) -> list[Dataset]:
    """C-FIND at STUDY level (Study Root).

    Returns
    -------
    list of Dataset
        With StudyInstanceUID, AccessionNumber, StudyDate, StudyDescription, ModalitiesInStudy.
    """
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid or ""
    query.AccessionNumber = accession or ""
    query.StudyDate = f"{since:%Y%m%d}-" if since is not None else ""
    query.StudyDescription = ""
    query.ModalitiesInStudy = modality or ""
    studies = _find(settings, peer, query)
    logger.info(
        "C-FIND %s: %d stud%s%s",
        peer.name,
        len(studies),
        "y" if len(studies) == 1 else "ies",
        f" for study {study_uid}" if study_uid else "",
    )
    return studies


def find_series(settings: Settings, peer: Peer, study_uid: str) -> list[Dataset]:
    """C-FIND at SERIES level in one study.

    Returns
    -------
    list of Dataset
        With SeriesInstanceUID, Modality, SeriesDescription, BodyPartExamined,
        NumberOfSeriesRelatedInstances.
    """
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.SeriesDescription = ""
    query.BodyPartExamined = ""
    query.NumberOfSeriesRelatedInstances = ""
    return _find(settings, peer, query)


# --------------------------------------------------------------------------------------------------
# Retrieval


def retrieve_series(
    settings: Settings,
    peer: Peer,
    study_uid: str,
    series_uid: str,
    spool: Spool,
    sessions: sessionmaker[Any],
    counters: dict[str, int],
) -> int:
    """Retrieve one series from ``peer`` by C-GET, or by C-MOVE to our AE (``retrieve: move``).

    Returns
    -------
    int
        Instances the peer reports as sent (completed + warning sub-operations).

    Raises
    ------
    PullFailed
        The peer is not configured for retrieval, refused, or any sub-operation failed.
    """
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    if peer.retrieve == "get":
        return _c_get(settings, peer, query, spool, sessions, counters)
    if peer.retrieve == "move":
        return _c_move(settings, peer, query)
    raise PullFailed(f"peer {peer.name} is configured with retrieve: none")


def _c_get(
    settings: Settings,
    peer: Peer,
    query: Dataset,
    spool: Spool,
    sessions: sessionmaker[Any],
    counters: dict[str, int],
) -> int:
    # One context per (SOP class, transfer syntax): the peer then sends each instance as stored
    # (JPEG Lossless stays JPEG Lossless) instead of transcoding to a single accepted syntax.
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)] + [
        build_context(sop_class, syntax)
        for sop_class in STORAGE_SOP_CLASSES
        for syntax in TRANSFER_SYNTAXES
    ]
    roles = [build_role(sop_class, scp_role=True) for sop_class in STORAGE_SOP_CLASSES]
    handlers = [(evt.EVT_C_STORE, handle_store, [spool, sessions, counters])]
    with _associate(settings, peer, contexts, ext_neg=roles, evt_handlers=handlers) as assoc:
        responses = assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
        return _final_count(responses, peer, "C-GET", str(query.SeriesInstanceUID))


def _c_move(settings: Settings, peer: Peer, query: Dataset) -> int:
    contexts = [build_context(StudyRootQueryRetrieveInformationModelMove)]
    with _associate(settings, peer, contexts) as assoc:
        responses = assoc.send_c_move(
            query, settings.node.ae_title, StudyRootQueryRetrieveInformationModelMove
        )
        return _final_count(responses, peer, "C-MOVE", str(query.SeriesInstanceUID))


def _final_count(
    responses: Iterator[tuple[Dataset, Dataset | None]], peer: Peer, op: str, series_uid: str
) -> int:
    """Read C-GET/C-MOVE responses to the final one; return the instances sent."""
    final: Dataset | None = None
    for status, _ in responses:
        code = _status_code(status)
        if code is None:
            raise PullFailed(f"{peer.name}: {op} of series {series_uid}: no response")
        if code not in PENDING:
            final = status
    if final is None:
        raise PullFailed(f"{peer.name}: {op} of series {series_uid}: no final response")
    code = int(final.Status)
    completed = int(final.get("NumberOfCompletedSuboperations", 0) or 0)
    warning = int(final.get("NumberOfWarningSuboperations", 0) or 0)
    failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
    summary = f"{completed} completed, {warning} warning, {failed} failed"
    if code != SUCCESS or failed:
        comment = str(final.get("ErrorComment", "") or "")
        raise PullFailed(
            f"{peer.name}: {op} of series {series_uid}: status 0x{code:04X} ({summary})"
            + (f": {comment}" if comment else "")
        )
    logger.info("%s %s series %s: %s", op, peer.name, series_uid, summary)
    return completed + warning


# --------------------------------------------------------------------------------------------------
# Command line: pull one study


def _retrieving_peer(settings: Settings, peer_name: str | None) -> Peer:
    name = peer_name or settings.results.send_to
    if name is None:
        raise PullFailed("no peer given and results.send_to is not set")
    peer = settings.peer(name)
    if peer.retrieve == "none":
        raise PullFailed(f"peer {peer.name} is configured with retrieve: none")
    return peer


def pull_study(
    settings: Settings,
    *,
    study_uid: str | None = None,
    accession: str | None = None,
    peer_name: str | None = None,
) -> int:
    """Find a study by UID or accession number and retrieve its series of our modalities.

    Completion and analysis are left to the running node's scheduler, which reads the DB rows.

    Returns
    -------
    int
        Number of instances retrieved.

    Raises
    ------
    PullFailed
        No such study, or a query/retrieve failed (after trying every series).
    """
    from node.service import open_state  # service imports this module lazily

    if not study_uid and not accession:
        raise PullFailed("give a study UID or an accession number")
    peer = _retrieving_peer(settings, peer_name)
    studies = find_studies(settings, peer, study_uid=study_uid, accession=accession, modality=None)
    if not studies:
        what = f"study {study_uid}" if study_uid else "study with the accession number given"
        raise PullFailed(f"{peer.name} has no {what}")
    sessions, spool = open_state(settings)
    counters: dict[str, int] = {}
    wanted = {m.upper() for m in settings.selection.modalities}
    retrieved = 0
    errors: list[str] = []
    for study in studies:
        uid = str(study.StudyInstanceUID)
        for series in find_series(settings, peer, uid):
            if str(series.get("Modality", "")).upper() not in wanted:
                continue
            try:
                retrieved += retrieve_series(
                    settings, peer, uid, str(series.SeriesInstanceUID), spool, sessions, counters
                )
            except PullFailed as exc:
                logger.error("%s", exc)
                errors.append(str(exc))
    if errors:
        raise PullFailed(f"{len(errors)} series failed ({retrieved} instances retrieved): {errors}")
    return retrieved


# --------------------------------------------------------------------------------------------------
# Scheduler: catch up on studies the PACS did not forward


def catch_up(ctx: Context, *, max_studies: int | None = None) -> int:
    """Pull recent series of ``catch_up.peer`` that the node has not seen complete.

    Never raises (a scheduler tick): problems are logged and the next tick tries again.

    Returns
    -------
    int
        Number of instances retrieved in this tick.
    """
    settings = ctx.settings
    if max_studies is None:
        max_studies = settings.catch_up.max_studies_per_tick
    try:
        if settings.catch_up.peer is None:
            logger.warning("catch-up: no catch_up.peer configured")
            return 0
        peer = settings.peer(settings.catch_up.peer)
        if peer.retrieve == "none":
            logger.warning("catch-up: peer %s is configured with retrieve: none", peer.name)
            return 0
        since = (dt.datetime.now() - dt.timedelta(hours=settings.catch_up.lookback_hours)).date()
        studies = find_studies(settings, peer, modality="CT", since=since)
    except NodeError as exc:
        logger.warning("catch-up: query failed: %s", exc)
        return 0
    except Exception:
        logger.exception("catch-up: query failed")
        return 0
    studies.sort(key=lambda s: str(s.get("StudyDate", "") or ""), reverse=True)
    retrieved = 0
    for study in studies[:max_studies]:
        retrieved += _catch_up_study(ctx, peer, study)
    if len(studies) > max_studies:
        logger.info("catch-up: %d more studies left for later ticks", len(studies) - max_studies)
    return retrieved


def _catch_up_study(ctx: Context, peer: Peer, study: Dataset) -> int:
    """Retrieve the missing series of one study; never raises."""
    study_uid = str(study.get("StudyInstanceUID", "") or "")
    retrieved = 0
    try:
        for series in find_series(ctx.settings, peer, study_uid):
            series_uid = str(series.get("SeriesInstanceUID", "") or "")
            if not series_uid or not _wanted(ctx, study, series):
                continue
            count = retrieve_series(
                ctx.settings, peer, study_uid, series_uid, ctx.spool, ctx.sessions, {}
            )
            logger.info("catch-up: series %s: %d instances pulled", series_uid, count)
            retrieved += count
    except NodeError as exc:
        logger.warning("catch-up: study %s: %s", study_uid, exc)
    except Exception:
        logger.exception("catch-up: study %s failed", study_uid)
    return retrieved


def _remote_count(series: Dataset) -> int | None:
    try:
        return int(series.get("NumberOfSeriesRelatedInstances", "") or "")
    except (TypeError, ValueError):
        return None


def _wanted(ctx: Context, study: Dataset, series: Dataset) -> bool:
    """Is this remote series ours to analyse and not yet seen complete here?"""
    remote = _remote_count(series)
    candidate = Series(  # transient: only for the selection rules, never added to a session
        modality=str(series.get("Modality", "") or ""),
        study_description=str(study.get("StudyDescription", "") or "")[:64],
        series_description=str(series.get("SeriesDescription", "") or "")[:64],
        body_part=str(series.get("BodyPartExamined", "") or "")[:16],
        image_type="",  # not in C-FIND; checked on arrival
        instance_count=remote if remote is not None else ctx.settings.selection.min_instances,
    )
    series_uid = str(series.SeriesInstanceUID)
    reason = selection_failure(candidate, ctx.settings.selection)
    if reason is not None:
        logger.debug("catch-up: series %s not ours: %s", series_uid, reason)
        return False
    with ctx.sessions() as session:
        local = session.execute(
            select(Series.state, Series.instance_count).where(
                Series.series_instance_uid == series_uid
            )
        ).one_or_none()
    if local is None:
        return True
    state, count = local
    if state == SeriesState.RECEIVING:
        return False  # arriving right now (pushed, or pulled by an earlier tick)
    return remote is not None and count < remote
