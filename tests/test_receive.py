"""Ingest over real DICOM: pynetdicom and DCMTK senders into the in-process Storage SCP."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    Verification,
)
from sqlalchemy import func, select

from node.config import Settings
from node.db import Instance, Job, Series, SeriesState
from node.receive import CANNOT_UNDERSTAND, SUCCESS, start_receiver
from node.series_complete import complete_quiet_series
from node.service import open_state
from tests.peers import (
    CTMD_NORMAL,
    TCIA_PHILIPS,
    TCIA_SIEMENS_B40F,
    free_port,
    require_shared_data,
    series_files,
    set_nodelay,
    storescu,
)


def make_settings(tmp_path: Path, port: int, **extra: Any) -> Settings:
    raw: dict[str, Any] = {
        "node": {"ae_title": "TRIAGE", "port": port},
        "security": {
            "allowed_callers": [
                {"ae_title": "STORESCU", "host": "127.0.0.1"},
                {"ae_title": "SCU"},
            ]
        },
        "peers": [],
        "results": {"send_to": None},
        "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.sqlite3"},
        "series_quiet_seconds": 0.5,
    }
    raw.update(extra)
    return Settings.model_validate(raw).resolve(tmp_path)


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions, self.spool = open_state(settings)
        self.counters: dict[str, int] = {}
        self.server = start_receiver(settings, self.spool, self.sessions, self.counters)

    def count(self, model: Any) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)

    def spooled_files(self) -> list[Path]:
        return sorted(
            p for p in self.settings.storage.spool_dir.rglob("*.dcm") if ".results" not in p.parts
        )


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(make_settings(tmp_path, free_port()))
    yield n
    n.server.shutdown()


def scu_send(port: int, datasets: list[pydicom.Dataset], aet: str = "SCU") -> list[int]:
    ae = AE(ae_title=aet)
    for ts in {str(ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(CTImageStorage, ts)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    assert assoc.is_established
    set_nodelay(assoc)
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def test_pynetdicom_scu_stores_real_series_and_completion_queues_one_job(node: Node) -> None:
    require_shared_data(TCIA_PHILIPS)
    files = series_files(TCIA_PHILIPS)
    datasets = [pydicom.dcmread(f) for f in files]
    assert scu_send(node.settings.node.port, datasets) == [SUCCESS] * len(files)
    # the same instances again: acknowledged, counted once
    assert scu_send(node.settings.node.port, datasets[:5]) == [SUCCESS] * 5
    assert node.count(Instance) == len(files)
    assert {p.stem for p in node.spooled_files()} == {str(ds.SOPInstanceUID) for ds in datasets}
    # spooled bytes are the received dataset: Implicit VR kept, pixel data identical
    first = pydicom.dcmread(node.spooled_files()[0])
    source = next(ds for ds in datasets if ds.SOPInstanceUID == first.SOPInstanceUID)
    assert first.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert first.PixelData == source.PixelData

    import time

    time.sleep(0.6)
    queued = complete_quiet_series(node.sessions, 0.5, node.settings.selection)
    assert len(queued) == 1
    assert complete_quiet_series(node.sessions, 0.5, node.settings.selection) == []
    with node.sessions() as s:
        series = s.scalars(select(Series)).one()
        assert (series.state, series.instance_count, series.version) == (
            SeriesState.COMPLETE,
            len(files),
            1,
        )
        assert s.scalar(select(func.count()).select_from(Job)) == 1


def test_late_instance_reopens_series_as_new_version(node: Node) -> None:
    require_shared_data(TCIA_PHILIPS)
    datasets = [pydicom.dcmread(f) for f in series_files(TCIA_PHILIPS)]
    scu_send(node.settings.node.port, datasets[:-1])
    import time

    time.sleep(0.6)
    assert len(complete_quiet_series(node.sessions, 0.5, node.settings.selection)) == 1
    scu_send(node.settings.node.port, datasets[-1:])
    time.sleep(0.6)
    assert len(complete_quiet_series(node.sessions, 0.5, node.settings.selection)) == 1
    with node.sessions() as s:
        assert s.scalars(select(Series.version)).one() == 2
        assert sorted(s.scalars(select(Job.series_version)).all()) == [1, 2]


@pytest.mark.parametrize(
    "folder,name", [(TCIA_SIEMENS_B40F, "siemens-explicit"), (CTMD_NORMAL, "jpeg-lossless")]
)
def test_dcmtk_storescu_real_series(node: Node, folder: Path, name: str) -> None:
    require_shared_data(folder)
    files = series_files(folder)
    storescu(folder, port=node.settings.node.port, aec="TRIAGE", aet="STORESCU")
    assert node.count(Instance) == len(files)
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert {p.stem for p in node.spooled_files()} == expected
    syntax = str(pydicom.dcmread(node.spooled_files()[0]).file_meta.TransferSyntaxUID)
    original = str(pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID)
    assert syntax == original


def test_unknown_calling_ae_is_rejected(node: Node) -> None:
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="TRIAGE")
    assert assoc.is_rejected
    assert node.count(Series) == 0


def test_wrong_called_ae_is_rejected(node: Node) -> None:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="NOT_TRIAGE")
    assert assoc.is_rejected


def test_non_ct_sop_class_refused_at_negotiation(node: Node) -> None:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="TRIAGE")
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assert MRImageStorage not in accepted and Verification in accepted
    assoc.release()


def _send_raw(port: int, ds: pydicom.Dataset, raw: bytes, tmp: Path) -> int:
    """Send ``raw`` (an encoded dataset, maybe broken) as the C-STORE data of ``ds``.

    pynetdicom sends a file path without decoding it, so a broken dataset reaches the SCP as is.
    """
    from pydicom.filewriter import write_file_meta_info

    meta = BytesIO()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path = tmp / "raw.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + raw)
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    assert assoc.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, not a re-encoding
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    return int(status.Status)


def _encode(ds: pydicom.Dataset) -> bytes:
    from pynetdicom.dsutils import encode

    raw = encode(ds, False, True)  # Explicit VR Little Endian, as negotiated
    assert raw is not None
    return raw


@pytest.fixture
def explicit_slice() -> pydicom.Dataset:
    require_shared_data(TCIA_SIEMENS_B40F)
    ds = pydicom.dcmread(series_files(TCIA_SIEMENS_B40F)[0])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_truncated_dataset_gets_failure_status_and_leaves_nothing(
    node: Node, explicit_slice: pydicom.Dataset, tmp_path: Path
) -> None:
    raw = _encode(explicit_slice)
    status = _send_raw(node.settings.node.port, explicit_slice, raw[: len(raw) - 5000], tmp_path)
    assert status == CANNOT_UNDERSTAND
    assert node.spooled_files() == []
    assert list((node.settings.storage.spool_dir / ".tmp").iterdir()) == []
    assert node.count(Instance) == 0
    # the intact dataset afterwards is accepted
    assert _send_raw(node.settings.node.port, explicit_slice, raw, tmp_path) == SUCCESS


@pytest.mark.parametrize(
    "bad_uid", ["../../etc/passwd", "1.2.3/../../x", "1.2..3", "1.2.abc", "9" * 70, ""]
)
def test_malformed_uid_refused(
    node: Node, explicit_slice: pydicom.Dataset, bad_uid: str, tmp_path: Path
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on writing an invalid UI value
        explicit_slice.SeriesInstanceUID = bad_uid
        raw = _encode(explicit_slice)
    status = _send_raw(node.settings.node.port, explicit_slice, raw, tmp_path)
    assert status == CANNOT_UNDERSTAND
    assert node.spooled_files() == []
    assert node.count(Series) == 0


def test_sop_uid_mismatch_refused(
    node: Node, explicit_slice: pydicom.Dataset, tmp_path: Path
) -> None:
    raw = _encode(explicit_slice)
    # the request (built from the file meta) announces another instance than the dataset holds
    explicit_slice.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    assert _send_raw(node.settings.node.port, explicit_slice, raw, tmp_path) == CANNOT_UNDERSTAND
