"""Model metadata: the schema of ``models/<name>/<version>/model.json``.

``training/train.py`` writes it, ``node/infer.py`` reads it.  Everything the node must do exactly
as training did (window, input size, crop, slice selection, the series rule) lives here and
nowhere else, so a new model can change them without a code change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from node import preprocess
from node.config import describe_errors
from node.errors import ModelError
from node.preprocess import PREPROCESSING_VERSION, Window

MODEL_FILE = "model.keras"
SPEC_FILE = "model.json"
TFLITE_FILE = "model.tflite"


class WindowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    level: float = -600.0
    width: float = Field(1500.0, gt=0)

    def as_window(self) -> Window:
        return Window(self.level, self.width)


class SliceSelection(BaseModel):
    """Which slices of a series are classified (HU based, see ``preprocess.lung_fraction``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    min_lung_fraction: float = Field(0.05, ge=0, le=1)
    min_slices: int = Field(5, ge=1)


class SeriesRule(BaseModel):
    """How slice probabilities of the positive class become one series score and verdict.

    ``top_k_mean``: mean of the ``k`` highest slice scores; ``fraction_above``: fraction of
    selected slices whose score is at least ``slice_threshold``.  The series is positive when the
    series score is at least ``series_threshold``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["top_k_mean", "fraction_above"] = "top_k_mean"
    k: int = Field(5, ge=1)
    slice_threshold: float = Field(0.5, ge=0, le=1)
    series_threshold: float = Field(0.5, ge=0, le=1)
    justification: str = ""


class AnalysisSpec(BaseModel):
    """The Hounsfield analysis (``node.lungs``, ``node.opacity``, ``node.assess``) of a model.

    Few parameters: ``po_threshold`` is fitted by ``training.analysis`` with whole sites held
    out; the others are the RSNA pattern's reading in numbers, set a priori (their
    ``justification`` says why) and not tuned on the shared series.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: str = "1"
    po_threshold: float = Field(0.5, gt=0, le=100, description="PO (%) that counts as opacity")
    bilateral_fraction: float = Field(
        0.5, ge=0, le=1, description="each lung needs this share of po_threshold to be involved"
    )
    peripheral_ratio: float = Field(1.5, gt=0, description="peripheral/central PO for 'typical'")
    ground_glass_share: float = Field(
        0.5, ge=0, le=1, description="below this share of ground glass, consolidation dominates"
    )
    solitary_focality: float = Field(
        0.8, ge=0, le=1, description="one 3-D focus holding this share of opacity is solitary"
    )
    cnn_weight: float = Field(0.0, ge=0, description="CNN series score's weight, in PO points")
    min_extent_mm: float = Field(
        100.0, ge=0, description="lung covered along z below which the SR says 'partial'"
    )
    justification: str = ""
    evaluation: dict[str, object] = Field(default_factory=dict)


