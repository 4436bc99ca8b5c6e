"""The evaluation CLI: JSON keys, PNGs, and the DICOM series path, with a tiny trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from node.model_spec import SeriesRule
from training.evaluate import classification_metrics, main
from training.predict import series_score, series_verdict
from training.train import run

from .test_preprocess import CT_MD, needs_data
from .test_train import make_csv_source, tiny_config


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny")
    return run(tiny_config(tmp, finetune={"epochs": 0}))


def test_evaluate_manifest_prints_metrics_and_writes_pngs(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = make_csv_source(tmp_path / "eval")
    assert (
        main(
            [
                "--model",
                str(tiny_model),
                "--manifest",
                str(manifest),
                "--out",
                str(tmp_path / "png"),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    m = report["manifest"]
    for key in (
        "accuracy",
        "per_class",
        "roc_auc",
        "confusion_matrix",
        "sensitivity",
        "specificity",
        "threshold",
        "per_patient",
    ):
        assert key in m, key
    assert set(m["per_class"]) == {"Normal", "Pneumonia", "COVID-19"}
    assert set(m["per_class"]["COVID-19"]) == {"precision", "recall", "f1", "support"}
    assert np.asarray(m["confusion_matrix"]).sum() == 12
    assert len(m["per_patient"]) == 6
    for png in ("confusion_matrix.png", "roc.png", "training_curves_head.png"):
        assert (tmp_path / "png" / png).is_file(), png


@needs_data
def test_evaluate_dicom_series(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tiny_model), "--dicom", str(CT_MD / "Normal")]) == 0
    report = json.loads(capsys.readouterr().out)
    (series,) = report["dicom"]["series"].values()
    assert series["label"] == "Normal" and series["slices"] == 77
    assert 5 <= series["selected"] <= 77 and "score" in series


def test_classification_metrics_two_classes() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]])
    m = classification_metrics(y, probs, ["non-COVID", "COVID-19"], 1, 0.5, ["a", "a", "b", "c"])
    assert m["accuracy"] == 0.5 and m["roc_auc"] == 0.75
    assert m["confusion_matrix"] == [[1, 1], [1, 1]]
    assert m["sensitivity"] == 0.5 and m["specificity"] == 0.5
    assert m["per_patient"]["a"]["max_score"] == pytest.approx(0.6)


def test_series_rules() -> None:
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.7])
    assert series_score(scores, SeriesRule(kind="top_k_mean", k=2)) == pytest.approx(0.85)
    rule = SeriesRule(kind="fraction_above", slice_threshold=0.5, series_threshold=0.5)
    assert series_score(scores, rule) == pytest.approx(0.6)
    assert series_verdict(scores, rule).positive


def test_evaluate_manifest_with_rendered_window(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = make_csv_source(tmp_path / "eval")
    assert (
        main(
            [
                "--model",
                str(tiny_model),
                "--manifest",
                str(manifest),
                "--rendered-window",
                "-600",
                "3300",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["manifest"]["n"] == 12


def test_model_notice_comes_from_the_measured_dicom_auc() -> None:
    from training.model_card import notice_for

    assert notice_for({}) == ""
    good = {"infected_vs_non_covid_auc": 0.91, "infected_vs_non_covid_ci95": [0.8, 0.97]}
    assert notice_for({"held_out_protocol": "site", "dicom_held_out": {"site": good}}) == ""
    text = notice_for({"dicom_held_out": {"patient": {"infected_vs_non_covid_auc": 0.341}}})
    assert "ROC AUC 0.34" in text and "Hounsfield" in text and "leave-one-patient-out" in text
    # A good point estimate whose patient-bootstrap interval reaches chance is not validated.
    wide = {"infected_vs_non_covid_auc": 0.7, "infected_vs_non_covid_ci95": [0.37, 0.87]}
    text = notice_for({"held_out_protocol": "site", "dicom_held_out": {"site": wide}})
    assert "95% CI 0.37-0.87, leave-one-site-out" in text


def test_auc_interval_is_patient_clustered() -> None:
    """Many slices of few patients: the interval must reflect the patients, not the slices."""
    from training.evaluate import auc_ci95

    rng = np.random.default_rng(0)
    pids = [f"p{p}" for p in range(6) for _ in range(50)]
    y = np.array([int(p < 3) for p in range(6) for _ in range(50)])
    # Patient-level offsets dominate: one positive patient scores like the negatives.
    offset = {0: 1.0, 1: 1.0, 2: -1.0, 3: 0.0, 4: 0.0, 5: -0.2}
    s = np.array([offset[int(p[1:])] for p in pids]) + rng.normal(0, 0.3, len(pids))
    lo, hi = auc_ci95(y, s, pids, n_boot=500)
    assert lo < 0.6 < hi  # slice-level resampling would claim a tight interval near 0.7
    assert auc_ci95(y[:100], s[:100], pids[:100]) is None  # one class present: no interval


def test_subgroup_auc_separates_severities() -> None:
    """Each subgroup's positives against all negatives: a model that only finds severe disease
    scores high on the severe subgroup and near chance on the mild one."""
    from training.evaluate import subgroup_auc

    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.15, 0.35, 0.9, 0.95])
    groups = ["CT-0"] * 4 + ["CT-1", "CT-1", "CT-3", "CT-3"]
    out = subgroup_auc(y, s, groups)
    assert sorted(out) == ["CT-1", "CT-3"]  # negatives' own group is not a positive subgroup
    assert out["CT-3"]["roc_auc_vs_negatives"] == 1.0
    assert out["CT-1"]["roc_auc_vs_negatives"] == 0.5
    assert out["CT-1"]["n_positive"] == 2 and out["CT-1"]["n_negative"] == 4


def test_csv_subgroup_column_is_read_and_must_exist(tmp_path: Path) -> None:
    from training.dataset import read_csv_manifest

    (tmp_path / "m.csv").write_text("path,label,sev\na.jpg,COVID,CT-2\nb.jpg,Normal,CT-0\n")
    rows = read_csv_manifest(tmp_path / "m.csv", "src", "sev")
    assert [r.subgroup for r in rows] == ["CT-2", "CT-0"]
    with pytest.raises(ValueError, match=r"missing column.*severity"):
        read_csv_manifest(tmp_path / "m.csv", "src", "severity")
