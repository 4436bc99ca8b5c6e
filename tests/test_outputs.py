"""node.outputs and the objects it sends, with real tools and real peers.

The TID 1500 SR, the Key Object Selection, the summary Secondary Capture and the Basic Text SR
are built from real CT headers (COVID-CT-MD P001; TCIA Lung_Dx-A0001, whose
ReferencedStudySequence item lacks its SOP Class UID; a header broken on purpose) and checked
with dciodvfy (0 errors) and dsrdump.  The real analysis (P001 and A0001 through
``pipeline.analyse_series``, tiny model) draws the summary image, saved as PNG to
tests/output/screenshots/ (the README's come from tests/test_e2e.py).  Per-destination
profiles are checked against DCMTK storescp: one accepting everything, one refusing
Comprehensive 3D SR (gets the Basic Text SR instead), one refusing Secondary Capture.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from node import outputs
from node.config import Peer, Settings
from node.errors import SendFailed
from node.figures import KeyImage
from node.pipeline import Analysis
from node.report import result_uids, verdict_from_report
from node.sanitise import clean_source
from node.send import store_files
from node.summary import Curves
from node.verdict import SeriesVerdict
from tests.peers import CTMD_COVID, TCIA_PHILIPS, free_port, series_files, wait_for
from tests.test_report import NOT_ANALYSED, make_verdict, slices
from tests.tools import require_tool

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "tests" / "output" / "screenshots"
SOURCES = {"p001": CTMD_COVID, "tcia-a0001": TCIA_PHILIPS}
NAMES = {"p001": "", "tcia-a0001": "Lung_Dx-A0001", "broken": "ANONYMISED"}
PACS = {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": 104}


def headers_of(folder: Path) -> list[Dataset]:
    files = series_files(folder) if folder.exists() else []
    if not files:
        if os.environ.get("CI") == "true":
            pytest.fail(f"real data not available: {folder}")
        pytest.skip(f"real data not available: {folder} (see ../shared/data/README.md)")
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def broken(headers: list[Dataset]) -> list[Dataset]:
    """P001 with the defects real exports have, on every slice (as an export would)."""
    out = []
    for h in headers:
        ds = Dataset()
        ds.update(h)
        ref = Dataset()
        ref.ReferencedSOPInstanceUID = "1.2.3.4"  # no ReferencedSOPClassUID: TCIA A0001's defect
        ok = Dataset()
        ok.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        ok.ReferencedSOPInstanceUID = "1.2.3.5"
        code = Dataset()
        code.CodeValue = "24627-2"
        code.CodingSchemeDesignator = "LN"  # no CodeMeaning
        with pydicom.config.disable_value_validation():
            ds.ReferencedStudySequence = DicomSequence([ref, ok])
            ds.ReferencedPatientSequence = DicomSequence([Dataset()])
            ds.ProcedureCodeSequence = DicomSequence([code])
            ds.StudyDate = "2020-03-05"  # not DA
            ds.PatientSex = "U"  # not M, F or O: highdicom refuses it outright
            ds.PatientAge = "58Y"  # not AS
            ds.InstitutionName = "x" * 80  # LO is 64 at most
            ds.OtherPatientIDsSequence = DicomSequence([Dataset()])
        ds.PatientName = "ANONYMISED"  # one component: highdicom would warn, quoting it
        out.append(ds)
    return out


@pytest.fixture(scope="module")
def sources() -> dict[str, list[Dataset]]:
    p001 = headers_of(CTMD_COVID)
    return {"p001": p001, "tcia-a0001": headers_of(TCIA_PHILIPS), "broken": broken(p001)}


def verdict_for(headers: list[Dataset], case: str) -> SeriesVerdict:
    verdict = make_verdict(headers, **(NOT_ANALYSED if case == "not-analysed" else {}))
    if case != "not-analysed":  # the key slices must be of this series (A0001 has 32 slices)
        verdict = dataclasses.replace(
            verdict,
            key_slices=slices(headers[20:23], (31.4, 22.5, 12.1)),
            top_slices=slices(headers[10:13], (0.93, 0.92, 0.9)),
        )
    return verdict


def synthetic_analysis(verdict: SeriesVerdict, headers: list[Dataset]) -> Analysis:
    """What ``analyse_series(draw=True)`` hands over, with plain drawings (no pixel reading)."""
    rgb = np.zeros((512, 512, 3), np.uint8)
    rgb[100:400, 80:240] = (60, 60, 60)
    keys = tuple(
        KeyImage(i, s.sop_instance_uid, s.z, s.positive_score, rgb)
        for i, s in enumerate(verdict.key_slices, start=1)
    )
    z = [float(h.ImagePositionPatient[2]) for h in headers]
    curves = Curves(
        slice_po=tuple((zi, float(i % 7)) for i, zi in enumerate(z)),
        cnn=tuple((zi, 0.4) for zi in z),
    )
    return Analysis(verdict, headers, keys if verdict.analysed else (), curves)


def settings(**results: Any) -> Settings:
    return Settings.model_validate({"peers": [PACS], "results": {"send_to": "pacs", **results}})


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120
    )
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dsrdump(path: Path) -> str:
    return subprocess.run(
        [require_tool("dsrdump"), "+Pl", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def save_screenshot(pixels: np.ndarray, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    Image.fromarray(pixels).save(path, optimize=True)
    return path


# --- every object valid, whatever the input ---------------------------------------------------


@pytest.mark.parametrize("case", ["typical", "not-analysed"])
@pytest.mark.parametrize("source", ["p001", "tcia-a0001", "broken"])
def test_every_object_is_valid_whatever_the_input(
    source: str, case: str, sources: dict[str, list[Dataset]], tmp_path: Path
) -> None:
    headers = sources[source]
    verdict = verdict_for(headers, case)

    objects = outputs.build_outputs(synthetic_analysis(verdict, headers), settings().results)
    sr_path = outputs.write_outputs(objects, tmp_path)

    expected = ["sr", "summary", "text_sr"]
    if case == "typical":
        expected.insert(1, "kos")
    assert list(objects) == expected
    stored = outputs.stored_objects(sr_path)
    assert [o.kind for o in stored] == expected
    for obj in stored:
        assert dciodvfy_errors(obj.path) == [], f"{obj.kind} of {source}"
        ds = pydicom.dcmread(obj.path)
        assert ds.StudyInstanceUID == headers[0].StudyInstanceUID
        assert str(ds.PatientName or "") == NAMES[source]  # as received, whatever highdicom says
        assert ds.SeriesNumber == 9901 + outputs.SERIES_NUMBER_OFFSETS[obj.kind]
        assert "not a diagnosis" in ds.SeriesDescription
        assert ds.SeriesDate and ds.SeriesTime
        for item in ds.get("ReferencedStudySequence", []):  # copied only when complete
            assert "ReferencedSOPClassUID" in item and "ReferencedSOPInstanceUID" in item
    assert len({pydicom.dcmread(o.path).SeriesInstanceUID for o in stored}) == len(stored)
    for kind in ("sr", "text_sr"):
        dump = dsrdump(next(o.path for o in stored if o.kind == kind))
        assert "not a diagnosis" in dump
        assert ("Typical appearance" if case == "typical" else "Not analysed: 3 slices") in dump


def test_an_object_that_fails_to_build_does_not_cost_the_sr(
    sources: dict[str, list[Dataset]], monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    def broken_drawing(*args: Any, **kwargs: Any) -> None:
        raise ValueError("drawing failed")

    monkeypatch.setattr(outputs, "build_summary", broken_drawing)
    headers = sources["p001"]

    objects = outputs.build_outputs(
        synthetic_analysis(verdict_for(headers, "typical"), headers), settings().results
    )

    assert list(objects) == ["sr", "kos", "text_sr"]
    assert "summary not built" in caplog.text


def test_source_defects_are_dropped_not_copied(sources: dict[str, list[Dataset]]) -> None:
    raw = sources["broken"][0]
    assert "ReferencedSOPClassUID" not in sources["tcia-a0001"][0].ReferencedStudySequence[0]
    before = copy.deepcopy(raw)

    clean = clean_source(raw)
    clean.PatientName = None  # ours to change ...

    assert raw == before  # ... the source is untouched

    assert [i.ReferencedSOPInstanceUID for i in clean.ReferencedStudySequence] == ["1.2.3.5"]
    for keyword in ("ReferencedPatientSequence", "ProcedureCodeSequence", "PatientAge"):
        assert keyword not in clean, keyword
    assert "OtherPatientIDsSequence" not in clean and "InstitutionName" not in clean
    assert clean["StudyDate"].is_empty and clean["PatientSex"].is_empty  # Type 2: kept, empty
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
        assert clean[keyword].value == raw[keyword].value
    tcia = clean_source(sources["tcia-a0001"][0])
    assert "ReferencedStudySequence" not in tcia
    assert tcia.PatientIdentityRemoved == "YES"
    assert len(tcia.DeidentificationMethodCodeSequence) == 8  # valid codes are kept


# --- the real analysis, drawn ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(SOURCES))
def test_real_series_objects_and_summary_image(
    name: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from node.infer import load_model
    from node.pipeline import analyse_series

    folder = SOURCES[name]
    headers_of(folder)
    config = Settings.model_validate(
        {"model_dir": str(tiny_model_dir), "peers": [PACS], "results": {"send_to": "pacs"}}
    )
    analysis = analyse_series(series_files(folder), load_model(tiny_model_dir), config, draw=True)
    verdict = analysis.verdict
    assert verdict.analysed, verdict.reason
    assert len(analysis.key_images) == len(verdict.key_slices) > 0
    assert {k.rgb.shape for k in analysis.key_images} == {(512, 512, 3)}

    objects = outputs.build_outputs(analysis, config.results)
    sr_path = outputs.write_outputs(objects, tmp_path)

    files = {o.kind: o.path for o in outputs.stored_objects(sr_path)}
    assert sorted(files) == ["kos", "sr", "summary", "text_sr"]
    for kind, path in files.items():
        assert dciodvfy_errors(path) == [], kind
    sc = pydicom.dcmread(files["summary"])
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    assert sc.BurnedInAnnotation == "YES" and sc.Columns == 1280 and sc.Rows > 900
    assert [r.ReferencedSOPInstanceUID for r in sc.SourceImageSequence] == [
        s.sop_instance_uid for s in verdict.key_slices
    ]
    assert "PatientName" not in sc.ImageComments
    pixels = sc.pixel_array
    banner = pixels[5:50, 5:400]
    assert (banner[..., 0] > banner[..., 2]).mean() > 0.5, "the red 'not a diagnosis' banner"
    assert (pixels[..., 0] > 200).any() and (pixels[..., 2] > 200).any(), "overlays drawn"
    save_screenshot(pixels, f"summary_{name}")
    kos = pydicom.dcmread(files["kos"])
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    referenced = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in kos.ContentSequence
        if item.ValueType == "IMAGE"
    ]
    assert referenced == [s.sop_instance_uid for s in verdict.key_slices]
    description = next(
        i.TextValue
        for i in kos.ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == "113012"  # Key Object Description
    )
    assert "not a diagnosis" in description and "most opacity" in description
    text = dsrdump(files["text_sr"])
    assert verdict.assessment is not None and verdict.assessment.text in text
    assert verdict_from_report(pydicom.dcmread(sr_path))["category"] == verdict.category


# --- UIDs, folders, profiles -----------------------------------------------------------------


def test_result_uids_per_kind() -> None:
    uids = {kind: result_uids("1.2.3", 1, "1.0", kind) for kind in outputs.KINDS}

    assert uids["sr"] == result_uids("1.2.3", 1, "1.0")  # the SR keeps the UIDs it always had
    assert len({u.series_instance_uid for u in uids.values()}) == len(outputs.KINDS)
    assert len({u.sop_instance_uid for u in uids.values()}) == len(outputs.KINDS)
    again = result_uids("1.2.3", 2, "1.0", "summary")
    assert again.series_instance_uid == uids["summary"].series_instance_uid
    assert again.sop_instance_uid != uids["summary"].sop_instance_uid


def test_rewriting_gives_the_same_files_and_drops_stale_ones(
    sources: dict[str, list[Dataset]], tmp_path: Path
) -> None:
    headers = sources["p001"]
    analysis = synthetic_analysis(verdict_for(headers, "typical"), headers)
    first = outputs.write_outputs(outputs.build_outputs(analysis, settings().results), tmp_path)
    names = sorted(p.name for p in first.parent.iterdir())

    again = outputs.write_outputs(outputs.build_outputs(analysis, settings().results), tmp_path)
    assert again == first and sorted(p.name for p in again.parent.iterdir()) == names
    only_sr = settings(outputs={"pacs": ["sr"]}).results
    outputs.write_outputs(outputs.build_outputs(analysis, only_sr), tmp_path)
    assert [o.kind for o in outputs.stored_objects(first)] == ["sr", "text_sr"]


def test_legacy_flat_sr_is_sent_alone(sources: dict[str, list[Dataset]], tmp_path: Path) -> None:
    from node.report import build_report, write_report

    headers = sources["p001"]
    sr = build_report(verdict_for(headers, "typical"), headers)
    path = tmp_path / f"{sr.SOPInstanceUID}.dcm"
    write_report(sr, path)
    (tmp_path / "unrelated.dcm").write_bytes(path.read_bytes())

    assert [(o.kind, o.path) for o in outputs.stored_objects(path)] == [("sr", path)]


def test_what_is_built_follows_the_destination() -> None:
    assert outputs.kinds_to_build(settings().results) == ("sr", "kos", "summary", "text_sr")
    assert outputs.kinds_to_build(settings(outputs={"pacs": ["summary"]}).results) == (
        "sr",
        "summary",
    )
    assert outputs.kinds_to_build(settings(outputs={"pacs": ["text_sr"]}).results) == (
        "sr",
        "text_sr",
    )
    local = Settings.model_validate({"results": {"send_to": None}}).results
    assert outputs.kinds_to_build(local) == ("sr",)
    outbox = Settings.model_validate({"results": {"send_to": None, "outbox_dir": "/tmp/x"}})
    assert outputs.kinds_to_build(outbox.results) == ("sr", "kos", "summary")


ALL = frozenset(outputs.SOP_CLASSES.values())


def choose(kinds: tuple[str, ...], accepted: frozenset[str], **profile: Any) -> list[str]:
    stored = [outputs.StoredObject(k, Path(f"{k}.dcm"), k) for k in kinds]
    peer = Peer(**PACS)
    results = settings(**profile).results
    picked = outputs.chooser(stored, outputs.profile_for(results, "pacs"), peer)
    return [p.stem for p in picked(accepted)]


@pytest.mark.parametrize(
    ("accepted", "profile", "expected"),
    [
        (ALL, {}, ["sr", "kos", "summary"]),
        (ALL - {outputs.SOP_CLASSES["sr"]}, {}, ["kos", "summary", "text_sr"]),
        (ALL - {outputs.SOP_CLASSES["summary"]}, {}, ["sr", "kos"]),
        (ALL, {"outputs": {"pacs": ["summary", "text_sr"]}}, ["summary", "text_sr"]),
        (
            ALL - {outputs.SOP_CLASSES["sr"]},
            {"outputs": {"pacs": ["sr", "text_sr"]}},
            ["text_sr"],
        ),
    ],
)
def test_the_profile_and_what_the_peer_accepts_choose(
    accepted: frozenset[str], profile: dict[str, Any], expected: list[str]
) -> None:
    assert choose(tuple(outputs.KINDS), accepted, **profile) == expected


def test_a_refused_kind_the_admin_asked_for_fails_with_the_reason() -> None:
    refused = ALL - {outputs.SOP_CLASSES["summary"]}
    with pytest.raises(SendFailed, match=r"refused summary .*results\.outputs\.pacs"):
        choose(tuple(outputs.KINDS), refused, outputs={"pacs": ["sr", "summary"]})
    with pytest.raises(SendFailed, match="accepts none"):
        choose(tuple(outputs.KINDS), frozenset())


def test_no_kos_without_key_slices_is_not_an_error() -> None:
    kinds = ("sr", "summary", "text_sr")
    assert choose(kinds, ALL, outputs={"pacs": ["sr", "kos", "summary"]}) == ["sr", "summary"]


@pytest.mark.parametrize(
    ("outputs_value", "message"),
    [
        ({"pacs": ["srr"]}, "results.outputs.pacs.0"),
        ({"pacs": []}, "at least one"),
        ({"pacs": ["sr", "sr"]}, "twice"),
        ({"archive": ["sr"]}, "not peer"),
    ],
)
def test_profiles_are_validated(outputs_value: dict[str, list[str]], message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        settings(outputs=outputs_value)


# --- real peers: DCMTK storescp with an association profile ---------------------------------

STORESCP_CONFIG = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[Everything]
PresentationContext1 = Comprehensive3DSRStorage\\Uncompressed
PresentationContext2 = BasicTextSRStorage\\Uncompressed
PresentationContext3 = KeyObjectSelectionDocumentStorage\\Uncompressed
PresentationContext4 = SecondaryCaptureImageStorage\\Uncompressed
[NoComprehensive3D]
PresentationContext1 = BasicTextSRStorage\\Uncompressed
PresentationContext2 = KeyObjectSelectionDocumentStorage\\Uncompressed
PresentationContext3 = SecondaryCaptureImageStorage\\Uncompressed
[NoSecondaryCapture]
PresentationContext1 = Comprehensive3DSRStorage\\Uncompressed
PresentationContext2 = BasicTextSRStorage\\Uncompressed
PresentationContext3 = KeyObjectSelectionDocumentStorage\\Uncompressed

[[Profiles]]
[Everything]
PresentationContexts = Everything
[NoComprehensive3D]
PresentationContexts = NoComprehensive3D
[NoSecondaryCapture]
PresentationContexts = NoSecondaryCapture
"""


