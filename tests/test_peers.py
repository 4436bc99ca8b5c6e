"""The peer helpers (tests/peers.py) against the real tools: Orthanc 1.10, DCMTK, pynetdicom."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES, StoragePresentationContexts
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.peers import (
    CTMD_NORMAL,
    JPEG_LOSSLESS,
    JPEG_LOSSLESS_SV1,
    TCIA_PHILIPS,
    TCIA_SIEMENS_B40F,
    TCIA_SIEMENS_B70F,
    Orthanc,
    dcmtk_env,
    free_port,
    reidentify_copy,
    require_shared_data,
    series_files,
    set_nodelay,
    storescu,
    wait_for,
)
from tests.tools import require_tool

LO = "127.0.0.1"


def _echoscu(aet: str, orthanc: Orthanc) -> subprocess.CompletedProcess[str]:
    exe = require_tool("echoscu")
    return subprocess.run(
        [exe, "-aet", aet, "-aec", orthanc.aet, "-to", "10", LO, str(orthanc.dicom_port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_echo_registered_accepted_unregistered_refused(
    orthanc_factory: Callable[..., Orthanc],
) -> None:
    orthanc = orthanc_factory(modalities={"SCU": ("STORESCU", LO, free_port())})
    assert orthanc.get("/system")["DicomAet"] == "ORTHANC"

    ok = _echoscu("STORESCU", orthanc)
    assert ok.returncode == 0, ok.stderr

    refused = _echoscu("INTRUDER", orthanc)
    assert refused.returncode != 0
    assert "Rejected" in refused.stderr


def test_storescu_uncompressed_and_jpeg_lossless(orthanc_factory: Callable[..., Orthanc]) -> None:
    require_shared_data(TCIA_SIEMENS_B40F, CTMD_NORMAL)
    orthanc = orthanc_factory(modalities={"SCU": ("STORESCU", LO, free_port())})

    for folder in (TCIA_SIEMENS_B40F, CTMD_NORMAL):
        files = series_files(folder)
        storescu(folder, port=orthanc.dicom_port, aec="ORTHANC")
        series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        sid = orthanc.find_series(series_uid)
        assert sid is not None, f"{folder.name} not in Orthanc"
        instances = orthanc.get(f"/series/{sid}/instances")
        expected = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
        assert {i["MainDicomTags"]["SOPInstanceUID"] for i in instances} == expected

    assert len(series_files(TCIA_SIEMENS_B40F)) == 30
    assert len(series_files(CTMD_NORMAL)) == 77
    sid = orthanc.find_series(
        pydicom.dcmread(series_files(CTMD_NORMAL)[0], stop_before_pixels=True).SeriesInstanceUID
    )
    one = orthanc.get(f"/series/{sid}")["Instances"][0]
    assert orthanc.get_text(f"/instances/{one}/metadata/TransferSyntax") == JPEG_LOSSLESS_SV1
    assert orthanc.get_text(f"/instances/{one}/metadata/RemoteAET") == "STORESCU"


def _basic_text_sr(study_uid: str, path: Path) -> str:
    """A minimal Basic Text SR in `study_uid` (what the node sends back), written to `path`."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["peers-test-sr", study_uid])
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["peers-test-sr-series", study_uid])
    ds.Modality = "SR"
    ds.PatientID = "TEST"
    ds.PatientName = "Test^SR"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SeriesInstanceUID)


def test_lua_forwards_stable_series_with_loop_guard(
    orthanc_factory: Callable[..., Orthanc], tmp_path: Path
) -> None:
    require_shared_data(TCIA_SIEMENS_B40F, TCIA_SIEMENS_B70F)
    received: list[str] = []
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        with lock:
            received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="NODE")
    for cx in StoragePresentationContexts:
        ae.add_supported_context(
            cx.abstract_syntax, [*DEFAULT_TRANSFER_SYNTAXES, JPEG_LOSSLESS_SV1, JPEG_LOSSLESS]
        )
    node_port = free_port()
    scp = ae.start_server((LO, node_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        orthanc = orthanc_factory(
            modalities={"NODE": ("NODE", LO, node_port), "SCU": ("STORESCU", LO, free_port())},
            forward_to="NODE",
            stable_age=2,
        )
        b40f = series_files(TCIA_SIEMENS_B40F)
        expected = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in b40f}
        storescu(TCIA_SIEMENS_B40F, port=orthanc.dicom_port, aec="ORTHANC")

        def all_arrived() -> bool:
            with lock:
                return set(received) == expected

        wait_for(all_arrived, timeout=30, what="30 B40f slices forwarded to NODE")

        # Loop guard: a new series sent by the NODE AE and an SR series are not forwarded.
        study_uid = pydicom.dcmread(b40f[0], stop_before_pixels=True).StudyInstanceUID
        from_node = reidentify_copy(
            series_files(TCIA_SIEMENS_B70F)[:5],
            tmp_path / "from_node",
            study_uid=study_uid,
            seed="loop-guard",
        )
        storescu(from_node, port=orthanc.dicom_port, aec="ORTHANC", aet="NODE")
        sr_series = _basic_text_sr(study_uid, tmp_path / "sr.dcm")
        storescu(tmp_path / "sr.dcm", port=orthanc.dicom_port, aec="ORTHANC")
        node_series = pydicom.dcmread(from_node[0], stop_before_pixels=True).SeriesInstanceUID
        assert orthanc.find_series(node_series) is not None
        assert orthanc.find_series(sr_series) is not None

        def both_stable() -> bool:
            return all(
                orthanc.get(f"/series/{orthanc.find_series(uid)}")["IsStable"]
                for uid in (node_series, sr_series)
            )

        wait_for(both_stable, timeout=20, what="NODE and SR series stable in Orthanc")
        wait_for(
            lambda: "loop guard" in orthanc.log_text() and "forward: skip SR" in orthanc.log_text(),
            timeout=10,
            what="Lua skipping the NODE and SR series",
        )
        assert len(orthanc.get("/jobs")) == 1  # only the B40f forward
        with lock:
            assert set(received) == expected
    finally:
        scp.shutdown()


def test_restart_keeps_storage_and_pynetdicom_scu(
    orthanc_factory: Callable[..., Orthanc], tmp_path: Path
) -> None:
    require_shared_data(TCIA_PHILIPS)
    orthanc = orthanc_factory(modalities={"SCU": ("PYSCU", LO, free_port())})
    files = reidentify_copy(series_files(TCIA_PHILIPS)[:8], tmp_path / "philips", seed=4)
    again = reidentify_copy(series_files(TCIA_PHILIPS)[:2], tmp_path / "again", seed=4)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files[:2]]
    assert uids == [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in again]
    original = pydicom.dcmread(series_files(TCIA_PHILIPS)[0], stop_before_pixels=True)
    assert uids[0] != original.SOPInstanceUID

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(LO, orthanc.dicom_port, ae_title="ORTHANC")
    assert assoc.is_established
    try:
        set_nodelay(assoc)
        for f in files:
            status = assoc.send_c_store(pydicom.dcmread(f))
            assert status.Status == 0x0000
    finally:
        assoc.release()

    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    before = {t["SOPInstanceUID"] for t in orthanc.instances_in_study(study_uid)}
    assert len(before) == 8

    orthanc.stop()
    assert orthanc.proc is None
    orthanc.start()
    after = {t["SOPInstanceUID"] for t in orthanc.instances_in_study(study_uid)}
    assert after == before
