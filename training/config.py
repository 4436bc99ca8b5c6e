"""Training configuration: ``training/configs/<name>.yaml`` -> validated, frozen settings.

Relative paths in the YAML are relative to the repository root, so the shipped config reads
``../shared/data`` wherever the checkout lives.  A misspelt key stops the run (``extra=forbid``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from node.model_spec import SeriesRule, SliceSelection, WindowSpec

REPO_ROOT = Path(__file__).resolve().parents[1]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Strict):
    """One data source.

    ``kind``: ``csv`` (path,label[,patient_id]... relative to the CSV; folders are DICOM series),
    ``folders`` (root/<label>/*.png), ``covidx`` (label file + image dir [+ metadata.csv]),
    ``dicom`` (a folder of DICOM series, all with ``label``).
    ``split``: ``official`` (keep the rows' official_split, carve the rest), ``carve`` (patient
    split by the fractions), ``train`` (all patients train; scored leave-one-patient-out when
    ``lopo``), ``test`` (held out entirely).
    """

    name: str
    kind: Literal["csv", "folders", "covidx", "dicom"]
    path: Path
    images: Path | None = None  # covidx: image folder
    metadata: Path | None = None  # covidx: metadata.csv
    label: str | None = None  # dicom: label of every series
    split: Literal["official", "carve", "train", "test"] = "carve"
    lopo: bool = False
    subgroup_column: str | None = Field(
        None,
        description="csv: a column (e.g. mosmed_category) whose values get their own held-out "
        "ROC AUC (that subgroup's positives vs all negatives)",
    )
    weight: float = Field(1.0, gt=0, description="per-slice loss weight multiplier")
    rendered_window: WindowSpec | None = Field(
        None,
        description="8-bit source: the window its publisher rendered Hounsfield units with "
        "(estimated from histograms); its pixels are mapped back to approximate HU and then "
        "rendered exactly like DICOM (model window, window jitter)",
    )
    licence: str = ""
    citation: str = ""

    def resolved(self, p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else REPO_ROOT / p)


class SplitConfig(_Strict):
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.25, ge=0, lt=1)


class AugmentSettings(_Strict):
    rotation_deg: float = 20.0
    zoom: float = 0.2
    shift: float = 0.1
    flip: bool = True
    level_jitter_hu: float = 100.0
    width_jitter: float = 0.2
    contrast: float = 0.2
    brightness: float = 0.08
    gamma: float = 0.25


class OptimiserConfig(_Strict):
    epochs: int = Field(60, ge=0)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    decay_steps: int = Field(100_000, ge=1)
    decay_rate: float = Field(0.96, gt=0, le=1)
    patience: int = Field(10, ge=1)
    monitor: str = "val_loss"


class HeadConfig(OptimiserConfig):
    """Phase 1: frozen backbone; the head trains on cached features of augmented renderings."""

    renderings: int = Field(4, ge=0, description="augmented renderings per training slice")
    l2: float = Field(1e-3, ge=0, description="L2 penalty on the head's kernel")


class FinetuneConfig(OptimiserConfig):
    """Phase 2: the top ``top_blocks`` MBConv blocks train too, on streamed augmented inputs."""

    epochs: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1)
    top_blocks: int = Field(2, ge=0, le=16)
    patience: int = Field(3, ge=1)


class ThresholdConfig(_Strict):
    """Slice operating point: ``fixed`` value, or Youden's J on the validation slices."""

    strategy: Literal["fixed", "youden_val"] = "fixed"
    value: float = Field(0.5, ge=0, le=1)


HOLDOUTS = ("site", "patient")


class TrainConfig(_Strict):
    name: str
    version: str
    seed: int = 1234
    classes: list[str] = Field(min_length=2)
    positive_class: str
    input_size: int = Field(224, ge=32, le=1024)
    window: WindowSpec = WindowSpec()
    crop: Literal["none", "body"] = "none"
    normalise: Literal["none", "equalise"] = "none"
    backbone_weights: Literal["imagenet"] | None = "imagenet"
    dropout: float = 0.2
    sources: list[SourceConfig] = Field(min_length=1)
    split: SplitConfig = SplitConfig()
    selection: SliceSelection = SliceSelection()
    augment: AugmentSettings = AugmentSettings()
    head: HeadConfig = HeadConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    threshold: ThresholdConfig = ThresholdConfig()
    series_rules: list[SeriesRule] = Field(
        default_factory=lambda: [SeriesRule(kind="top_k_mean", k=5)],
        description="candidates; the one with the best leave-one-patient-out series results wins",
    )
    holdout: Literal["site", "patient"] = Field(
        "site",
        description="how ``lopo`` sources are held out for the series rule and the notice: "
        "``site`` (the whole source at a time, as a new hospital) or ``patient``; both are "
        "measured and reported",
    )
    output_root: Path = Path("models")
    work_dir: Path = Path("runs/default")
    max_model_mb: float = 25.0

    def resolved(self, p: Path) -> Path:
        return p if p.is_absolute() else REPO_ROOT / p


def load_config(path: Path) -> TrainConfig:
    data = yaml.safe_load(Path(path).read_text())
    return TrainConfig.model_validate(data)
