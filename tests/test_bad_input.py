"""Bad input against the real node process: a corpus built here from real slices.

Every object gets a DICOM failure status, a recorded rejection with the reason, or a "not
analysed" SR in the PACS; the node never crashes and a good series sent in between is analysed.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComprehensiveSRStorage,
    CTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from tests.faultkit import (
    ENHANCED_CT,
    Rig,
    db_query,
    jobs,
    leftovers,
    recorded_sops,
    send_files,
    spooled_sops,
    sr_in_study,
)
from tests.nodeproc import NodeProcess, node_config
from tests.peers import (
    CTMD_NORMAL,
    TCIA_SIEMENS_B40F,
    TCIA_SIEMENS_B70F,
    free_port,
    require_shared_data,
    series_files,
    start_orthanc,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.slow

CANNOT_UNDERSTAND = 0xC210
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
SOURCE_SLICES = slice(10, 16)  # six chest slices with lung in them

# PHI written into the corpus with odd character sets: none of it may reach logs or the database.
PHI_NAMES = ["Müller^Jörg", "Ōtani^Shōhei", "山田^太郎"]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Rig]:
    require_shared_data(TCIA_SIEMENS_B40F, TCIA_SIEMENS_B70F, CTMD_NORMAL)
    workdir = tmp_path_factory.mktemp("bad-input")
    port = free_port()
    orthanc = start_orthanc(workdir / "pacs", modalities={"NODE": ("TRIAGE", "127.0.0.1", port)})
    config = node_config(
        workdir / "node",
        port=port,
        model_dir=tiny_model_dir,
        pacs_port=orthanc.dicom_port,
        quiet_s=1.0,
        extra={
            "selection": {"min_instances": 1},  # single objects reach the analysis checks too
            "security": {"allowed_callers": [{"ae_title": a} for a in ("STORESCU", "ECHO", "SCU")]},
        },
    )
    node = NodeProcess(config, port).start()
    try:
        yield Rig(workdir / "node", node, orthanc)
    finally:
        node.stop()
        orthanc.cleanup()


# --------------------------------------------------------------------------------------------------
# Building the corpus


def source_datasets() -> list[Dataset]:
    return [pydicom.dcmread(f) for f in series_files(TCIA_SIEMENS_B40F)[SOURCE_SLICES]]


def new_series(datasets: list[Dataset], seed: str) -> list[Dataset]:
    """Give the datasets a new study and series (deterministic from ``seed``), new SOP UIDs."""
    study = generate_uid(entropy_srcs=[seed, "study"])
    series = generate_uid(entropy_srcs=[seed, "series"])
    for i, ds in enumerate(datasets):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "sop", str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return datasets


def save(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:03d}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the corpus is invalid on purpose
            ds.save_as(path, enforce_file_format=False)
        paths.append(path)
    return paths


def save_raw(ds: Dataset, dataset_bytes: bytes, path: Path, ts: str = EXPLICIT) -> Path:
    """A file whose meta announces ``ds``'s SOP class/instance and ``ts``, followed by bytes."""
    meta = BytesIO()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + dataset_bytes)
    return path


def encoded(ds: Dataset, implicit: bool = False) -> bytes:
    from pynetdicom.dsutils import encode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = encode(ds, implicit, True)
    assert raw is not None
    return raw


def one(seed: str) -> Dataset:
    return new_series(source_datasets()[:1], seed)[0]


# -- refused at ingest (raw bytes, so the broken object reaches the node as built) ---------------


