"""Inference stage: load the model once (LiteRT or Keras), score slices, reduce to a verdict.

What to do with the slices (window, input size, which slices, the series rule) comes from the
model's ``model.json`` (``node.model_spec``), never from constants here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node import preprocess
from node.errors import InferenceFailed, ModelError, SeriesRejected
from node.model_spec import (
    MODEL_FILE,
    TFLITE_FILE,
    ModelSpec,
    SeriesRule,
    file_sha256,
    load_spec,
)
from node.runtime import RuntimeMismatch, RuntimeName, TFLiteRunner, load_shipped, select_runtime
from node.series_check import SliceRef
from node.verdict import AlgorithmInfo, SliceScore

logger = logging.getLogger(__name__)

TOP_SLICES_REPORTED = 5


@dataclass(frozen=True)
class LoadedModel:
    spec: ModelSpec
    keras_model: Any  # None when the shipped model.tflite runs without TensorFlow
    directory: Path
    runner: TFLiteRunner | None = None  # the faster runtime, when it matched Keras

    @property
    def runtime(self) -> str:
        return self.runner.name if self.runner is not None else "keras"

    @property
    def algorithm(self) -> AlgorithmInfo:
        return AlgorithmInfo(self.spec.name, self.spec.version, self.spec.sha256, self.spec.notice)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a ``(N, size, size)`` batch of preprocessed slices."""
        if batch.size == 0:
            return np.zeros((0, len(self.spec.classes)), np.float32)
        x = batch[..., np.newaxis].astype(np.float32, copy=False)
        try:
            if self.runner is not None:
                return self.runner.predict(x)
            out = self.keras_model(x, training=False)
        except Exception as exc:
            raise InferenceFailed(f"model call failed: {exc}") from exc
        return np.asarray(out, dtype=np.float32)


