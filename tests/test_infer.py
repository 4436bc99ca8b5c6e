"""infer.reduce_scores: slice scores -> one series verdict, by the rule in model.json; the CNN
scoring beside the Hounsfield analysis (pipeline._measure): failures and refusals in order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node import pipeline
from node.config import Settings
from node.errors import InferenceFailed, SeriesRejected
from node.infer import TOP_SLICES_REPORTED, LoadedModel, load_model, reduce_scores
from node.model_spec import ModelSpec
from node.pipeline import analyse_files
from node.preprocess import PREPROCESSING_VERSION
from node.verdict import SliceScore


def spec(classes: tuple[str, ...] = ("non-COVID", "COVID-19"), **rule: Any) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "test",
            "version": "1",
            "classes": list(classes),
            "positive_class": "COVID-19",
            "input_size": 32,
            "preprocessing_version": PREPROCESSING_VERSION,
            "series_rule": rule,
        }
    )


def scores(*probabilities: tuple[float, ...], positive: int = 1) -> list[SliceScore]:
    """One slice per tuple of class probabilities, at z = 0, 1, 2, ... mm."""
    return [
        SliceScore(
            sop_instance_uid=f"1.2.826.0.2.{i}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            z=float(i),
            probabilities=p,
            positive_score=p[positive],
        )
        for i, p in enumerate(probabilities)
    ]


def test_top_k_mean_averages_the_k_highest_slices() -> None:
    slices = scores((0.1, 0.9), (0.9, 0.1), (0.3, 0.7), (0.8, 0.2))
    reduction = reduce_scores(spec(kind="top_k_mean", k=2, series_threshold=0.75), slices)
    assert reduction.series_score == pytest.approx(0.8)
    assert reduction.probabilities == pytest.approx((0.2, 0.8))  # of the same two slices
    assert reduction.finding == "COVID-19"
    assert reduction.rule == "mean of the top 2 slice scores >= 0.75"
    assert [s.positive_score for s in reduction.top_slices] == [0.9, 0.7, 0.2, 0.1]


def test_top_k_mean_with_fewer_slices_than_k_uses_them_all() -> None:
    slices = scores((0.6, 0.4), (0.8, 0.2))
    reduction = reduce_scores(spec(kind="top_k_mean", k=5), slices)
    assert reduction.series_score == pytest.approx(0.3)
    assert reduction.rule == "mean of the top 2 slice scores >= 0.5"
    assert reduction.finding == "non-COVID"


def test_the_series_threshold_is_inclusive() -> None:
    reduction = reduce_scores(spec(kind="top_k_mean", k=1), scores((0.5, 0.5)))
    assert (reduction.series_score, reduction.finding) == (0.5, "COVID-19")


def test_fraction_above_counts_slices_at_or_over_the_slice_threshold() -> None:
    slices = scores((0.1, 0.9), (0.5, 0.5), (0.7, 0.3), (0.9, 0.1))
    rule: dict[str, Any] = {
        "kind": "fraction_above",
        "slice_threshold": 0.5,
        "series_threshold": 0.5,
    }
    reduction = reduce_scores(spec(**rule), slices)
    assert reduction.series_score == pytest.approx(0.5)  # 0.9 and 0.5 of four slices
    assert reduction.probabilities == pytest.approx((0.55, 0.45))  # mean of all slices
    assert reduction.finding == "COVID-19"
    assert reduction.rule == "fraction of lung slices with score >= 0.5 >= 0.5"
    below = reduce_scores(spec(**{**rule, "series_threshold": 0.6}), slices)
    assert below.finding == "non-COVID"


def test_a_negative_series_gets_the_likeliest_other_class() -> None:
    three = ("non-COVID", "COVID-19", "other pneumonia")
    slices = scores((0.2, 0.1, 0.7), (0.3, 0.2, 0.5))
    reduction = reduce_scores(spec(three, kind="top_k_mean", k=2), slices)
    assert reduction.series_score == pytest.approx(0.15)
    assert reduction.finding == "other pneumonia"


def test_at_most_the_top_slices_reported_are_kept_highest_first() -> None:
    slices = scores(*[(1 - s, s) for s in (0.1, 0.5, 0.3, 0.9, 0.2, 0.8, 0.4)])
    reduction = reduce_scores(spec(), slices)
    assert len(reduction.top_slices) == TOP_SLICES_REPORTED == 5
    assert [s.positive_score for s in reduction.top_slices] == [0.9, 0.8, 0.5, 0.4, 0.3]
    assert reduction.top_slices[0].sop_instance_uid == "1.2.826.0.2.3"


# --------------------------------------------------------------------------------------------
# The CNN scores in a second thread while the Hounsfield analysis runs (pipeline._measure)


@pytest.fixture
def slab() -> list[Path]:
    """MIDRC-RICORD-1A 000006: 10 real slices, 3 mm apart (30 mm of lung)."""
    from tests.test_coverage import slab_files

    return slab_files()


def _settings(**analysis: float) -> Settings:
    return Settings.model_validate({"results": {"send_to": None}, "analysis": analysis})


def test_a_cnn_failure_in_its_thread_gives_a_not_analysed_verdict(
    tiny_model_dir: Path, slab: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model(tiny_model_dir)
    assert analyse_files(slab, model, _settings())[0].analysed

    def broken(self: LoadedModel, batch: np.ndarray) -> np.ndarray:
        raise InferenceFailed("model call failed: interpreter exploded")

    monkeypatch.setattr(LoadedModel, "predict", broken)
    verdict, evidence = analyse_files(slab, model, _settings())
    assert not verdict.analysed
    assert verdict.reason == "model call failed: interpreter exploded"
    assert len(evidence) == len(slab)


def test_the_hounsfield_refusal_comes_before_the_cnn_refusal(
    tiny_model_dir: Path, slab: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As when the two ran one after the other: coverage is checked before the CNN's result."""
    model = load_model(tiny_model_dir)

    def refuses(*_args: object, **_kwargs: object) -> tuple[list[SliceScore], int]:
        raise SeriesRejected("only 0 of 10 slices contain enough lung")

    monkeypatch.setattr(pipeline, "score_slices", refuses)
    too_short, _ = analyse_files(slab, model, _settings(min_lung_extent_mm=40))
    assert too_short.reason.startswith("partial coverage: lungs seen over 30 mm")
    long_enough, _ = analyse_files(slab, model, _settings())
    assert long_enough.reason == "only 0 of 10 slices contain enough lung"
