"""Drift monitoring (``node.drift``): the input mix read from real headers, the PSI worked out by
hand, the comparison over a window with its minimum sample, the warning shown by ``status`` and
``/metrics``, and the reference summary ``training.analysis`` writes into model.json."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy.orm import sessionmaker

from node import cli, drift
from node.config import DriftSettings, Settings
from node.db import Job, JobInput, Series, SeriesState
from node.metrics import StateCollector, render
from node.model_spec import ModelSpec, ReferenceSummary, load_spec
from node.service import open_state
from tests.peers import (
    CTMD_COVID,
    SHARED_DATA,
    TCIA_PHILIPS,
    require_shared_data,
    series_files,
)

NOW = dt.datetime(2026, 12, 1, 12, 0, 0)
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "covid-ct-lite0" / "1.1.0"
RICORD = SHARED_DATA / "ct_dicom" / "midrc_ricord" / "COVID" / "MIDRC-RICORD-1A-440808-000006"

#: a reference of 11 series, like the shipped one: two scanners, PO spread over two decades
REFERENCE = ReferenceSummary(
    source="test",
    series=11,
    po=[0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.9, 2.5, 4.0, 8.0, 15.0],
    cnn_score=[0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.5, 0.5, 0.6, 0.7, 0.8],
    mix={
        "manufacturer": {"SIEMENS": 8, "PHILIPS": 3},
        "scanner_model": {"SOMATOM SCOPE": 8, "BRILLIANCE16": 3},
        "kernel": {"D40S": 8, "L": 3},
        "slice_thickness": {"1.25-3 mm": 8, "3-5 mm": 3},
        "contrast": {"not stated": 11},
    },
)
SIEMENS = drift.InputMix("SIEMENS", "SOMATOM SCOPE", "D40S", 2.0, "not stated")
PHILIPS = drift.InputMix("PHILIPS", "BRILLIANCE16", "L", 5.0, "not stated")
GE = drift.InputMix("GE MEDICAL SYSTEMS", "REVOLUTION", "LUNG", 0.625, "yes")


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Any]:
    raw = {
        "results": {"send_to": None},
        "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.sqlite3"},
    }
    (tmp_path / "config.yaml").write_text(json.dumps(raw))
    made, _ = open_state(Settings.model_validate(raw).resolve(tmp_path))
    return made


def spec(reference: ReferenceSummary | None = REFERENCE) -> ModelSpec:
    return ModelSpec(
        name="m",
        version="1",
        classes=["non-COVID", "COVID-19"],
        positive_class="COVID-19",
        input_size=32,
        preprocessing_version=1,
        reference=reference,
    )


def add_jobs(
    sessions: sessionmaker[Any],
    mixes: list[drift.InputMix],
    po: list[float],
    *,
    at: dt.datetime = NOW - dt.timedelta(days=1),
    model_version: str = "1",
) -> None:
    """Analysed jobs of model m with their input mix recorded ``at``."""
    with sessions.begin() as session:
        start = session.query(Series).count()
        for i, (mix, value) in enumerate(zip(mixes, po, strict=True)):
            uid = f"1.2.826.0.1.99.{start + i}"
            series = Series(study_instance_uid=uid, series_instance_uid=f"{uid}.1")
            series.state = SeriesState.COMPLETE
            session.add(series)
            session.flush()
            job = Job(
                series_id=series.id,
                series_version=1,
                analysed=1,
                finding="negative",
                series_score=REFERENCE.cnn_score[i % 11],
                verdict_json=json.dumps({"quantification": {"total": {"po": value}}}),
                model_name="m",
                model_version=model_version,
            )
            session.add(job)
            session.flush()
            session.add(JobInput(job_id=job.id, recorded_at=at, **dataclasses.asdict(mix)))


def like_reference(n: int) -> tuple[list[drift.InputMix], list[float]]:
    """``n`` series in the reference's proportions, PO cycling through its values."""
    mixes = [SIEMENS if i % 11 < 8 else PHILIPS for i in range(n)]
    return mixes, [REFERENCE.po[i % 11] for i in range(n)]


# --------------------------------------------------------------------------------------------------
# input mix and statistics


