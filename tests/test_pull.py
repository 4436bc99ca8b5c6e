"""Pulls against a real Orthanc: C-FIND, then C-GET or C-MOVE, and the catch-up tick."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import func, select, update

from node.config import Settings
from node.db import Instance, Series, SeriesState
from node.pipeline import Context
from node.pull import PullFailed, catch_up, pull_study
from node.receive import start_receiver
from node.service import open_state
from tests.peers import (
    CTMD_NORMAL,
    JPEG_LOSSLESS_SV1,
    TCIA_SIEMENS_B40F,
    TCIA_SIEMENS_B70F,
    Orthanc,
    free_port,
    reidentify_copy,
    require_shared_data,
    series_files,
    storescu,
)

LO = "127.0.0.1"
NODE_AET = "TRIAGE"


@pytest.fixture
def pacs(orthanc_factory: Callable[..., Orthanc]) -> tuple[Orthanc, int]:
    """Orthanc without forwarding that knows the node (AE TRIAGE) at a free port."""
    require_shared_data(TCIA_SIEMENS_B40F, TCIA_SIEMENS_B70F, CTMD_NORMAL)
    node_port = free_port()
    orthanc = orthanc_factory(
        modalities={"SCU": ("STORESCU", LO, free_port()), "NODE": (NODE_AET, LO, node_port)}
    )
    return orthanc, node_port


def _settings(tmp_path: Path, orthanc: Orthanc, node_port: int, retrieve: str = "get") -> Settings:
    raw: dict[str, Any] = {
        "node": {"ae_title": NODE_AET, "port": node_port, "network_timeout_s": 30},
        "security": {"allowed_callers": [{"ae_title": orthanc.aet, "host": LO}]},
        "peers": [
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": LO,
                "port": orthanc.dicom_port,
                "retrieve": retrieve,
            }
        ],
        "results": {"send_to": "pacs"},
        "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.sqlite3"},
        "catch_up": {"enabled": True, "peer": "pacs", "lookback_hours": 24},
    }
    return Settings.model_validate(raw).resolve(tmp_path)


def _copy(src: list[Path], dst: Path, seed: str, **tags: str) -> list[Path]:
    """Real slices with new UIDs (from `seed`) and the given tags overwritten."""
    files = reidentify_copy(src, dst, seed=seed)
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=False)
    return files


def _uids(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _sop_uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}


def _local(settings: Settings) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (series UID, transfer syntax) of every recorded instance."""
    sessions, _ = open_state(settings)
    with sessions() as session:
        rows = session.execute(
            select(
                Instance.sop_instance_uid,
                Series.series_instance_uid,
                Instance.path,
                Instance.transfer_syntax_uid,
            ).join(Series, Series.id == Instance.series_id)
        ).all()
    for _, _, path, _ in rows:
        assert Path(path).is_file(), f"recorded instance {path} not in the spool"
        assert Path(path).is_relative_to(settings.storage.spool_dir)
    return {sop: (series, ts) for sop, series, _, ts in rows}


def test_pull_by_study_uid_c_get_keeps_jpeg_lossless(
    tmp_path: Path, pacs: tuple[Orthanc, int]
) -> None:
    orthanc, node_port = pacs
    files = series_files(CTMD_NORMAL)
    storescu(CTMD_NORMAL, port=orthanc.dicom_port, aec=orthanc.aet)
    study_uid, series_uid = _uids(files[0])
    settings = _settings(tmp_path, orthanc, node_port)

    assert pull_study(settings, study_uid=study_uid) == len(files) == 77

    local = _local(settings)
    assert set(local) == _sop_uids(files)
    assert {series for series, _ in local.values()} == {series_uid}
    assert {ts for _, ts in local.values()} == {JPEG_LOSSLESS_SV1}
    spooled = sorted((settings.storage.spool_dir / study_uid / series_uid).glob("*.dcm"))
    assert len(spooled) == 77
    assert pydicom.dcmread(spooled[0]).file_meta.TransferSyntaxUID == JPEG_LOSSLESS_SV1
    sessions, _ = open_state(settings)
    with sessions() as session:
        series = session.scalars(select(Series)).one()
    assert (series.state, series.instance_count, series.modality) == (
        SeriesState.RECEIVING,
        77,
        "CT",
    )