@dataclasses.dataclass(frozen=True)
class StoreSCP:
    peer: Peer
    received: Path


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[[str], StoreSCP]]:
    """``storescp(profile)``: a DCMTK storescp that negotiates as the profile says."""
    exe = "/usr/bin/storescp" if Path("/usr/bin/storescp").exists() else require_tool("storescp")
    config = tmp_path / "storescp.cfg"
    config.write_text(STORESCP_CONFIG)
    started: list[subprocess.Popen[bytes]] = []

    def start(profile: str) -> StoreSCP:
        port = free_port()
        received = tmp_path / f"received-{profile}"
        received.mkdir()
        args = ["-xf", str(config), profile, "-aet", "STORESCP", "-od", str(received), str(port)]
        proc = subprocess.Popen(
            [exe, *args],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(proc)

        def listening() -> bool:
            assert proc.poll() is None, f"storescp exited with {proc.returncode}"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 10, what="storescp listening")
        peer = Peer(name="pacs", ae_title="STORESCP", host="127.0.0.1", port=port)
        return StoreSCP(peer, received)

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(10)


def send_set(
    sources: dict[str, list[Dataset]], tmp_path: Path, scp: StoreSCP, **profile: Any
) -> tuple[list[str], dict[str, Path]]:
    """Build P001's set, send it as ``deliver`` does; return the kinds sent, files by kind."""
    headers = sources["p001"]
    results = settings(**profile).results
    analysis = synthetic_analysis(verdict_for(headers, "typical"), headers)
    sr_path = outputs.write_outputs(outputs.build_outputs(analysis, results), tmp_path / "built")
    stored = outputs.stored_objects(sr_path)
    kind_of = {o.path: o.kind for o in stored}
    sent = store_files(
        [o.path for o in stored],
        scp.peer,
        "TRIAGE",
        timeout_s=20,
        choose=outputs.chooser(stored, outputs.profile_for(results, "pacs"), scp.peer),
    )
    time.sleep(0.2)  # storescp writes each file as it answers; let the last one land
    received = {}
    for path in scp.received.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        received[outputs.kind_of_sop_class(str(ds.SOPClassUID))] = path
    return [kind_of[p] for p in sent], received


