"""report.py: the triage SR built from real CT headers, checked with dciodvfy and dsrdump."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset

from node.report import (
    PredecessorRef,
    build_report,
    result_uids,
    verdict_from_report,
    write_report,
)
from node.verdict import AlgorithmInfo, SeriesVerdict, SliceScore
from tests.tools import require_tool

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SERIES_DIR = DATA / "ct_dicom" / "covid_ct_md" / "COVID" / "P001"
ALGORITHM = AlgorithmInfo(name="covid-b0", version="1.2.0", sha256="ab" * 32)


@pytest.fixture(scope="module")
def headers() -> list[Dataset]:
    files = sorted(SERIES_DIR.glob("*.dcm"))
    if not files:
        pytest.skip(f"no CT series at {SERIES_DIR} (the shared COVID-CT-MD data is not here)")
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def make_verdict(headers: list[Dataset], **changes: Any) -> SeriesVerdict:
    top = tuple(
        SliceScore(h.SOPInstanceUID, h.SOPClassUID, float(h.ImagePositionPatient[2]), (), 0.9)
        for h in headers[10:13]
    )
    verdict = SeriesVerdict(
        study_instance_uid=headers[0].StudyInstanceUID,
        series_instance_uid=headers[0].SeriesInstanceUID,
        series_version=1,
        algorithm=ALGORITHM,
        analysed=True,
        classes=("COVID-19", "non-COVID"),
        finding="COVID-19",
        probabilities=(0.8731, 0.1269),
        series_score=0.91,
        rule="top_k_mean k=5 ≥ 0.5",
        slices_total=len(headers),
        slices_analysed=len(headers) - 14,
        top_slices=top,
    )
    return dataclasses.replace(verdict, **changes)


NEGATIVE = {"finding": "non-COVID", "probabilities": (0.12, 0.88), "series_score": 0.2}
THREE_CLASS = {
    "classes": ("COVID-19", "Normal", "Pneumonia"),
    "finding": "Pneumonia",
    "probabilities": (0.2, 0.1, 0.7),
}
NOT_ANALYSED = {
    "analysed": False,
    "finding": None,
    "probabilities": (),
    "series_score": None,
    "slices_analysed": 0,
    "top_slices": (),
    "reason": "3 slices, at least 5 needed (≥ 5 axial slices)",
}
CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "positive": ({}, ["COVID-19", "Present"]),
    "negative": (NEGATIVE, ["Not COVID-19", "Absent"]),
    "three-class": (THREE_CLASS, ["Pneumonia", "Absent"]),
    "not-analysed": (NOT_ANALYSED, ["Not evaluated", "Undetermined", "Not analysed: 3 slices"]),
}


def expected_readback(verdict: SeriesVerdict) -> dict[str, Any]:
    return {
        "analysed": verdict.analysed,
        "finding": verdict.finding,
        "probabilities": dict(zip(verdict.classes, verdict.probabilities, strict=False)),
        "slices_analysed": verdict.slices_analysed if verdict.analysed else None,
        "slices_total": verdict.slices_total,
        "series_score": verdict.series_score,
        "reason": verdict.reason,
        "top_slice_uids": [s.sop_instance_uid for s in verdict.top_slices],
        "model": {"name": ALGORITHM.name, "version": ALGORITHM.version, "sha256": ALGORITHM.sha256},
    }


def check_with_tools(path: Path, expected_texts: list[str]) -> None:
    """dciodvfy finds no error; dsrdump shows the finding and the disclaimer."""
    result = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False
    )
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert not errors, output
    dump = subprocess.run(
        [require_tool("dsrdump"), "+Pl", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for text in [*expected_texts, "not a diagnosis"]:
        assert text in dump, dump


@pytest.mark.parametrize("case", list(CASES))
def test_report_validates_and_reads_back(case: str, headers: list[Dataset], tmp_path: Path) -> None:
    changes, texts = CASES[case]
    verdict = make_verdict(headers, **changes)
    path = tmp_path / "sr.dcm"

    write_report(build_report(verdict, headers, institution_name="Test Hospital"), path)

    check_with_tools(path, texts)
    ds = pydicom.dcmread(path)
    readback = verdict_from_report(ds)
    assert readback.pop("covid_19") == texts[1]
    assert readback == expected_readback(verdict)
    assert ds.StudyInstanceUID == headers[0].StudyInstanceUID
    assert ds.PatientID == headers[0].PatientID
    assert ds.SeriesInstanceUID != headers[0].SeriesInstanceUID
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.CompletionFlag == "COMPLETE"
    assert ds.SeriesNumber == 9901
    assert list(tmp_path.iterdir()) == [path]


def test_result_uids_are_derived_from_the_input() -> None:
    first = result_uids("1.2.3", 1, "1.0")

    assert result_uids("1.2.3", 1, "1.0") == first
    assert result_uids("1.2.3", 2, "1.0").sop_instance_uid != first.sop_instance_uid
    assert result_uids("1.2.3", 1, "1.1").sop_instance_uid != first.sop_instance_uid
    assert result_uids("1.2.4", 1, "1.0").sop_instance_uid != first.sop_instance_uid
    assert result_uids("1.2.3", 2, "1.1").series_instance_uid == first.series_instance_uid
    assert result_uids("1.2.4", 1, "1.0").series_instance_uid != first.series_instance_uid
    assert first.sop_instance_uid.startswith("2.25.")
    assert len(first.sop_instance_uid) <= 64


def test_rebuilding_gives_the_same_uids(headers: list[Dataset]) -> None:
    verdict = make_verdict(headers)

    first, again = build_report(verdict, headers), build_report(verdict, headers)

    assert again.SOPInstanceUID == first.SOPInstanceUID
    assert again.SeriesInstanceUID == first.SeriesInstanceUID
    newer = build_report(dataclasses.replace(verdict, series_version=2), headers)
    assert newer.SOPInstanceUID != first.SOPInstanceUID


def test_new_version_links_its_predecessor(headers: list[Dataset], tmp_path: Path) -> None:
    old = build_report(make_verdict(headers), headers)
    predecessor = PredecessorRef(
        sop_instance_uid=old.SOPInstanceUID,
        sop_class_uid=old.SOPClassUID,
        series_instance_uid=old.SeriesInstanceUID,
        study_instance_uid=old.StudyInstanceUID,
    )
    path = tmp_path / "sr-v2.dcm"

    write_report(
        build_report(
            make_verdict(headers, series_version=2, **NEGATIVE), headers, predecessor=predecessor
        ),
        path,
    )

    check_with_tools(path, ["Not COVID-19"])
    ds = pydicom.dcmread(path)
    study = ds.PredecessorDocumentsSequence[0]
    assert study.StudyInstanceUID == old.StudyInstanceUID
    series = study.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == old.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert ds.SOPInstanceUID != old.SOPInstanceUID
    assert verdict_from_report(ds)["finding"] == "non-COVID"


def test_unknown_class_is_refused(headers: list[Dataset]) -> None:
    verdict = make_verdict(headers, classes=("COVID-19", "CAP"), finding="CAP")

    with pytest.raises(ValueError, match="'CAP' has no SR code"):
        build_report(verdict, headers)


def test_evidence_from_another_study_is_refused(headers: list[Dataset]) -> None:
    verdict = make_verdict(headers, study_instance_uid="1.2.3.4")

    with pytest.raises(ValueError, match="StudyInstanceUID"):
        build_report(verdict, headers)


def test_model_notice_is_in_the_report(headers: list[Dataset], tmp_path: Path) -> None:
    """A model's own caveat (model.json ``notice``) reaches the radiologist in every SR."""
    notice = "not validated on Hounsfield CT (test notice)"
    algorithm = AlgorithmInfo(ALGORITHM.name, ALGORITHM.version, ALGORITHM.sha256, notice)
    verdict = make_verdict(headers, algorithm=algorithm)
    path = tmp_path / "sr.dcm"
    write_report(build_report(verdict, headers), path)
    check_with_tools(path, ["Model notice: not validated on Hounsfield CT"])
    without = make_verdict(headers)
    assert "Model notice" not in str(build_report(without, headers).ContentSequence)
