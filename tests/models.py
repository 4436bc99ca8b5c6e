"""A tiny Keras model in the shipped model's format, for node tests (seconds, not hours)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from node.model_spec import MODEL_FILE, ModelSpec, SeriesRule, SliceSelection, write_spec
from node.preprocess import PREPROCESSING_VERSION


def make_tiny_model(directory: Path, classes: list[str], input_size: int = 32) -> Path:
    """Save a fixed-weight CNN whose scores depend on image content, plus model.json."""
    import keras

    keras.utils.set_random_seed(7)
    inputs = keras.Input((input_size, input_size, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(classes), activation="softmax", name="classifier")(x)
    model = keras.Model(inputs, outputs)
    probe = model(np.zeros((1, input_size, input_size, 1), np.float32))
    assert probe.shape == (1, len(classes))
    model.save(directory / MODEL_FILE)
    spec = ModelSpec(
        name="tiny-test-model",
        version="0.0.1",
        classes=classes,
        positive_class="COVID-19",
        input_size=input_size,
        preprocessing_version=PREPROCESSING_VERSION,
        selection=SliceSelection(min_lung_fraction=0.05, min_slices=3),
        series_rule=SeriesRule(kind="top_k_mean", k=3, series_threshold=0.5),
    )
    write_spec(directory, spec)
    return directory