def truncated(tmp: Path) -> list[Path]:
    ds = one("truncated")
    raw = encoded(ds)
    return [save_raw(ds, raw[: len(raw) // 2], tmp / "0.dcm")]


def garbage_bytes(tmp: Path) -> list[Path]:
    ds = one("garbage")
    return [save_raw(ds, os.urandom(20000), tmp / "0.dcm")]


def garbage_after_header(tmp: Path) -> list[Path]:
    ds = one("garbage-tail")
    raw = encoded(ds)
    return [save_raw(ds, raw[:3000] + os.urandom(5000), tmp / "0.dcm")]


def no_pixel_data(tmp: Path) -> list[Path]:
    ds = one("no-pixels")
    del ds.PixelData
    return [save_raw(ds, encoded(ds), tmp / "0.dcm")]


def traversal_series_uid(tmp: Path) -> list[Path]:
    ds = one("traversal")
    ds.SeriesInstanceUID = "1.2.3/../../../../tmp/evil"
    return [save_raw(ds, encoded(ds), tmp / "0.dcm")]


def traversal_study_uid(tmp: Path) -> list[Path]:
    ds = one("traversal-study")
    ds.StudyInstanceUID = "../.."
    return [save_raw(ds, encoded(ds), tmp / "0.dcm")]


def malformed_uid(tmp: Path) -> list[Path]:
    ds = one("malformed")
    ds.StudyInstanceUID = "1.2.840.abc..7" + "9" * 70
    return [save_raw(ds, encoded(ds), tmp / "0.dcm")]


def huge_dimensions(tmp: Path) -> list[Path]:
    ds = one("huge")
    ds.Rows = ds.Columns = 65535  # 8 GiB claimed, 512 KiB sent
    return [save_raw(ds, encoded(ds), tmp / "0.dcm")]


def implicit_bytes_announced_explicit(tmp: Path) -> list[Path]:
    ds = one("wrong-ts")
    return [save_raw(ds, encoded(ds, implicit=True), tmp / "0.dcm", ts=EXPLICIT)]


def secondary_capture_in_ct_context(tmp: Path) -> list[Path]:
    """A dataset claiming Secondary Capture, announced (file meta, request) as CT."""
    ds = one("sc-as-ct")
    raw_ds = copy.deepcopy(ds)
    raw_ds.SOPClassUID = SecondaryCaptureImageStorage
    path = save_raw(ds, encoded(raw_ds), tmp / "0.dcm")
    return [path]


# -- accepted, then rejected by the selection rules or analysed as "not analysed" ---------------


def ct_object_of_modality_mr(tmp: Path) -> list[Path]:
    datasets = new_series(source_datasets(), "modality-mr")
    for ds in datasets:
        ds.Modality = "MR"
    return save(datasets, tmp)


def missing_rescale(tmp: Path) -> list[Path]:
    datasets = new_series(source_datasets(), "no-rescale")
    for ds in datasets:
        del ds.RescaleSlope
        del ds.RescaleIntercept
    return save(datasets, tmp)


def sagittal_reformat(tmp: Path) -> list[Path]:
    datasets = new_series(source_datasets(), "sagittal")
    for i, ds in enumerate(datasets):
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-100.0 + 5 * i, -200.0, 100.0]
    return save(datasets, tmp)


def mixed_orientations(tmp: Path) -> list[Path]:
    datasets = new_series(source_datasets(), "mixed-orientation")
    for ds in datasets[::2]:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9848078, -0.1736482]  # 10 degrees gantry tilt
    return save(datasets, tmp)


def mixed_thickness(tmp: Path) -> list[Path]:
    datasets = new_series(source_datasets(), "mixed-thickness")
    for ds in datasets[::2]:
        ds.SliceThickness = 1.0
    return save(datasets, tmp)


def unreadable_geometry(tmp: Path) -> list[Path]:
    datasets = new_series(source_datasets(), "bad-geometry")
    for ds in datasets:  # as LO, so that pydicom writes what no DS parser accepts
        ds.add_new(0x00200037, "LO", ["a", "b", "c", "d", "e", "f"])
    return save(datasets, tmp)


def huge_dimensions_compressed(tmp: Path) -> list[Path]:
    """JPEG Lossless slices claiming 65535 x 65535: the encapsulated data cannot be checked
    against the claim at ingest, so the series check must refuse before decoding (8 GiB)."""
    datasets = [pydicom.dcmread(f) for f in series_files(CTMD_NORMAL)[30:33]]
    for ds in new_series(datasets, "huge-jpeg"):
        ds.Rows = ds.Columns = 65535
    return save(datasets, tmp)


def enhanced_ct_multiframe(tmp: Path) -> list[Path]:
    """Six real slices as the frames of one Enhanced CT object (frame data only, not a full
    Enhanced CT IOD: what matters here is what the node does with a multi-frame CT)."""
    frames = source_datasets()
    ds = new_series([frames[0].copy()], "enhanced")[0]
    ds.SOPClassUID = ENHANCED_CT
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.NumberOfFrames = len(frames)
    ds.PixelData = b"".join(f.PixelData for f in frames)
    return save([ds], tmp)


def charset(name: str, character_set: str | list[str], description: str, patient: str) -> Callable:
    def build(tmp: Path) -> list[Path]:
        datasets = new_series(source_datasets(), f"charset-{name}")
        for ds in datasets:
            ds.SpecificCharacterSet = character_set
            ds.SeriesDescription = description
            ds.StudyDescription = description
            ds.PatientName = patient
        return save(datasets, tmp)

    build.__name__ = f"charset_{name}"
    return build


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], list[Path]]
    raw: bool = False
    outcome: str = "refused"  # refused | rejected | not analysed | analysed
    reason: str = ""  # a fragment of the recorded reason
    description: str = ""  # what the database must hold as the decoded series description

    @property
    def id(self) -> str:
        return self.build.__name__


