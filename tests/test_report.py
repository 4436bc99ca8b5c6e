"""report.py: the triage SR built from real CT headers, checked with dciodvfy and dsrdump."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from highdicom.sr import Comprehensive3DSR, MeasurementReport, MeasurementsAndQualitativeEvaluations
from highdicom.sr.utils import find_content_items
from pydicom import Dataset

from node.assess import LIKELIHOOD, Assessment
from node.opacity import BANDS, SIDES, ZONES, Quantification, Region
from node.report import (
    SLICES_ANALYSED,
    SLICES_IN_SERIES,
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
ANALYSIS_VERSION = "lungs 1, opacity 1, assessment 1"


@pytest.fixture(scope="module")
def headers() -> list[Dataset]:
    files = sorted(SERIES_DIR.glob("*.dcm"))
    if not files:
        pytest.skip(f"no CT series at {SERIES_DIR} (the shared COVID-CT-MD data is not here)")
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def region(volume_ml: float, po: float, pho: float) -> Region:
    """A region of ``volume_ml`` with ``po`` % opacity, ``pho`` % of it high opacity."""
    return Region(volume_ml, volume_ml * po / 100, volume_ml * pho / 100)


def make_quantification(scale: float = 1.0) -> Quantification:
    """Bilateral, lower and peripheral predominant opacity, ``scale`` times the default burden."""
    zone_po = {"upper": 2.0, "middle": 6.5, "lower": 14.25}
    band_po = {"peripheral": 11.5, "central": 3.125}
    zones = {
        s: {z: region(900.0 + 10 * i, scale * zone_po[z] * (1 + i), scale * 0.4) for z in ZONES}
        for i, s in enumerate(SIDES)
    }
    bands = {
        s: {b: region(1350.0 + 15 * i, scale * band_po[b] * (1 + i), scale * 0.3) for b in BANDS}
        for i, s in enumerate(SIDES)
    }
    lungs = {
        s: region(2700.0 + 30 * i, scale * (7.0 + i), scale * 0.4) for i, s in enumerate(SIDES)
    }
    return Quantification(
        total=region(5430.0, scale * 7.5, scale * 0.4),
        lungs=lungs,
        zones=zones,
        bands=bands,
        focality=0.3,
        extent_mm=280.0,
    )


def make_assessment(category: str, reasons: tuple[str, ...]) -> Assessment:
    return Assessment(
        category=category,
        pneumonia=category != "negative",
        covid_likelihood=LIKELIHOOD[category],
        bilateral=True,
        peripheral_ratio=3.7,
        lower_ratio=7.1,
        ground_glass_share=0.9,
        focality=0.3,
        reasons=reasons,
    )


def slices(headers: list[Dataset], scores: tuple[float, ...]) -> tuple[SliceScore, ...]:
    return tuple(
        SliceScore(h.SOPInstanceUID, h.SOPClassUID, float(h.ImagePositionPatient[2]), (), score)
        for h, score in zip(headers, scores, strict=False)
    )


def make_verdict(headers: list[Dataset], **changes: Any) -> SeriesVerdict:
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
        top_slices=slices(headers[10:13], (0.93, 0.92, 0.9)),
        quantification=make_quantification(),
        assessment=make_assessment(
            "typical", ("PO 7.5% (threshold 0.5%)", "bilateral, peripheral/central 3.7")
        ),
        analysis_version=ANALYSIS_VERSION,
        key_slices=slices(headers[40:43], (31.416, 22.5, 12.125)),
        coverage=("sparse slices every 5.0 mm: small opacities between slices are missed",),
    )
    return dataclasses.replace(verdict, **changes)


NEGATIVE = {
    "finding": "non-COVID",
    "probabilities": (0.12, 0.88),
    "series_score": 0.2,
    "quantification": make_quantification(0.01),
    "assessment": make_assessment("negative", ("PO 0.1% (threshold 0.5%)",)),
    "coverage": (),
}
THREE_CLASS = {
    "classes": ("COVID-19", "Normal", "Pneumonia"),
    "finding": "Pneumonia",
    "probabilities": (0.2, 0.1, 0.7),
    "assessment": make_assessment("atypical", ("unilateral, consolidation",)),
}
NOT_ANALYSED = {
    "analysed": False,
    "finding": None,
    "probabilities": (),
    "series_score": None,
    "slices_analysed": 0,
    "top_slices": (),
    "quantification": None,
    "assessment": None,
    "analysis_version": "",
    "key_slices": (),
    "coverage": (),
    "reason": "3 slices, at least 5 needed (≥ 5 axial slices)",
}
CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "typical": (
        {},
        [
            "Typical appearance of COVID-19 pneumonia",
            "Pneumonia-range lung opacity",
            '(52101004,SCT,"Present")',
            '(75540009,SCT,"High")',
            "Coverage: sparse slices",
            "Assessment: PO 7.5%",
            "CNN probability of COVID-19",
        ],
    ),
    "negative": (
        NEGATIVE,
        ["No significant lung opacity", '(272519000,SCT,"Absent")', '(62482003,SCT,"Low")'],
    ),
    "atypical": (THREE_CLASS, ["Atypical appearance for COVID-19 pneumonia", "CNN class"]),
    "not-analysed": (NOT_ANALYSED, ["Not evaluated", "Not analysed: 3 slices"]),
}


def expected_quantification(q: Quantification | None) -> dict[str, Any] | None:
    """What the SR holds of ``q``: volumes of the lungs, PO and PHO of every region, rounded."""
    if q is None:
        return None

    def values(r: Region, volume: bool = False) -> dict[str, float]:
        out = {"po": round(r.po, 2), "pho": round(r.pho, 2)}
        return {"volume_ml": round(r.volume_ml, 1), **out} if volume else out

    return {
        "total": values(q.total, volume=True),
        "lungs": {s: values(q.lungs[s], volume=True) for s in SIDES},
        "zones": {s: {z: values(q.zones[s][z]) for z in ZONES} for s in SIDES},
        "bands": {s: {b: values(q.bands[s][b]) for b in BANDS} for s in SIDES},
    }


def expected_readback(verdict: SeriesVerdict) -> dict[str, Any]:
    a = verdict.assessment
    return {
        "analysed": verdict.analysed,
        "finding": verdict.finding,
        "probabilities": {
            c: round(p, 5) for c, p in zip(verdict.classes, verdict.probabilities, strict=False)
        },
        "slices_analysed": verdict.slices_analysed if verdict.analysed else None,
        "slices_total": verdict.slices_total,
        "series_score": None if verdict.series_score is None else round(verdict.series_score, 5),
        "reason": verdict.reason,
        "category": None if a is None else a.category,
        "pneumonia": None if a is None else a.pneumonia,
        "covid_likelihood": None if a is None else a.covid_likelihood,
        "quantification": expected_quantification(verdict.quantification),
        "key_slices": [
            {"sop_instance_uid": s.sop_instance_uid, "po": round(s.positive_score, 2)}
            for s in verdict.key_slices
        ],
        "top_slice_uids": [s.sop_instance_uid for s in verdict.top_slices],
        "analysis_version": verdict.analysis_version,
        "coverage": list(verdict.coverage),
        "assessment_reasons": [] if a is None else list(a.reasons),
        "model": {
            "name": verdict.algorithm.name,
            "version": verdict.algorithm.version,
            "sha256": verdict.algorithm.sha256,
        },
    }


def check_with_tools(path: Path, expected_texts: list[str]) -> str:
    """dciodvfy finds no error; dsrdump shows the texts and the disclaimer.  Returns the dump."""
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
    return dump


def measurement_group(ds: Dataset) -> MeasurementsAndQualitativeEvaluations:
    report = Comprehensive3DSR.from_dataset(ds).content
    assert isinstance(report, MeasurementReport)
    groups = report.get_image_measurement_groups()
    assert len(groups) == 1
    return groups[0]


@pytest.mark.parametrize("case", list(CASES))
def test_report_validates_and_reads_back(case: str, headers: list[Dataset], tmp_path: Path) -> None:
    changes, texts = CASES[case]
    verdict = make_verdict(headers, **changes)
    path = tmp_path / "sr.dcm"

    write_report(build_report(verdict, headers, institution_name="Test Hospital"), path)

    check_with_tools(path, texts)
    ds = pydicom.dcmread(path)
    assert verdict_from_report(ds) == expected_readback(verdict)
    group = measurement_group(ds)
    assert [s.referenced_sop_instance_uid for s in group.source_images] == [
        s.sop_instance_uid for s in verdict.key_slices
    ]
    assert ds.StudyInstanceUID == headers[0].StudyInstanceUID
    assert ds.PatientID == headers[0].PatientID
    assert ds.SeriesInstanceUID != headers[0].SeriesInstanceUID
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.CompletionFlag == "COMPLETE"
    assert ds.SeriesNumber == 9901
    assert (ds.SeriesDate, ds.SeriesTime) == (ds.ContentDate, ds.ContentTime)
    assert list(tmp_path.iterdir()) == [path]


def test_the_node_no_longer_claims_covid_presence(headers: list[Dataset]) -> None:
    """The old "COVID-19 = Present/Absent" evaluation is gone; the CNN's outputs say CNN."""
    group = measurement_group(build_report(make_verdict(headers), headers))

    names = [e.name.meaning for e in group.get_qualitative_evaluations()]
    assert "COVID-19" not in names
    assert names[-1] == "CNN class"
    cnn = [m.name.meaning for m in group.get_measurements() if "CNN" in m.name.meaning]
    assert cnn == [
        "CNN probability of COVID-19",
        "CNN probability of non-COVID",
        "CNN series score",
        "Number of slices classified by the CNN",
    ]


