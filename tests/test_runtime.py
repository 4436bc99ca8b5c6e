"""LiteRT runtime: the exported model.tflite runs without TensorFlow when verified; otherwise a
conversion at load that agrees with Keras, cached by sha256; Keras on mismatch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from node import preprocess, runtime
from node.errors import ModelError
from node.infer import load_model
from node.model_spec import MODEL_FILE, SPEC_FILE, TFLITE_FILE, file_sha256, load_spec


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


# --------------------------------------------------------------------------------------------
# The model.tflite that training exports, run with LiteRT alone

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "covid-ct-lite0" / "1.1.0"

# The node's own load path (config default runtime) in a fresh interpreter: score one real slice
# and report which heavy modules got imported.
CHILD = """
import json, sys
from pathlib import Path
from node import preprocess
from node.config import AnalysisSettings
from node.infer import load_model
runtime = AnalysisSettings().runtime
model = load_model(Path(sys.argv[1]), runtime=runtime, cache_dir=Path(sys.argv[2]))
hu = preprocess.hounsfield(preprocess.read_dicom(sys.argv[3]))
probs = model.predict(model.spec.hu_to_input(hu)[None])
print(json.dumps({
    "runtime": model.runtime,
    "keras_model": model.keras_model is not None,
    "probabilities": probs.tolist(),
    "heavy": sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "keras"}),
}))
"""


@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its model.tflite exported the way training exports it."""
    from tests.models import make_tiny_model
    from training.export import export_existing

    directory = make_tiny_model(tmp_path_factory.mktemp("tiny-exported"), ["non-COVID", "COVID-19"])
    export_existing(directory)
    return directory


def _copy(model_dir: Path, dst: Path) -> Path:
    shutil.copytree(model_dir, dst)
    return dst


def test_shipped_model_runs_on_litert_without_tensorflow(tmp_path: Path) -> None:
    from tests.peers import TCIA_SIEMENS_B70F, require_shared_data, series_files

    require_shared_data(TCIA_SIEMENS_B70F)
    spec = load_spec(SHIPPED)
    assert spec.tflite is not None and (SHIPPED / TFLITE_FILE).is_file()
    assert file_sha256(SHIPPED / TFLITE_FILE) == spec.tflite.sha256
    assert spec.tflite.keras_sha256 == spec.sha256
    assert spec.tflite.max_abs_prob_diff <= runtime.TOLERANCE
    real_slice = series_files(TCIA_SIEMENS_B70F)[15]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(SHIPPED), str(tmp_path / "cache"), str(real_slice)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert child["heavy"] == [], f"imported {child['heavy']} with a verified model.tflite"
    assert (child["runtime"], child["keras_model"]) == ("tflite", False)
    assert not (tmp_path / "cache").exists(), "nothing converted at load"
    # the same slice through Keras (this process has TensorFlow): the same probabilities
    keras_model = load_model(SHIPPED, runtime="keras")
    hu = preprocess.hounsfield(preprocess.read_dicom(real_slice))
    expected = keras_model.predict(spec.hu_to_input(hu)[None])
    assert np.abs(np.asarray(child["probabilities"]) - expected).max() <= runtime.TOLERANCE


def test_exported_tflite_is_used_without_keras(exported_tiny: Path) -> None:
    spec = load_spec(exported_tiny)
    assert spec.tflite is not None
    assert spec.tflite.sha256 == file_sha256(exported_tiny / TFLITE_FILE)
    assert len(spec.tflite.probe_probabilities) == 8
    model = load_model(exported_tiny, runtime="auto", cache_dir=None)
    assert (model.runtime, model.keras_model) == ("tflite", None)
    reference = load_model(exported_tiny, runtime="keras")
    batch = np.random.default_rng(5).random((3, 32, 32), dtype=np.float32)
    assert np.abs(model.predict(batch) - reference.predict(batch)).max() <= runtime.TOLERANCE


def test_tampered_tflite_falls_back_to_conversion_with_a_log_line(
    exported_tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = _copy(exported_tiny, tmp_path / "model")
    data = bytearray((model_dir / TFLITE_FILE).read_bytes())
    data[-100] ^= 0xFF
    (model_dir / TFLITE_FILE).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="node.infer"):
        model = load_model(model_dir, runtime="auto", cache_dir=tmp_path / "cache")
    assert "shipped LiteRT model not used" in caplog.text
    assert "differs from model.json tflite.sha256" in caplog.text
    assert "(corrupted or replaced)" in caplog.text
    assert model.runtime == "tflite" and model.keras_model is not None  # converted at load
    assert list((tmp_path / "cache").glob("*.tflite"))


def test_probe_probabilities_that_litert_does_not_reproduce_fall_back(
    exported_tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = _copy(exported_tiny, tmp_path / "model")
    raw = json.loads((model_dir / SPEC_FILE).read_text())
    raw["tflite"]["probe_probabilities"][1] = [0.0, 1.0]
    (model_dir / SPEC_FILE).write_text(json.dumps(raw, indent=2))
    with caplog.at_level(logging.WARNING, logger="node.infer"):
        model = load_model(model_dir, runtime="auto", cache_dir=tmp_path / "cache")
    assert "differs from the recorded Keras probabilities" in caplog.text
    assert model.keras_model is not None


def test_no_verified_tflite_and_no_tensorflow_is_a_clear_model_error(
    exported_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = _copy(exported_tiny, tmp_path / "model")
    (model_dir / TFLITE_FILE).unlink()
    monkeypatch.setitem(sys.modules, "keras", None)  # import keras -> ImportError
    with pytest.raises(ModelError, match=r"no verified model\.tflite .* not installed"):
        load_model(model_dir, runtime="auto", cache_dir=tmp_path / "cache")
    # with the verified file back, no TensorFlow is needed
    shutil.copy(exported_tiny / TFLITE_FILE, model_dir / TFLITE_FILE)
    assert load_model(model_dir, runtime="auto").runtime == "tflite"