CASES = [
    Case(truncated, raw=True),
    Case(garbage_bytes, raw=True),
    Case(garbage_after_header, raw=True),
    Case(no_pixel_data, raw=True),
    Case(traversal_series_uid, raw=True),
    Case(traversal_study_uid, raw=True),
    Case(malformed_uid, raw=True),
    Case(huge_dimensions, raw=True),
    Case(implicit_bytes_announced_explicit, raw=True),
    Case(secondary_capture_in_ct_context, raw=True),
    Case(ct_object_of_modality_mr, outcome="rejected", reason="modality"),
    Case(missing_rescale, outcome="not analysed", reason="Rescale Slope/Intercept"),
    Case(sagittal_reformat, outcome="not analysed", reason="sagittal, not axial"),
    Case(mixed_orientations, outcome="not analysed", reason="different orientations"),
    Case(mixed_thickness, outcome="not analysed", reason="different thicknesses"),
    Case(
        unreadable_geometry,
        outcome="not analysed",
        reason="ImageOrientationPatient is not numeric",
    ),
    Case(enhanced_ct_multiframe, outcome="not analysed", reason="Enhanced CT"),
    Case(huge_dimensions_compressed, outcome="not analysed", reason="outside 1..4096"),
    Case(
        charset("latin1", "ISO_IR 100", "Tórax Simple", PHI_NAMES[0]),
        outcome="analysed",
        description="Tórax Simple",
    ),
    Case(
        charset("utf8", "ISO_IR 192", "Tórax Simple – 胸部 CT", PHI_NAMES[1]),  # noqa: RUF001
        outcome="analysed",
        description="Tórax Simple – 胸部 CT",  # noqa: RUF001
    ),
    Case(
        charset("iso2022", ["", "ISO 2022 IR 87"], "Chest 胸部単純CT", PHI_NAMES[2]),
        outcome="analysed",
        description="Chest 胸部単純CT",
    ),
]