def load_model(
    model_dir: Path,
    *,
    verify_hash: bool = True,
    runtime: RuntimeName = "keras",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load the model in ``model_dir``; refuse a ``model.keras`` whose sha256 differs from the spec.

    ``runtime="auto"`` (or ``"tflite"``) uses the shipped ``model.tflite`` with LiteRT alone,
    without importing TensorFlow, when it is verified (``node.runtime.load_shipped``); otherwise
    (logged) TensorFlow loads ``model.keras``, converts it to LiteRT (cached in ``cache_dir``) and
    uses the conversion when it matches Keras, else (``auto`` only) Keras.  ``"keras"`` always
    runs Keras.

    Raises
    ------
    ModelError
        A missing or invalid model, a hash mismatch, a shape other than the spec's, no verified
        ``model.tflite`` and no TensorFlow installed, or ``runtime="tflite"`` unusable.
    """
    spec = load_spec(model_dir)
    actual = ""
    if (verify_hash and spec.sha256) or runtime != "keras":
        actual = file_sha256(model_dir / MODEL_FILE)
    if verify_hash and spec.sha256 and actual != spec.sha256:
        raise ModelError(
            f"{model_dir / MODEL_FILE}: sha256 {actual[:12]}... differs from model.json "
            f"{spec.sha256[:12]}... (corrupted or replaced)"
        )
    if runtime != "keras":
        try:
            shipped = load_shipped(model_dir, spec)
        except RuntimeMismatch as exc:
            log = logger.info if spec.tflite is None else logger.warning
            log("shipped LiteRT model not used: %s; loading model.keras with TensorFlow", exc)
        else:
            logger.info(
                "model %s %s loaded from %s (runtime tflite)", spec.name, spec.version, model_dir
            )
            return LoadedModel(spec, None, model_dir, shipped)
    model = _load_keras(model_dir, spec)
    runner = select_runtime(model, runtime, actual, cache_dir)
    logger.info(
        "model %s %s loaded from %s (runtime %s)",
        spec.name,
        spec.version,
        model_dir,
        runner.name if runner is not None else "keras",
    )
    return LoadedModel(spec, model, model_dir, runner)


def _load_keras(model_dir: Path, spec: ModelSpec) -> Any:
    """``model.keras`` in Keras (imports TensorFlow), its input shape checked against the spec."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import keras  # heavy import: only when the Keras file is actually needed
    except ImportError as exc:
        raise ModelError(
            f"{model_dir}: no verified {TFLITE_FILE} to run with LiteRT and TensorFlow/Keras is "
            f"not installed to load {MODEL_FILE} ({exc}); install the project with TensorFlow "
            "or ship the model.tflite that training exports"
        ) from exc
    try:
        model = keras.models.load_model(model_dir / MODEL_FILE, compile=False)
    except Exception as exc:
        raise ModelError(f"{model_dir / MODEL_FILE}: cannot load: {exc}") from exc
    expected = (None, spec.input_size, spec.input_size, 1)
    if tuple(model.input_shape) != expected:
        raise ModelError(
            f"model input shape {model.input_shape} differs from model.json {expected}"
        )
    return model


def _prepare(
    spec: ModelSpec, refs: list[SliceRef], volume: np.ndarray | None = None
) -> tuple[list[SliceRef], list[np.ndarray]]:
    """Read ``refs`` (or take their HU from ``volume``), keep the slices with enough lung, and
    preprocess them as training did."""
    selected: list[SliceRef] = []
    inputs: list[np.ndarray] = []
    for i, ref in enumerate(refs):
        if volume is not None:
            hu = volume[i]
        else:
            try:
                hu = preprocess.hounsfield(preprocess.read_dicom(ref.path))
            except Exception as exc:
                raise SeriesRejected(f"slice {ref.sop_instance_uid}: {exc}") from exc
        if preprocess.lung_fraction(hu) < spec.selection.min_lung_fraction:
            continue
        selected.append(ref)
        inputs.append(spec.hu_to_input(hu))
    return selected, inputs


def score_slices(
    model: LoadedModel,
    slices: list[SliceRef],
    batch_size: int,
    volume: np.ndarray | None = None,
) -> tuple[list[SliceScore], int]:
    """Select slices with lung, preprocess them as training did, and classify them in batches.

    One after the other: overlapping preprocessing with inference in a second thread was
    measured no faster on 2 cores, where LiteRT already keeps both busy (``python -m bench
    inference``, ``score_slices_overlap``).
    ``volume`` holds the slices in HU when the caller has read them already (the pipeline
    reads a series once for segmentation and the CNN).
    Returns the scores of the selected slices (body-axis order) and the number of slices read.
    """
    spec = model.spec
    selected, inputs = _prepare(spec, slices, volume)
    if len(selected) < spec.selection.min_slices:
        raise SeriesRejected(
            f"only {len(selected)} of {len(slices)} slices contain enough lung "
            f"(at least {spec.selection.min_slices} needed): not a chest CT covering the lungs?"
        )
    probabilities = np.concatenate(
        [
            model.predict(np.stack(inputs[i : i + batch_size]))
            for i in range(0, len(inputs), batch_size)
        ]
    )
    pos = spec.positive_index
    scores = [
        SliceScore(
            sop_instance_uid=ref.sop_instance_uid,
            sop_class_uid=ref.sop_class_uid,
            z=ref.z,
            probabilities=tuple(float(p) for p in probs),
            positive_score=float(probs[pos]),
        )
        for ref, probs in zip(selected, probabilities, strict=True)
    ]
    return scores, len(slices)


@dataclass(frozen=True)
class Reduction:
    finding: str
    probabilities: tuple[float, ...]
    series_score: float
    rule: str
    top_slices: tuple[SliceScore, ...]


def decide_finding(
    spec: ModelSpec, score: float, threshold: float, probabilities: np.ndarray
) -> str:
    """The positive class when ``score >= threshold``, else the likeliest of the other classes."""
    if score >= threshold:
        return spec.positive_class
    others = [i for i in range(len(spec.classes)) if i != spec.positive_index]
    return spec.classes[max(others, key=lambda i: probabilities[i])]


def reduce_scores(spec: ModelSpec, scores: list[SliceScore]) -> Reduction:
    """Slice scores -> series verdict, by the rule in the model's metadata."""
    rule: SeriesRule = spec.series_rule
    ranked = sorted(scores, key=lambda s: s.positive_score, reverse=True)
    positive = np.array([s.positive_score for s in scores], dtype=np.float64)
    all_probs = np.array([s.probabilities for s in scores], dtype=np.float64)
    if rule.kind == "top_k_mean":
        k = min(rule.k, len(ranked))
        series_score = float(np.mean([s.positive_score for s in ranked[:k]]))
        series_probs = np.mean([s.probabilities for s in ranked[:k]], axis=0)
        text = f"mean of the top {k} slice scores"
    else:
        series_score = float(np.mean(positive >= rule.slice_threshold))
        series_probs = all_probs.mean(axis=0)
        text = f"fraction of lung slices with score >= {rule.slice_threshold:g}"
    return Reduction(
        finding=decide_finding(spec, series_score, rule.series_threshold, series_probs),
        probabilities=tuple(float(p) for p in series_probs),
        series_score=series_score,
        rule=f"{text} >= {rule.series_threshold:g}",
        top_slices=tuple(ranked[:TOP_SLICES_REPORTED]),
    )