def test_input_mix_from_real_headers() -> None:
    require_shared_data(CTMD_COVID, TCIA_PHILIPS, RICORD)
    ctmd = drift.input_mix(pydicom.dcmread(series_files(CTMD_COVID)[0], stop_before_pixels=True))
    assert ctmd == drift.InputMix("SIEMENS", "SOMATOM SCOPE", "D40S", 2.0, "not stated")
    assert ctmd.categories()["slice_thickness"] == "1.25-3 mm"
    philips = drift.input_mix(
        pydicom.dcmread(series_files(TCIA_PHILIPS)[0], stop_before_pixels=True)
    )
    assert (philips.manufacturer, philips.kernel, philips.categories()["slice_thickness"]) == (
        "PHILIPS",
        "L",
        "3-5 mm",
    )
    # RICORD: CT angiography, ContrastBolusAgent empty but the route (IV) stated; no maker
    ricord = drift.input_mix(pydicom.dcmread(series_files(RICORD)[0], stop_before_pixels=True))
    assert ricord.contrast == "yes"
    assert ricord.categories()["manufacturer"] == "unknown"


@pytest.mark.parametrize(
    ("mm", "band"),
    [(None, "unknown"), (0.625, "<= 1.25 mm"), (3.0, "1.25-3 mm"), (5.0, "3-5 mm"), (8, "> 5 mm")],
)
def test_thickness_bands(mm: float | None, band: str) -> None:
    assert drift.thickness_band(mm) == band


def test_psi_matches_a_hand_computation() -> None:
    # reference: 10 of A; now: 5 of A, 5 of B; half a series added to each of the 2 categories
    r_a, r_b = 10.5 / 11, 0.5 / 11
    q_a, q_b = 5.5 / 11, 5.5 / 11
    by_hand = (q_a - r_a) * math.log(q_a / r_a) + (q_b - r_b) * math.log(q_b / r_b)
    assert drift.psi({"A": 10}, {"A": 5, "B": 5}) == pytest.approx(by_hand)
    assert by_hand == pytest.approx(1.3838, abs=1e-4)
    assert drift.psi({"A": 8, "B": 3}, {"A": 16, "B": 6}) == pytest.approx(0, abs=2e-3)


# --------------------------------------------------------------------------------------------------
# the comparison


def test_too_few_series_is_reported_never_a_warning(sessions: sessionmaker[Any]) -> None:
    add_jobs(sessions, [GE] * 29, [30.0] * 29)  # everything shifted, but 29 < 30
    report = drift.run_drift(sessions, spec(), DriftSettings(), now=NOW)
    assert report["status"] == "too few series" and report["series"] == 29
    assert report["drifted"] == [] and report["warning"] == ""
    assert report["features"]["manufacturer"]["unseen_share"] == 1.0
    assert drift.current_warning(sessions) is None


def test_series_like_the_reference_give_no_warning(sessions: sessionmaker[Any]) -> None:
    mixes, po = like_reference(44)
    add_jobs(sessions, mixes, po)
    report = drift.run_drift(sessions, spec(), DriftSettings(), now=NOW)
    assert report["status"] == "no drift", report
    assert all(e["compared"] for e in report["features"].values())
    assert report["features"]["kernel"]["psi"] < 0.01
    assert report["features"]["po"]["p_value"] > 0.5
    assert drift.current_warning(sessions) is None