def test_storescp_accepting_everything_gets_the_default_set(
    sources: dict[str, list[Dataset]], tmp_path: Path, storescp: Callable[[str], StoreSCP]
) -> None:
    sent, received = send_set(sources, tmp_path, storescp("Everything"))

    assert sent == ["sr", "kos", "summary"] and sorted(received) == sorted(sent)
    for path in received.values():
        assert dciodvfy_errors(path) == []


def test_storescp_refusing_comprehensive_3d_sr_gets_the_basic_text_sr(
    sources: dict[str, list[Dataset]], tmp_path: Path, storescp: Callable[[str], StoreSCP]
) -> None:
    sent, received = send_set(sources, tmp_path, storescp("NoComprehensive3D"))

    assert sent == ["kos", "summary", "text_sr"] and sorted(received) == sorted(sent)
    for path in received.values():
        assert dciodvfy_errors(path) == []
    dump = dsrdump(received["text_sr"])
    assert "Basic Text SR" in dump and "AI triage aid, not a diagnosis" in dump
    assert "Typical appearance of COVID-19 pneumonia" in dump


def test_storescp_refusing_a_configured_kind_fails_the_delivery(
    sources: dict[str, list[Dataset]], tmp_path: Path, storescp: Callable[[str], StoreSCP]
) -> None:
    scp = storescp("NoSecondaryCapture")
    with pytest.raises(SendFailed, match="refused summary"):
        send_set(sources, tmp_path, scp, outputs={"pacs": ["sr", "summary"]})
    assert list(scp.received.iterdir()) == []  # nothing of the set was sent
    sent, received = send_set(sources, tmp_path, scp)  # the default profile leaves it out
    assert sent == ["sr", "kos"] and sorted(received) == ["kos", "sr"]
