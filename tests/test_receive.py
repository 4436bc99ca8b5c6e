"""Ingest over real DICOM: pynetdicom and DCMTK senders into the in-process Storage SCP."""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    Verification,
)
from sqlalchemy import event, func, select

from node.config import Settings
from node.db import Instance, Job, Series, SeriesState
from node.errors import InvalidInstance
from node.receive import (
    CANNOT_UNDERSTAND,
    SUCCESS,
    PollPacer,
    file_meta_prefix,
    parse_instance,
    skip_unlogged_pynetdicom_handlers,
    start_receiver,
)
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
    wait_for,
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


def _as_file(ds: pydicom.Dataset, transfer_syntax: str) -> bytes:
    """``ds`` as received (preamble, file meta, dataset) in ``transfer_syntax``."""
    ds = ds.copy()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buf = BytesIO()
    if transfer_syntax == "1.2.840.10008.1.2.2":  # pydicom converts to big endian only forced
        dcmwrite(buf, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    else:
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    "transfer_syntax",
    [
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    ],
)
def test_pixel_data_length_is_checked_in_every_native_syntax(
    explicit_slice: pydicom.Dataset, transfer_syntax: str
) -> None:
    """parse_instance reads the header only; the Pixel Data length comes from its element."""
    data = _as_file(explicit_slice, transfer_syntax)
    uids = (str(explicit_slice.SOPClassUID), str(explicit_slice.SOPInstanceUID))
    header = parse_instance(data, *uids)
    assert header.transfer_syntax_uid == transfer_syntax
    assert header.series_instance_uid == explicit_slice.SeriesInstanceUID
    assert header.image_type == "\\".join(explicit_slice.ImageType)
    with pytest.raises(InvalidInstance, match=r"truncated|cannot be parsed"):
        parse_instance(data[:-100], *uids)


def test_elements_after_pixel_data_accepted_and_no_pixel_data_refused(
    explicit_slice: pydicom.Dataset,
) -> None:
    uids = (str(explicit_slice.SOPClassUID), str(explicit_slice.SOPInstanceUID))
    padded = explicit_slice.copy()
    padded.add_new(0xFFFCFFFC, "OB", b"\0" * 64)  # Data Set Trailing Padding
    data = _as_file(padded, "1.2.840.10008.1.2.1")
    assert parse_instance(data, *uids).sop_instance_uid == uids[1]
    without = explicit_slice.copy()
    del without.PixelData
    with pytest.raises(InvalidInstance, match="no Pixel Data"):
        parse_instance(_as_file(without, "1.2.840.10008.1.2.1"), *uids)


def test_file_and_row_are_on_disk_before_the_sender_hears_success(
    node: Node, explicit_slice: pydicom.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The durability order of a store: the temp file written O_DSYNC (on disk when the write
    returns), its rename into the series folder, that folder's fsync, the row's commit (SQLite
    synchronous=FULL), and only then the status reaches the sender.  Power cuts cannot be
    tested here; this order is what makes an acknowledged instance survive one (kill -9:
    tests/test_faults.py)."""
    events: list[str] = []
    real_write, real_fsync, real_replace = os.write, os.fsync, os.replace

    def write(fd: int, data: Any) -> int:
        written = real_write(fd, data)
        durable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DSYNC
        if stat.S_ISREG(os.fstat(fd).st_mode) and durable and events[-1:] != ["durable write"]:
            events.append("durable write")
        return written

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        if str(dst).endswith(".dcm"):
            events.append("rename")

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    event.listen(node.sessions, "after_commit", lambda session: events.append("commit"))
    assert scu_send(node.settings.node.port, [explicit_slice]) == [SUCCESS]
    events.append("status received")
    assert events[:5] == ["durable write", "rename", "fsync folder", "commit", "status received"]
    with node.sessions() as s:
        assert s.connection().exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    assert [p.stem for p in node.spooled_files()] == [explicit_slice.SOPInstanceUID]
    assert list((node.settings.storage.spool_dir / ".tmp").iterdir()) == []


def test_poll_pacer_polls_fast_while_busy_then_falls_back() -> None:
    class Dul:
        _run_loop_delay = PollPacer.DEFAULT_POLL_S

    class Assoc:
        dul = Dul()

    assoc = Assoc()
    pacer = PollPacer(idle_after_s=0.2)
    pacer.busy(assoc)  # type: ignore[arg-type]
    assert assoc.dul._run_loop_delay == PollPacer.FAST_POLL_S
    wait_for(
        lambda: assoc.dul._run_loop_delay == PollPacer.DEFAULT_POLL_S,
        5,
        what="the default poll after 0.2 s idle",
    )


@pytest.mark.parametrize(
    "sop_instance_uid",
    ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"],
)
def test_file_meta_prefix_is_what_pynetdicom_writes(sop_instance_uid: str) -> None:
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    meta = create_file_meta(
        sop_class_uid=UID(CTImageStorage),
        sop_instance_uid=UID(sop_instance_uid),
        transfer_syntax=UID("1.2.840.10008.1.2.1"),
    )
    expected = b"\0" * 128 + b"DICM" + encode_file_meta(meta)
    prefix = file_meta_prefix(CTImageStorage, sop_instance_uid, "1.2.840.10008.1.2.1")
    assert prefix == expected
    read = pydicom.dcmread(BytesIO(prefix), force=True).file_meta
    assert read.MediaStorageSOPInstanceUID == sop_instance_uid


def test_pynetdicom_log_handlers_only_where_their_lines_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = logging.getLogger("pynetdicom")
    level = log.level
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")
    try:
        log.setLevel(logging.INFO)  # --debug
        skip_unlogged_pynetdicom_handlers()
        assert _config.LOG_HANDLER_LEVEL == "standard"
        log.setLevel(logging.WARNING)  # as node/cli.py sets it by default
        skip_unlogged_pynetdicom_handlers()
        assert _config.LOG_HANDLER_LEVEL == "none"
    finally:
        log.setLevel(level)
