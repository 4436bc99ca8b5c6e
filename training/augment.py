"""Training augmentation: renderings of a slice that the model must treat alike.

Two kinds, both streamed (nothing augmented is written to disk):

* intensity: a DICOM slice is re-windowed from its Hounsfield units with a jittered level and
  width (``render``); an 8-bit slice, already windowed by its publisher, gets the equivalent
  contrast/brightness/gamma jitter.  This is what keeps the model from learning one rendering.
* geometry (thesis values by default): rotation, zoom, shift, horizontal flip, on the model
  input (``geometric_layers``, usable in ``tf.data`` and eagerly).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from node.preprocess import Window, apply_window, windowed_to_input

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 20.0
    zoom: float = 0.2
    shift: float = 0.1
    flip: bool = True
    level_jitter_hu: float = 100.0  # DICOM: window level +- this
    width_jitter: float = 0.2  # DICOM: window width x (1 +- this)
    contrast: float = 0.2  # 8-bit: (x - 0.5) * (1 +- this) + 0.5
    brightness: float = 0.08  # 8-bit: + this * U(-1, 1)
    gamma: float = 0.25  # both: x ** exp(+- this)


def jitter_window(window: Window, cfg: AugmentConfig, rng: np.random.Generator) -> Window:
    level = window.level + rng.uniform(-cfg.level_jitter_hu, cfg.level_jitter_hu)
    width = window.width * (1.0 + rng.uniform(-cfg.width_jitter, cfg.width_jitter))
    return Window(float(level), float(width))


def jitter_intensity(
    grey: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator, affine: bool = True
) -> np.ndarray:
    """Contrast/brightness (``affine``) and gamma jitter of a [0, 1] image, clipped to [0, 1]."""
    out = grey.astype(np.float32, copy=True)
    if affine:
        scale = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
        shift = rng.uniform(-cfg.brightness, cfg.brightness)
        out = (out - 0.5) * np.float32(scale) + np.float32(0.5 + shift)
    np.clip(out, 0.0, 1.0, out=out)
    gamma = float(np.exp(rng.uniform(-cfg.gamma, cfg.gamma)))
    return np.power(out, np.float32(gamma), out=out)


def render(
    native: np.ndarray,
    kind: str,
    size: int,
    window: Window,
    cfg: AugmentConfig | None,
    rng: np.random.Generator,
    crop: str = "none",
    normalise: str = "none",
) -> np.ndarray:
    """A native slice (HU or [0, 1] grey) -> model input, intensity-augmented when ``cfg`` is set.

    With ``cfg=None`` this equals ``hu_to_input`` (DICOM) or the 8-bit path exactly.
    """
    if kind == "dicom":
        win = jitter_window(window, cfg, rng) if cfg else window
        grey = apply_window(native, win)
        if cfg:
            grey = jitter_intensity(grey, cfg, rng, affine=False)
    else:
        grey = jitter_intensity(native, cfg, rng) if cfg else native
    return windowed_to_input(grey, size, crop, normalise)


def geometric_layers(cfg: AugmentConfig, seed: int) -> keras.Sequential:
    """Rotation, zoom, shift and flip on ``(batch, size, size, 1)`` inputs."""
    layers: list[keras.layers.Layer] = []
    if cfg.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if cfg.rotation_deg:
        layers.append(
            keras.layers.RandomRotation(cfg.rotation_deg / 360.0, fill_mode="nearest", seed=seed)
        )
    if cfg.zoom:
        layers.append(keras.layers.RandomZoom(cfg.zoom, fill_mode="nearest", seed=seed))
    if cfg.shift:
        layers.append(
            keras.layers.RandomTranslation(cfg.shift, cfg.shift, fill_mode="nearest", seed=seed)
        )
    return keras.Sequential(layers, name="augment")


def tf_intensity(x: Any, cfg: AugmentConfig) -> Any:
    """``jitter_intensity`` in TensorFlow, one draw per image of a ``(b, h, w, 1)`` batch."""
    import tensorflow as tf

    shape = tf.stack([tf.shape(x)[0], 1, 1, 1])
    scale = 1.0 + tf.random.uniform(shape, -cfg.contrast, cfg.contrast)
    shift = tf.random.uniform(shape, -cfg.brightness, cfg.brightness)
    out = tf.clip_by_value((x - 0.5) * scale + 0.5 + shift, 0.0, 1.0)
    gamma = tf.exp(tf.random.uniform(shape, -cfg.gamma, cfg.gamma))
    return tf.pow(out, gamma)