def series_of(files: list[Path]) -> tuple[str, str]:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(rig: Rig, case: Case, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we write
        files = case.build(tmp_path / case.id)
    before = recorded_sops(rig.db)
    if case.raw:
        sent = send_files(rig.port, files, raw=True, contexts=[(CTImageStorage, EXPLICIT)])
    else:
        sent = send_files(rig.port, files)
    assert sent.established
    statuses = list(sent.statuses.values())
    if case.outcome == "refused":
        assert statuses == [CANNOT_UNDERSTAND] * len(files), [hex(s or 0) for s in statuses]
        assert recorded_sops(rig.db) == before
        assert spooled_sops(rig.spool) == recorded_sops(rig.db)
        assert leftovers(rig.spool) == []
        assert not list(Path("/tmp/evil").parent.glob("evil*"))
        return
    assert statuses == [0] * len(files), [hex(s or 0) for s in statuses]
    study_uid, series_uid = series_of(files)

    def series_row() -> tuple[str, str, str]:
        rows = db_query(
            rig.db,
            "SELECT state, reject_reason, series_description FROM series "
            "WHERE series_instance_uid = ?",
            [series_uid],
        )
        return rows[0] if rows else ("", "", "")

    if case.outcome == "rejected":
        wait_for(lambda: series_row()[0] == "rejected", 30, what="the rejection")
        assert case.reason in series_row()[1]
        return
    wait_for(
        lambda: any(j[1] == series_uid and j[3] in ("done", "failed") for j in jobs(rig.db)),
        60,
        interval=0.3,
        what=f"the job of {case.id} finished (log {rig.node.log})",
    )
    job = db_query(
        rig.db,
        "SELECT j.state, j.analysed, j.verdict_json, j.last_error FROM jobs j "
        "JOIN series s ON s.id = j.series_id WHERE s.series_instance_uid = ?",
        [series_uid],
    )
    assert len(job) == 1 and job[0][0] == "done", job
    assert bool(job[0][1]) == (case.outcome == "analysed"), job[0][2]
    assert case.reason in job[0][2], job[0][2]
    if case.description:
        assert series_row()[2] == case.description
    assert rig.orthanc is not None
    assert len(sr_in_study(rig.orthanc, study_uid)) == 1


def test_other_sop_classes_refused_at_negotiation(rig: Rig) -> None:
    ae = AE(ae_title="SCU")
    for sop_class in (MRImageStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        ae.add_requested_context(sop_class)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", rig.port, ae_title="TRIAGE")
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {Verification}


def test_unknown_transfer_syntaxes_refused_at_negotiation(rig: Rig) -> None:
    """Only transfer syntaxes the node can decode are accepted; a CT context proposing only a
    private or unsupported one is refused, so no undecodable instance is ever acknowledged."""
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.110", "1.2.3.4.5.6.7"])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", rig.port, ae_title="TRIAGE")
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {Verification}


def test_after_the_corpus_a_good_series_is_analysed_and_nothing_leaked(
    rig: Rig, tmp_path: Path
) -> None:
    """Runs last in this module: the node is alive, a real series still goes through, no job
    failed, and no patient name of the corpus is in the node's log or database."""
    files = series_files(TCIA_SIEMENS_B70F)
    storescu(files, port=rig.port, aec="TRIAGE", aet="STORESCU")
    study_uid, series_uid = series_of(files)
    wait_for(
        lambda: any(j[1] == series_uid and j[3] == "done" for j in jobs(rig.db)),
        90,
        interval=0.5,
        what="the good series analysed",
    )
    assert rig.orthanc is not None
    assert len(sr_in_study(rig.orthanc, study_uid)) == 1
    assert rig.node.echo()
    assert [j for j in jobs(rig.db) if j[3] == "failed"] == []
    log = rig.node.log_text()
    assert "Traceback" not in log, log[-3000:]
    written = log.encode() + b"".join(
        p.read_bytes() for p in rig.workdir.glob("node.sqlite3*") if p.is_file()
    )
    for name in PHI_NAMES:
        for part in name.split("^"):
            for encoding in ("utf-8", "latin-1", "iso2022_jp"):
                try:
                    needle = part.encode(encoding)
                except UnicodeEncodeError:
                    continue
                assert needle not in written, f"{part!r} ({encoding}) found in log or database"
