"""Inference stage, runtime: the Keras model in LiteRT (TFLite) with XNNPACK, when it agrees.

Measured on the 2-core machines (``python -m bench inference``), the same network runs several
times faster in the LiteRT interpreter with its default XNNPACK delegate than in Keras.  The Keras
file stays the one source of truth: at load it is converted to a ``.tflite`` flatbuffer, cached
under ``cache_dir`` by the Keras file's sha256 (so nothing but ``model.keras`` is shipped), and used
only if its probabilities match Keras on a few probe inputs (max difference ``TOLERANCE``).
Otherwise the node falls back to Keras and says why in the log.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

from node.errors import ModelError
from node.spool import write_atomic

logger = logging.getLogger(__name__)

RuntimeName = Literal["auto", "keras", "tflite"]
TOLERANCE = 1e-3  # max absolute probability difference between LiteRT and Keras
PROBE_INPUTS = 4
CONVERTER_TAG = "v1"  # bump when the conversion changes, so cached files are rebuilt
# Slices per interpreter call: XNNPACK on 2 cores ran batches of 1-4 faster than 16-32
# (activations of a large batch outgrow the caches; ``python -m bench inference``).
INVOKE_BATCH = 4


class RuntimeMismatch(Exception):
    """The converted model disagrees with Keras (or cannot be built): use Keras."""


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # older installs: the deprecated copy inside TensorFlow
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


def convert_to_tflite(keras_model: Any) -> bytes:
    """Convert a Keras 3 model with input ``(None, H, W, C)`` to a float32 TFLite flatbuffer.

    Goes through a SavedModel (Keras ``ExportArchive``), the path that freezes the weights into
    the flatbuffer: converting a ``tf.function`` directly kept them as uninitialised resource
    variables here and the interpreter returned NaN.
    """
    import functools
    import tempfile

    import keras
    import tensorflow as tf

    spec = tf.TensorSpec([None, *keras_model.input_shape[1:]], tf.float32, name="slice")
    with tempfile.TemporaryDirectory(prefix="tflite-export-") as saved_model_dir:
        archive = keras.export.ExportArchive()
        archive.track(keras_model)
        archive.add_endpoint(
            "serve", functools.partial(keras_model.__call__, training=False), input_signature=[spec]
        )
        archive.write_out(saved_model_dir, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        return bytes(converter.convert())


class TFLiteRunner:
    """One LiteRT interpreter (XNNPACK, all cores), called ``invoke_batch`` slices at a time."""

    name = "tflite"

    def __init__(
        self, flatbuffer: bytes, num_threads: int | None = None, invoke_batch: int = INVOKE_BATCH
    ) -> None:
        self.invoke_batch = invoke_batch
        self._threads = num_threads or os.cpu_count() or 1
        self._interpreter = _interpreter_class()(
            model_content=flatbuffer, num_threads=self._threads
        )
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch = -1
        self._lock = threading.Lock()  # an interpreter is not thread-safe

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for a float32 ``(N, H, W, C)`` batch."""
        step, count = self.invoke_batch, x.shape[0]
        if count > step:  # whole chunks only (the tail zero-padded): no re-allocation per size
            padded = np.zeros((-(-count // step) * step, *x.shape[1:]), np.float32)
            padded[:count] = x
            chunks = [self.predict(padded[i : i + step]) for i in range(0, len(padded), step)]
            return np.concatenate(chunks)[:count]
        x = np.ascontiguousarray(x, dtype=np.float32)
        with self._lock:
            if x.shape[0] != self._batch:
                self._interpreter.resize_tensor_input(self._input, list(x.shape), strict=False)
                self._interpreter.allocate_tensors()
                self._batch = x.shape[0]
            self._interpreter.set_tensor(self._input, x)
            self._interpreter.invoke()
            return np.array(self._interpreter.get_tensor(self._output), dtype=np.float32)


def probe_inputs(input_shape: tuple[int, ...], count: int = PROBE_INPUTS) -> np.ndarray:
    """Deterministic probe batch in [0, 1]: noise, a ramp, all air and all soft tissue."""
    size_h, size_w, channels = input_shape
    rng = np.random.default_rng(20200311)
    probes = [rng.random((size_h, size_w, channels), dtype=np.float32)]
    ramp = np.linspace(0.0, 1.0, size_h * size_w, dtype=np.float32).reshape(size_h, size_w, 1)
    probes += [np.repeat(ramp, channels, axis=-1)]
    probes += [np.zeros((size_h, size_w, channels), np.float32)]
    probes += [np.full((size_h, size_w, channels), 0.55, np.float32)]
    while len(probes) < count:
        probes.append(rng.random((size_h, size_w, channels), dtype=np.float32))
    return np.stack(probes[:count])


def max_difference(keras_model: Any, runner: TFLiteRunner, x: np.ndarray) -> float:
    """Largest absolute probability difference between Keras and ``runner`` on ``x``."""
    expected = np.asarray(keras_model(x, training=False), dtype=np.float32)
    actual = runner.predict(x)
    if actual.shape != expected.shape:
        raise RuntimeMismatch(f"output shape {actual.shape} differs from Keras {expected.shape}")
    return float(np.max(np.abs(actual - expected)))


def load_tflite(keras_model: Any, model_sha256: str, cache_dir: Path | None) -> TFLiteRunner:
    """Convert (or reuse the cached conversion of) ``keras_model`` and check it against Keras.

    Raises
    ------
    RuntimeMismatch
        If conversion fails or the probabilities differ by more than ``TOLERANCE``.
    """
    cached = None
    if cache_dir is not None:
        cached = cache_dir / f"{model_sha256[:32]}-{CONVERTER_TAG}.tflite"
    try:
        if cached is not None and cached.is_file():
            flatbuffer = cached.read_bytes()
        else:
            flatbuffer = convert_to_tflite(keras_model)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                write_atomic(cached, flatbuffer)
        runner = TFLiteRunner(flatbuffer)
        diff = max_difference(keras_model, runner, probe_inputs(tuple(keras_model.input_shape[1:])))
    except RuntimeMismatch:
        raise
    except Exception as exc:  # converter and interpreter raise many types
        raise RuntimeMismatch(f"LiteRT conversion failed: {type(exc).__name__}: {exc}") from exc
    if not diff <= TOLERANCE:
        if cached is not None:
            cached.unlink(missing_ok=True)
        raise RuntimeMismatch(f"LiteRT differs from Keras by {diff:.2e} > {TOLERANCE:g}")
    logger.info("LiteRT/XNNPACK runtime in use (max probability difference to Keras %.1e)", diff)
    return runner


def select_runtime(
    keras_model: Any, runtime: RuntimeName, model_sha256: str, cache_dir: Path | None
) -> TFLiteRunner | None:
    """The faster runtime for ``keras_model``, or None for Keras (``auto`` falls back, logged).

    Raises
    ------
    ModelError
        ``runtime="tflite"`` was asked for explicitly and cannot be used.
    """
    if runtime == "keras":
        return None
    try:
        return load_tflite(keras_model, model_sha256, cache_dir)
    except RuntimeMismatch as exc:
        if runtime == "tflite":
            raise ModelError(f"runtime tflite requested but unusable: {exc}") from exc
        logger.warning("falling back to Keras: %s", exc)
        return None
