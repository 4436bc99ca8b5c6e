"""LiteRT runtime: agrees with Keras on the tiny model, cached by sha256, falls back on mismatch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from node import runtime
from node.errors import ModelError
from node.infer import load_model
from node.model_spec import MODEL_FILE, file_sha256


def test_auto_uses_tflite_that_matches_keras(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = load_model(tiny_model_dir, runtime="auto", cache_dir=tmp_path / "cache")
    assert model.runtime == "tflite"
    batch = np.random.default_rng(3).random((5, 32, 32), dtype=np.float32)
    keras_probs = np.asarray(model.keras_model(batch[..., None], training=False))
    for size in (1, 5, 2):  # the batch dimension is resized on demand, both ways
        probs = model.predict(batch[:size])
        assert probs.shape == (size, 2)
        assert np.abs(probs - keras_probs[:size]).max() <= runtime.TOLERANCE
    cached = list((tmp_path / "cache").glob("*.tflite"))
    assert [p.name[:32] for p in cached] == [file_sha256(tiny_model_dir / MODEL_FILE)[:32]]


def test_cached_conversion_is_reused(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_model(tiny_model_dir, runtime="auto", cache_dir=tmp_path)

    def no_conversion(_model: object) -> bytes:
        raise AssertionError("converted again despite the cache")

    monkeypatch.setattr(runtime, "convert_to_tflite", no_conversion)
    assert load_model(tiny_model_dir, runtime="auto", cache_dir=tmp_path).runtime == "tflite"


def test_keras_runtime_never_converts(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "convert_to_tflite", None)
    model = load_model(tiny_model_dir, runtime="keras", cache_dir=tmp_path)
    assert model.runtime == "keras"
    assert model.predict(np.zeros((2, 32, 32), np.float32)).shape == (2, 2)


def test_mismatch_falls_back_to_keras_and_logs(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_predict = runtime.TFLiteRunner.predict

    def skewed(self: runtime.TFLiteRunner, x: np.ndarray) -> np.ndarray:
        return real_predict(self, x) + np.float32(0.01)

    monkeypatch.setattr(runtime.TFLiteRunner, "predict", skewed)
    with caplog.at_level(logging.WARNING, logger="node.runtime"):
        model = load_model(tiny_model_dir, runtime="auto", cache_dir=tmp_path)
    assert model.runtime == "keras"
    assert "falling back to Keras" in caplog.text
    assert not list(tmp_path.glob("*.tflite")), "a mismatching conversion must not stay cached"
    with pytest.raises(ModelError, match="tflite requested"):
        load_model(tiny_model_dir, runtime="tflite", cache_dir=tmp_path)


def test_failed_conversion_falls_back(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_model: object) -> bytes:
        raise ValueError("converter exploded")

    monkeypatch.setattr(runtime, "convert_to_tflite", broken)
    assert load_model(tiny_model_dir, runtime="auto", cache_dir=tmp_path).runtime == "keras"