def test_counts_are_integers(headers: list[Dataset]) -> None:
    """Slice counts are written "74", not "74.0", and read back as int."""
    sr = build_report(make_verdict(headers), headers)

    for name in (SLICES_ANALYSED, SLICES_IN_SERIES):
        (count,) = find_content_items(sr, name=name, recursive=True)
        value = count.MeasuredValueSequence[0]
        assert str(value.NumericValue).isdigit(), value.NumericValue
        assert "FloatingPointValue" not in value
    readback = verdict_from_report(sr)
    assert type(readback["slices_total"]) is int and type(readback["slices_analysed"]) is int


def test_analysed_series_round_trips_through_the_sr(
    headers: list[Dataset], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A real verdict (node.pipeline.analyse_files on P001, tiny model) survives the SR."""
    from node.config import Settings
    from node.infer import load_model
    from node.pipeline import analyse_files

    settings = Settings.model_validate(
        {"model_dir": str(tiny_model_dir), "results": {"send_to": None}}
    )
    verdict, evidence = analyse_files(
        sorted(SERIES_DIR.glob("*.dcm")), load_model(tiny_model_dir), settings
    )
    assert verdict.analysed and verdict.quantification and verdict.assessment, verdict.reason
    path = tmp_path / "sr.dcm"

    write_report(build_report(verdict, evidence), path)

    check_with_tools(path, ["Percentage of opacity", verdict.assessment.text])
    readback = verdict_from_report(pydicom.dcmread(path))
    assert readback == expected_readback(verdict)
    assert readback["key_slices"] and readback["top_slice_uids"]


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

    check_with_tools(path, ["No significant lung opacity"])
    ds = pydicom.dcmread(path)
    study = ds.PredecessorDocumentsSequence[0]
    assert study.StudyInstanceUID == old.StudyInstanceUID
    series = study.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == old.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert ds.SOPInstanceUID != old.SOPInstanceUID
    assert verdict_from_report(ds)["category"] == "negative"


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