def test_pull_by_accession_number(tmp_path: Path, pacs: tuple[Orthanc, int]) -> None:
    orthanc, node_port = pacs
    src = series_files(TCIA_SIEMENS_B40F)
    wanted = _copy(src, tmp_path / "a", "acc-a", AccessionNumber="ACC-PULL-A")
    other = _copy(src, tmp_path / "b", "acc-b", AccessionNumber="ACC-PULL-B")
    storescu(wanted + other, port=orthanc.dicom_port, aec=orthanc.aet)
    settings = _settings(tmp_path, orthanc, node_port)

    with pytest.raises(PullFailed, match="has no study with the accession number given"):
        pull_study(settings, accession="ACC-NONE", peer_name="pacs")
    assert pull_study(settings, accession="ACC-PULL-A", peer_name="pacs") == 30

    local = _local(settings)
    assert set(local) == _sop_uids(wanted)
    assert {series for series, _ in local.values()} == {_uids(wanted[0])[1]}


def test_pull_by_c_move_to_running_receiver(tmp_path: Path, pacs: tuple[Orthanc, int]) -> None:
    orthanc, node_port = pacs
    files = series_files(TCIA_SIEMENS_B40F)
    storescu(TCIA_SIEMENS_B40F, port=orthanc.dicom_port, aec=orthanc.aet)
    settings = _settings(tmp_path, orthanc, node_port, retrieve="move")
    sessions, spool = open_state(settings)
    counters: dict[str, int] = {}
    server = start_receiver(settings, spool, sessions, counters)
    try:
        assert pull_study(settings, study_uid=_uids(files[0])[0]) == 30
    finally:
        server.shutdown()

    assert counters["stored"] == 30
    local = _local(settings)
    assert set(local) == _sop_uids(files)
    with sessions() as session:
        assert session.scalars(select(Series.calling_ae)).one() == orthanc.aet


@pytest.fixture
def pull_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level("INFO", logger="node.pull")
    yield caplog


def test_catch_up_pulls_unseen_recent_series_once(
    tmp_path: Path, pacs: tuple[Orthanc, int], pull_logs: pytest.LogCaptureFixture
) -> None:
    orthanc, node_port = pacs
    today = dt.date.today().strftime("%Y%m%d")
    # Same new study (same seed, same source study): a chest series and a topogram, both today.
    chest = _copy(series_files(TCIA_SIEMENS_B40F), tmp_path / "chest", "cu", StudyDate=today)
    scout = _copy(
        series_files(TCIA_SIEMENS_B70F)[:12],
        tmp_path / "scout",
        "cu",
        StudyDate=today,
        SeriesDescription="Topogram  0.6  T20s",
    )
    assert _uids(chest[0])[0] == _uids(scout[0])[0]
    old = series_files(TCIA_SIEMENS_B40F)  # StudyDate 2007: outside the lookback
    storescu(chest + scout + old, port=orthanc.dicom_port, aec=orthanc.aet)
    settings = _settings(tmp_path, orthanc, node_port)
    sessions, spool = open_state(settings)
    ctx = Context(settings=settings, sessions=sessions, spool=spool, model=None)  # type: ignore[arg-type]

    assert catch_up(ctx) == 30
    local = _local(settings)
    assert set(local) == _sop_uids(chest)

    assert catch_up(ctx) == 0  # still receiving: not pulled again
    with sessions.begin() as session:  # the scheduler completes it
        session.execute(update(Series).values(state=SeriesState.COMPLETE))
    assert catch_up(ctx) == 0  # complete with every instance: nothing to pull
    with sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 30
        assert session.scalar(select(Series.instance_count)) == 30
    text = pull_logs.text
    for identifying in ("PatientName", "Lung_Dx", "A0002"):
        assert identifying not in text


def test_catch_up_never_raises_when_peer_down(tmp_path: Path) -> None:
    """Nothing listens: the tick logs it and retrieves nothing (its socket: tests/test_scu.py)."""
    raw = {
        "peers": [{"name": "pacs", "ae_title": "NOBODY", "host": LO, "port": free_port()}],
        "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.sqlite3"},
        "catch_up": {"enabled": True, "peer": "pacs"},
    }
    settings = Settings.model_validate(raw).resolve(tmp_path)
    sessions, spool = open_state(settings)
    ctx = Context(settings=settings, sessions=sessions, spool=spool, model=None)  # type: ignore[arg-type]
    assert catch_up(ctx) == 0