class ReferenceSummary(BaseModel):
    """What the analysis was validated on, for drift monitoring (``node.drift``): written by
    ``training.analysis --write-reference`` from the series its threshold was fitted on.

    ``po`` and ``cnn_score`` are the series' values (sorted); ``mix`` counts the series per
    input feature value (``node.drift.MIX_FEATURES``: manufacturer, scanner model, kernel,
    slice thickness band, contrast).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = ""
    series: int = Field(0, ge=0)
    po: list[float] = []
    cnn_score: list[float] = []
    mix: dict[str, dict[str, int]] = {}


class TFLiteExport(BaseModel):
    """``model.tflite`` beside ``model.keras``: written by ``training/export.py``, its agreement
    with Keras measured there; the node runs it with LiteRT alone (no TensorFlow) when its
    sha256 matches and LiteRT reproduces ``probe_probabilities`` (``node.runtime.load_shipped``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    sha256: str = Field(min_length=64, max_length=64)
    keras_sha256: str = Field(description="sha256 of the model.keras it was converted from")
    size_bytes: int = Field(ge=0)
    max_abs_prob_diff: float = Field(
        ge=0, description="LiteRT vs Keras on the probe inputs, measured at export"
    )
    probe_probabilities: list[list[float]] = Field(
        description="Keras's probabilities for node.runtime.probe_inputs(), checked at load"
    )
    converter: str = Field(description="e.g. 'tensorflow 2.21.0'")
    runtime: str = Field(description="e.g. 'ai-edge-litert 2.3.0'")


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())

    name: str
    version: str
    classes: list[str] = Field(min_length=2)
    positive_class: str
    input_size: int = Field(ge=32, le=1024)
    window: WindowSpec = WindowSpec()
    crop: Literal["none", "body"] = Field(
        "none", description="preprocess.crop_image before resizing: hu_to_input(..., crop=)"
    )
    normalise: Literal["none", "equalise"] = Field(
        "none",
        description="preprocess.normalise_image after the crop: hu_to_input(..., normalise=)",
    )
    preprocessing_version: int
    selection: SliceSelection = SliceSelection()
    series_rule: SeriesRule = SeriesRule()
    threshold: float = Field(0.5, ge=0, le=1, description="slice-level operating point")
    sha256: str = ""
    notice: str = Field(
        "", description="written into every SR this model makes (e.g. its measured limits)"
    )
    analysis: AnalysisSpec = AnalysisSpec()
    reference: ReferenceSummary | None = Field(
        None, description="input and score summary of the validation series (drift monitoring)"
    )
    tflite: TFLiteExport | None = Field(
        None, description="the exported LiteRT flatbuffer and its measured agreement with Keras"
    )

    @model_validator(mode="after")
    def _positive_is_a_class(self) -> ModelSpec:
        if self.positive_class not in self.classes:
            raise ValueError(
                f"positive_class {self.positive_class!r} not in classes {self.classes}"
            )
        return self

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class)

    def hu_to_input(self, hu: np.ndarray) -> np.ndarray:
        """A slice in HU -> this model's input: every preprocessing field of the spec applied.

        The node, the web console and evaluation call this (never ``preprocess`` with their own
        arguments), so a model that changes window, size, crop or normalisation needs no code.
        """
        return preprocess.hu_to_input(
            hu, self.input_size, self.window.as_window(), crop=self.crop, normalise=self.normalise
        )

    def image_file_to_input(self, path: str | Path) -> np.ndarray:
        """An 8-bit PNG/JPG slice -> this model's input (same crop/normalisation as DICOM)."""
        return preprocess.image_file_to_input(
            path, self.input_size, crop=self.crop, normalise=self.normalise
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_spec(model_dir: Path, setting: str = "model_dir") -> ModelSpec:
    """Read and check ``model.json``; the error names the setting, the directory and the bad
    field."""
    spec_path = model_dir / SPEC_FILE
    if not model_dir.is_dir():
        raise ModelError(
            f"{setting}: {model_dir} does not exist (a model directory holds {MODEL_FILE} "
            f"and {SPEC_FILE})"
        )
    if not spec_path.is_file():
        raise ModelError(f"{spec_path}: missing (a model directory needs {SPEC_FILE})")
    if not (model_dir / MODEL_FILE).is_file():
        raise ModelError(f"{model_dir / MODEL_FILE}: missing")
    try:
        raw = json.loads(spec_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{spec_path}: not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    try:
        spec = ModelSpec.model_validate(raw)
    except ValidationError as exc:
        lines = describe_errors(exc)
        raise ModelError(f"{spec_path}: invalid:\n  " + "\n  ".join(lines)) from None
    if spec.preprocessing_version != PREPROCESSING_VERSION:
        raise ModelError(
            f"{spec_path}: preprocessing_version {spec.preprocessing_version} but this node "
            f"implements {PREPROCESSING_VERSION}; retrain or update the node"
        )
    return spec


def write_spec(model_dir: Path, spec: ModelSpec) -> ModelSpec:
    """Write ``model.json`` with the sha256 of the saved Keras file filled in."""
    digest = file_sha256(model_dir / MODEL_FILE)
    final = spec.model_copy(update={"sha256": digest})
    (model_dir / SPEC_FILE).write_text(json.dumps(final.model_dump(mode="json"), indent=2) + "\n")
    return final