def test_a_new_scanner_warns_with_psi_and_metrics(
    sessions: sessionmaker[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mixes, po = like_reference(11)
    add_jobs(sessions, mixes + [GE] * 30, po + po + po + po[:8])  # 30 of 41 from a new scanner
    report = drift.run_drift(sessions, spec(), DriftSettings(), now=NOW)
    assert report["status"] == "drift"
    assert set(report["drifted"]) == {
        "manufacturer",
        "scanner_model",
        "kernel",
        "slice_thickness",
        "contrast",
    }
    manufacturer = report["features"]["manufacturer"]
    assert manufacturer["current"] == {"GE MEDICAL SYSTEMS": 30, "PHILIPS": 3, "SIEMENS": 8}
    assert manufacturer["unseen_share"] == round(30 / 41, 4)
    assert manufacturer["psi"] == pytest.approx(
        drift.psi(REFERENCE.mix["manufacturer"], manufacturer["current"]), abs=1e-4
    )
    assert manufacturer["psi"] > drift.PSI_THRESHOLD
    assert "po" not in report["drifted"]  # the same PO values: no score drift
    warning = drift.current_warning(sessions)
    assert warning is not None and warning == report["warning"]
    assert warning.startswith("The 41 series of the last 7 days differ from")
    assert "manufacturer (PSI" in warning and "73% of series with a value" in warning

    text = render(StateCollector(sessions, ("m", "1"))).decode()
    assert 'triage_drift_warning{model_name="m",model_version="1"} 1.0' in text
    assert f'triage_drift_psi{{feature="manufacturer"}} {manufacturer["psi"]}' in text
    assert "triage_drift_series 41.0" in text
    assert 'triage_drift_ks_p_value{feature="po"}' in text

    config = tmp_path / "config.yaml"
    assert cli.main(["status", "--config", str(config)]) == 0
    assert f"WARNING drift: {warning}" in capsys.readouterr().out
    assert cli.main(["status", "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["drift_warning"] == warning
    assert cli.main(["drift", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("drift: drift (") and "manufacturer     DRIFT" in out
    assert cli.main(["drift", "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["drifted"] == report["drifted"]


def test_po_shift_is_found_by_ks(sessions: sessionmaker[Any]) -> None:
    mixes, _ = like_reference(33)
    shifted = [20.0 + i for i in range(33)]  # every PO above the reference's largest
    add_jobs(sessions, mixes, shifted)
    report = drift.run_drift(sessions, spec(), DriftSettings(), now=NOW)
    po = report["features"]["po"]
    assert report["drifted"] == ["po"]
    assert po["statistic"] == 1.0 and po["p_value"] < drift.KS_ALPHA
    assert (po["n_reference"], po["n_current"], po["current_median"]) == (11, 33, 36.0)
    assert "PO distribution (KS p=" in report["warning"]


def test_window_model_and_reference(sessions: sessionmaker[Any]) -> None:
    add_jobs(sessions, [GE] * 40, [30.0] * 40, at=NOW - dt.timedelta(days=8))  # too old
    add_jobs(sessions, [GE] * 40, [30.0] * 40, model_version="0")  # another model's series
    mixes, po = like_reference(33)
    add_jobs(sessions, mixes, po)
    report = drift.run_drift(sessions, spec(), DriftSettings(), now=NOW)
    assert (report["series"], report["status"]) == (33, "no drift")
    later = drift.run_drift(
        sessions, spec(), DriftSettings(window_days=10), now=NOW
    )  # the old ones are back in a 10-day window
    assert later["series"] == 73 and later["status"] == "drift"
    assert drift.latest_report(sessions) == later
    none = drift.run_drift(sessions, spec(reference=None), DriftSettings(), now=NOW)
    assert none["status"] == "no reference" and none["warning"] == ""
    assert drift.current_warning(sessions) is None  # the latest comparison rules


# --------------------------------------------------------------------------------------------------
# the reference in model.json


def test_write_reference_changes_only_its_key(tmp_path: Path) -> None:
    from training.analysis import SeriesResult, write_reference

    model_dir = tmp_path / "model"
    shutil.copytree(SHIPPED, model_dir, ignore=shutil.ignore_patterns("*.png", "*.jsonl"))
    before = json.loads((model_dir / "model.json").read_text())
    results = [
        SeriesResult("a", "s1", "p1", "x", True, True, "1.1", True, po=2.0, cnn_score=0.7, mix=GE),
        SeriesResult("b", "s2", "p2", "x", False, False, "1.2", True, po=0.3, mix=SIEMENS),
        SeriesResult("c", "s2", "p3", "x", None, None, "1.3", False, mix=SIEMENS),
    ]
    write_reference(model_dir, results, Path("listing.csv"))
    after = json.loads((model_dir / "model.json").read_text())
    order = list(before) if "reference" in before else [*before, "reference"]
    assert list(after) == order  # the key is added last or rewritten in place
    assert {k: v for k, v in after.items() if k != "reference"} == {
        k: v for k, v in before.items() if k != "reference"
    }
    reference = load_spec(model_dir).reference
    assert reference is not None
    assert (reference.series, reference.po, reference.cnn_score) == (3, [0.3, 2.0], [0.7])
    assert reference.mix["manufacturer"] == {"GE MEDICAL SYSTEMS": 1, "SIEMENS": 2}
    assert reference.mix["contrast"] == {"not stated": 2, "yes": 1}
    assert "listing.csv: 3 series from 2 sites" in reference.source


def test_shipped_model_has_a_consistent_reference() -> None:
    reference = load_spec(SHIPPED).reference
    assert reference is not None, "run python -m training.analysis --write-reference"
    assert reference.series == 11
    for feature in drift.MIX_FEATURES:
        assert sum(reference.mix[feature].values()) == reference.series, feature
    assert len(reference.po) == len(reference.cnn_score) <= reference.series
    assert reference.po == sorted(reference.po)
