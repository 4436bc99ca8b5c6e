"""Coverage (pipeline.check_coverage, pipeline.coverage_caveats) on real partial series: a
10 x 3 mm slab and a series sampled every 10 mm are analysed with a caveat in the SR; lungs seen
over less than ``analysis.min_lung_extent_mm`` (20 mm) give a "not analysed" SR."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from node.config import AnalysisSettings, Settings
from node.infer import LoadedModel, load_model
from node.pipeline import analyse_files
from node.report import build_report, verdict_from_report
from node.verdict import SeriesVerdict
from tests.peers import SHARED_DATA, TCIA_PHILIPS, require_shared_data

#: MIDRC-RICORD-1A, COVID-19, a CT pulmonary angiogram slab: 10 slices, 3 mm apart (30 mm).
RICORD_SLAB = SHARED_DATA / "ct_dicom" / "midrc_ricord" / "COVID" / "MIDRC-RICORD-1A-440808-000006"
PARTIAL = "partial coverage: lungs seen over"


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir)


def settings(**analysis: float) -> Settings:
    return Settings.model_validate({"results": {"send_to": None}, "analysis": analysis})


def slab_files(count: int | None = None) -> list[Path]:
    """The slab's files from the head down; the first ``count`` only if given."""
    require_shared_data(RICORD_SLAB)
    files = sorted(
        RICORD_SLAB.glob("*.dcm"),
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    assert len(files) == 10
    return files[:count]


def through_the_sr(verdict: SeriesVerdict, evidence: list[pydicom.Dataset]) -> dict[str, object]:
    return verdict_from_report(build_report(verdict, evidence))


def test_default_minimum_lung_extent() -> None:
    assert AnalysisSettings.model_validate({}).min_lung_extent_mm == 20.0


def test_slab_of_30_mm_is_analysed_with_a_caveat_in_the_sr(model: LoadedModel) -> None:
    verdict, evidence = analyse_files(slab_files(), model, settings())
    assert verdict.analysed, verdict.reason
    assert verdict.quantification is not None
    assert verdict.quantification.extent_mm == pytest.approx(30.0)
    assert [c for c in verdict.coverage if c.startswith(PARTIAL)] == [
        f"{PARTIAL} 30 mm along the body axis (a whole chest is about 250 mm; under 100 mm the "
        "figures describe this slab only)"
    ]
    from_sr = through_the_sr(verdict, evidence)
    assert from_sr["analysed"] is True
    assert list(verdict.coverage) == from_sr["coverage"]


def test_slab_under_the_configured_minimum_is_not_analysed(model: LoadedModel) -> None:
    verdict, evidence = analyse_files(slab_files(), model, settings(min_lung_extent_mm=40))
    assert not verdict.analysed
    assert verdict.reason == (
        f"{PARTIAL} 30 mm along the body axis, under the minimum of 40 mm "
        "(analysis.min_lung_extent_mm)"
    )
    from_sr = through_the_sr(verdict, evidence)
    assert from_sr["analysed"] is False and from_sr["reason"] == verdict.reason


@pytest.mark.parametrize(("count", "analysed"), [(6, False), (7, True)])
def test_default_minimum_20_mm(model: LoadedModel, count: int, analysed: bool) -> None:
    """6 slices x 3 mm = 18 mm of lung: refused; 7 = 21 mm: analysed with the slab caveat."""
    verdict, _ = analyse_files(slab_files(count), model, settings())
    assert verdict.analysed is analysed
    if analysed:
        assert any(c.startswith(f"{PARTIAL} 21 mm") for c in verdict.coverage)
    else:
        assert verdict.reason.startswith(f"{PARTIAL} 18 mm"), verdict.reason
        assert "minimum of 20 mm" in verdict.reason


def test_series_every_10_mm_is_analysed_with_the_sparse_caveat(model: LoadedModel) -> None:
    """TCIA Lung_Dx-A0001: 5 mm slices every 10 mm over the whole chest."""
    require_shared_data(TCIA_PHILIPS)
    verdict, evidence = analyse_files(sorted(TCIA_PHILIPS.glob("*.dcm")), model, settings())
    assert verdict.analysed, verdict.reason
    assert verdict.quantification is not None and verdict.quantification.extent_mm >= 100
    assert [c for c in verdict.coverage if c.startswith("sparse slices")] == [
        "sparse slices every 10.0 mm: small opacities between slices are missed and partial "
        "volume raises PO"
    ]
    assert not any(c.startswith(PARTIAL) for c in verdict.coverage)
    assert through_the_sr(verdict, evidence)["coverage"] == list(verdict.coverage)
