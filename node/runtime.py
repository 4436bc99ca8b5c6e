"""Inference stage, runtime: the model in LiteRT (TFLite) with XNNPACK, without TensorFlow.

Measured on the 2-core machines (``python -m bench inference``), the same network runs several
times faster in the LiteRT interpreter with its default XNNPACK delegate than in Keras, and the
node starts faster and smaller without TensorFlow (``python -m bench.startup``).  In order:

1. ``model.tflite`` shipped beside ``model.keras`` (``training/export.py``): used with LiteRT
   alone, TensorFlow never imported, when its sha256 is the one ``model.json`` records
   (``tflite``), it was exported from this ``model.keras``, and LiteRT here reproduces the Keras
   probabilities recorded for the probe inputs (max difference ``TOLERANCE``).
2. Otherwise (none shipped, or it fails a check, logged): TensorFlow loads ``model.keras``,
   converts it to a flatbuffer cached under ``cache_dir`` by the Keras file's sha256, and uses it
   only if its probabilities match Keras on the probe inputs; else Keras itself, logged.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from node.errors import ModelError
from node.spool import write_atomic

if TYPE_CHECKING:
    from node.model_spec import ModelSpec

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


def default_threads() -> int:
    """Interpreter threads: all cores.

    In the pipeline the interpreter scores slices while the Hounsfield analysis runs in the other
    thread (``node.pipeline._measure``).  On the shared 2-core machine, 2 interpreter threads
    beside it finished a 300-slice series sooner than 1 in the quietest measurement (3.1 s vs
    3.8 s, both ahead of the 4.7 s of the two one after the other), though not in every busy
    one; the outputs are identical either way (``python -m bench.analysis``).
    """
    return os.cpu_count() or 1


class TFLiteRunner:
    """One LiteRT interpreter (XNNPACK), called ``invoke_batch`` slices at a time."""

    name = "tflite"

    def __init__(
        self, flatbuffer: bytes, num_threads: int | None = None, invoke_batch: int = INVOKE_BATCH
    ) -> None:
        self.invoke_batch = invoke_batch
        self.threads = num_threads or default_threads()
        self._interpreter = _interpreter_class()(model_content=flatbuffer, num_threads=self.threads)
        inp, out = (
            self._interpreter.get_input_details()[0],
            self._interpreter.get_output_details()[0],
        )
        self._input, self._output = inp["index"], out["index"]
        self.input_shape = tuple(int(v) for v in inp["shape"][1:])  # (H, W, C)
        self.classes = int(out["shape"][-1])
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


def versions() -> dict[str, str]:
    """Installed converter and runtime versions, as recorded in ``model.json``'s ``tflite``."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("tensorflow-cpu", "tensorflow", "ai-edge-litert"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


def load_shipped(model_dir: Path, spec: ModelSpec) -> TFLiteRunner:
    """The ``model.tflite`` shipped in ``model_dir``, verified, in LiteRT (no TensorFlow).

    Raises
    ------
    RuntimeMismatch
        Saying why it cannot be used: none recorded in ``model.json`` or none on disk, a sha256
        other than the recorded one (tampered or replaced), exported from another
        ``model.keras``, a shape other than the spec's, or probabilities on the probe inputs
        that differ from the recorded Keras ones by more than ``TOLERANCE``.
    """
    from node.model_spec import TFLITE_FILE, file_sha256

    path = model_dir / TFLITE_FILE
    record = spec.tflite
    if record is None:
        raise RuntimeMismatch(f"model.json records no {TFLITE_FILE}")
    if not path.is_file():
        raise RuntimeMismatch(f"{path} is missing")
    flatbuffer = path.read_bytes()
    digest = file_sha256(path)
    if digest != record.sha256:
        raise RuntimeMismatch(
            f"{path}: sha256 {digest[:12]}... differs from model.json tflite.sha256 "
            f"{record.sha256[:12]}... (corrupted or replaced)"
        )
    if record.keras_sha256 != spec.sha256:
        raise RuntimeMismatch(f"{path} was exported from another model.keras")
    try:
        runner = TFLiteRunner(flatbuffer)
    except Exception as exc:  # the interpreter raises many types on a bad flatbuffer
        reason = f"{path}: LiteRT cannot load it: {type(exc).__name__}: {exc}"
        raise RuntimeMismatch(reason) from exc
    expected_shape = (spec.input_size, spec.input_size, 1)
    if runner.input_shape != expected_shape or runner.classes != len(spec.classes):
        raise RuntimeMismatch(
            f"{path}: input {runner.input_shape} and {runner.classes} classes, model.json says "
            f"{expected_shape} and {len(spec.classes)}"
        )
    expected = np.asarray(record.probe_probabilities, np.float32)
    actual = runner.predict(probe_inputs(expected_shape, len(expected)))
    diff = float(np.max(np.abs(actual - expected))) if actual.shape == expected.shape else np.inf
    if not diff <= TOLERANCE:
        raise RuntimeMismatch(
            f"{path}: LiteRT here differs from the recorded Keras probabilities by {diff:.2e} "
            f"> {TOLERANCE:g}"
        )
    logger.info(
        "LiteRT/XNNPACK runtime from the shipped %s, %d thread(s), without TensorFlow "
        "(probe difference to Keras %.1e here, %.1e at export)",
        TFLITE_FILE,
        runner.threads,
        diff,
        record.max_abs_prob_diff,
    )
    return runner
