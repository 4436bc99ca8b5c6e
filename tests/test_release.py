"""Completion on association release, against real peers: Orthanc's series forward, DCMTK storescu
sending one series over two associations, a pynetdicom sender that aborts.

The rule (node/series_complete.py): a normal release completes a series at once only when the
calling peer confirms the instance count by C-FIND and the geometry checks pass; anything else
(no peer to ask, a count that differs, a gap, an abort) is left to the quiet timer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from node.db import Job, Series, SeriesState
from node.series_check import order_and_check, read_headers
from node.series_complete import complete_quiet_series
from tests.peers import (
    TCIA_SIEMENS_B40F,
    Orthanc,
    free_port,
    require_shared_data,
    series_files,
    set_nodelay,
    storescu,
    wait_for,
)
from tests.test_receive import Node, make_settings

LO = "127.0.0.1"
LONG_QUIET_S = 120.0  # longer than any test: a completion seen here came from a release


def by_position(files: list[Path]) -> list[Path]:
    """The slices in order along the body axis (B40f: axial, feet to head by z)."""
    return sorted(
        files,
        key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]),
    )


@pytest.fixture
def slices() -> list[Path]:
    require_shared_data(TCIA_SIEMENS_B40F)
    return by_position(series_files(TCIA_SIEMENS_B40F))


@pytest.fixture
def rig(
    tmp_path: Path, orthanc_factory: Callable[..., Orthanc], request: pytest.FixtureRequest
) -> Iterator[tuple[Node, Orthanc]]:
    """The in-process Storage SCP with Orthanc as its peer "pacs".

    ``@pytest.mark.parametrize("rig", [{"forward": True, "quiet": 2.0}], indirect=True)`` turns on
    Orthanc's shipped Lua series forward to the node and sets the quiet timer.
    """
    options = getattr(request, "param", {})
    port = free_port()
    orthanc = orthanc_factory(
        modalities={"NODE": ("TRIAGE", LO, port), "STORESCU": ("STORESCU", LO, 104)},
        forward_to="NODE" if options.get("forward") else None,
        stable_age=1,
    )
    settings = make_settings(
        tmp_path,
        port,
        security={
            "allowed_callers": [
                {"ae_title": "ORTHANC", "host": LO},
                {"ae_title": "STORESCU", "host": LO},
            ]
        },
        peers=[{"name": "pacs", "ae_title": "ORTHANC", "host": LO, "port": orthanc.dicom_port}],
        series_quiet_seconds=options.get("quiet", LONG_QUIET_S),
    )
    node = Node(settings)
    yield node, orthanc
    node.server.shutdown()


def series_row(node: Node) -> tuple[str, int, int, float | None]:
    """(state, version, instance_count, seconds from last instance to complete) of the series."""
    with node.sessions() as s:
        series = s.scalars(select(Series)).one()
        after: dt.timedelta | None = (
            series.completed_at - series.last_received_at if series.completed_at else None
        )
        return (
            series.state,
            series.version,
            series.instance_count,
            None if after is None else after.total_seconds(),
        )


def job_versions(node: Node) -> list[int]:
    with node.sessions() as s:
        return sorted(s.scalars(select(Job.series_version)).all())


def release_checks(node: Node) -> int:
    return node.counters.get("release_checks", 0)


def quiet_tick(node: Node) -> bool:
    """One tick of the quiet timer; True when it completed something."""
    settings = node.settings
    queued = complete_quiet_series(node.sessions, settings.series_quiet_seconds, settings.selection)
    return bool(queued)


@pytest.mark.parametrize("rig", [{"forward": True}], indirect=True)
def test_orthanc_series_forward_completes_on_release_and_a_late_instance_makes_v2(
    rig: tuple[Node, Orthanc], slices: list[Path]
) -> None:
    node, orthanc = rig
    storescu(slices[:-1], port=orthanc.dicom_port, aec=orthanc.aet)  # the top slice comes later
    wait_for(lambda: release_checks(node) == 1, 30, what="Orthanc's forward, released")
    state, version, count, after = series_row(node)
    assert (state, version, count) == (SeriesState.COMPLETE, 1, len(slices) - 1)
    assert after is not None and after < 5.0  # not the 120 s quiet timer
    assert job_versions(node) == [1]

    # The late slice: Orthanc sees the series change, waits StableAge and forwards all of it again
    # (29 duplicates + 1 new).  The new instance reopens the series as version 2, and that
    # association's release completes version 2 at once (its SR names v1's as predecessor).
    storescu(slices[-1:], port=orthanc.dicom_port, aec=orthanc.aet)
    wait_for(
        lambda: series_row(node)[:2] == (SeriesState.COMPLETE, 2),
        30,
        what="the second forward, completed as version 2",
    )
    state, version, count, after = series_row(node)
    assert count == len(slices) and after is not None and after < 5.0
    assert job_versions(node) == [1, 2]


def test_storescu_one_series_over_two_associations_completes_after_the_second(
    rig: tuple[Node, Orthanc], slices: list[Path]
) -> None:
    """The PACS (AE ORTHANC, as DCMTK storescu) sends one series in two halves.

    The first half alone is a contiguous slab that passes every geometry check: only the count
    the PACS confirms (30, not 15) keeps it from completing.
    """
    node, orthanc = rig
    storescu(slices, port=orthanc.dicom_port, aec=orthanc.aet)  # the PACS holds the whole series
    first, second = slices[:15], slices[15:]
    order_and_check(read_headers(first), require_axial=True, max_gap_factor=1.6)  # passes

    storescu(first, port=node.settings.node.port, aec="TRIAGE", aet="ORTHANC")
    wait_for(lambda: release_checks(node) == 1, 10, what="the first release checked")
    assert series_row(node)[:3] == (SeriesState.RECEIVING, 1, 15)
    assert job_versions(node) == []

    storescu(second, port=node.settings.node.port, aec="TRIAGE", aet="ORTHANC")
    wait_for(lambda: release_checks(node) == 2, 10, what="the second release checked")
    state, version, count, after = series_row(node)
    assert (state, version, count) == (SeriesState.COMPLETE, 1, 30)
    assert after is not None and after < 5.0
    assert job_versions(node) == [1]


@pytest.mark.parametrize("rig", [{"quiet": 1.0}], indirect=True)
def test_storescu_not_a_peer_is_left_to_the_quiet_timer(
    rig: tuple[Node, Orthanc], slices: list[Path]
) -> None:
    """A sender the node cannot ask (a modality, storescu as itself): the quiet timer decides."""
    node, _ = rig
    storescu(slices[:15], port=node.settings.node.port, aec="TRIAGE", aet="STORESCU")
    wait_for(lambda: release_checks(node) == 1, 10, what="the first release checked")
    assert series_row(node)[0] == SeriesState.RECEIVING
    storescu(slices[15:], port=node.settings.node.port, aec="TRIAGE", aet="STORESCU")
    wait_for(lambda: release_checks(node) == 2, 10, what="the second release checked")
    assert series_row(node)[0] == SeriesState.RECEIVING
    wait_for(lambda: quiet_tick(node), 10, what="the quiet timer")
    state, version, count, after = series_row(node)
    assert (state, version, count) == (SeriesState.COMPLETE, 1, 30)
    assert after is not None and after >= 1.0
    assert job_versions(node) == [1]


@pytest.mark.parametrize("rig", [{"quiet": 1.0}], indirect=True)
def test_count_confirmed_but_a_gap_is_left_to_the_quiet_timer(
    rig: tuple[Node, Orthanc], slices: list[Path]
) -> None:
    node, orthanc = rig
    gapped = slices[:10] + slices[11:]
    storescu(gapped, port=orthanc.dicom_port, aec=orthanc.aet)
    storescu(gapped, port=node.settings.node.port, aec="TRIAGE", aet="ORTHANC")
    wait_for(lambda: release_checks(node) == 1, 10, what="the release checked")
    assert series_row(node)[:3] == (SeriesState.RECEIVING, 1, 29)
    wait_for(lambda: quiet_tick(node), 10, what="the quiet timer")
    assert series_row(node)[0] == SeriesState.COMPLETE  # its SR will say "not analysed: gap"


@pytest.mark.parametrize("rig", [{"quiet": 1.0}], indirect=True)
def test_aborted_association_completes_nothing(
    rig: tuple[Node, Orthanc], slices: list[Path]
) -> None:
    node, orthanc = rig
    storescu(slices, port=orthanc.dicom_port, aec=orthanc.aet)
    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate(LO, node.settings.node.port, ae_title="TRIAGE")
    assert assoc.is_established
    set_nodelay(assoc)
    assert [int(assoc.send_c_store(f).Status) for f in slices] == [0] * len(slices)
    assoc.abort()
    assert series_row(node)[:3] == (SeriesState.RECEIVING, 1, 30)
    wait_for(lambda: quiet_tick(node), 10, what="the quiet timer")
    assert series_row(node)[0] == SeriesState.COMPLETE
    assert release_checks(node) == 0


# pynetdicom 3.0.4 leaks the socket of a refused connection (see tests/test_pull.py)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("rig", [{"quiet": 1.0}], indirect=True)
def test_peer_that_cannot_answer_is_left_to_the_quiet_timer(
    rig: tuple[Node, Orthanc], slices: list[Path]
) -> None:
    node, orthanc = rig
    orthanc.kill()  # the PACS is gone by the time the node asks
    storescu(slices, port=node.settings.node.port, aec="TRIAGE", aet="ORTHANC")
    wait_for(lambda: release_checks(node) == 1, 30, what="the release checked")
    assert series_row(node)[:3] == (SeriesState.RECEIVING, 1, 30)
    wait_for(lambda: quiet_tick(node), 10, what="the quiet timer")
    assert series_row(node)[0] == SeriesState.COMPLETE
