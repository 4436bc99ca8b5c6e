"""Inference stage as the node runs it: model inputs -> slice probabilities -> series verdict.

``training.evaluate`` scores everything through these functions, and ``node/infer.py`` does the
same thing: ``model.predict`` on a stack of ``hu_to_input`` arrays, the positive-class column,
slice selection by ``lung_fraction`` and the series rule from ``model.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

from node.model_spec import ModelSpec, SeriesRule, SliceSelection
from node.preprocess import lung_fraction

logger = logging.getLogger(__name__)


def predict_proba(
    model: keras.Model, spec: ModelSpec, inputs: np.ndarray, batch_size: int = 32
) -> np.ndarray:
    """``(n, size, size)`` float32 inputs from ``hu_to_input`` -> ``(n, len(spec.classes))``."""
    x = np.asarray(inputs, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    expected = (spec.input_size, spec.input_size, 1)
    if x.shape[1:] != expected:
        raise ValueError(f"inputs of shape {x.shape[1:]}, model expects {expected}")
    if len(x) == 0:
        return np.zeros((0, len(spec.classes)), np.float32)
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), np.float32)


def positive_scores(
    model: keras.Model, spec: ModelSpec, inputs: np.ndarray, batch_size: int = 32
) -> np.ndarray:
    """Probability of ``spec.positive_class`` per slice."""
    return predict_proba(model, spec, inputs, batch_size)[:, spec.positive_index]


def select_slices(hus: Sequence[np.ndarray], selection: SliceSelection) -> np.ndarray:
    """Indices of the slices with enough lung (``lung_fraction >= min_lung_fraction``)."""
    fractions = np.array([lung_fraction(hu) for hu in hus])
    return np.flatnonzero(fractions >= selection.min_lung_fraction)


def series_score(scores: np.ndarray, rule: SeriesRule, k: int | None = None) -> float:
    """One number per series from the selected slices' positive scores (see ``SeriesRule``)."""
    s = np.sort(np.asarray(scores, np.float64))[::-1]
    if len(s) == 0:
        raise ValueError("no slices to score")
    if rule.kind == "top_k_mean":
        return float(s[: (k or rule.k)].mean())
    return float((s >= rule.slice_threshold).mean())


@dataclass(frozen=True)
class SeriesVerdict:
    score: float
    positive: bool
    n_selected: int


def series_verdict(scores: np.ndarray, rule: SeriesRule) -> SeriesVerdict:
    score = series_score(scores, rule)
    return SeriesVerdict(score, score >= rule.series_threshold, len(scores))
