"""Benchmarks, shared helpers: the real 300-slice series, the model under test, timing, machine.

The series is built in a temporary folder from real slices in ``../shared/data`` (never copied into
the repository): the 30-slice TCIA Siemens B40f series, cycled, each copy re-identified with new
UIDs and stacked at a regular 1.25 mm spacing, so the node's series checks accept it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SOURCE_SERIES = (
    SHARED_DATA
    / "ct_dicom"
    / "tcia_lung_pet_ct_dx"
    / "Lung_Dx-A0002"
    / "04-25-2007-NA-ThoraxAThoraxRoutine Adult-34834"
    / "3.000000-ThoraxRoutine  8.0.0  B40f-10983"
)
SPACING_MM = 1.25
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def rounded(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits}g}") if value else 0.0


def time_call(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (perf_counter)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def source_files() -> list[Path]:
    if not SOURCE_SERIES.is_dir():
        raise FileNotFoundError(f"real data not available: {SOURCE_SERIES} is missing")
    return sorted(p for p in SOURCE_SERIES.iterdir() if p.suffix.lower() == ".dcm")


def build_series(dst: Path, count: int, seed: str) -> list[Path]:
    """Write ``count`` re-identified real 512x512 CT slices as one new series into ``dst``.

    The same ``seed`` gives the same UIDs; every slice gets its own SOP Instance UID and position.
    """
    sources = [p.read_bytes() for p in source_files()]
    dst.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid(entropy_srcs=[seed, "study"])
    series_uid = generate_uid(entropy_srcs=[seed, "series"])
    out = []
    for i in range(count):
        ds = pydicom.dcmread(BytesIO(sources[i % len(sources)]))
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "sop", str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        z = 100.0 - i * SPACING_MM
        ds.ImagePositionPatient = [x, y, z]
        ds.SliceLocation = z
        ds.SliceThickness = SPACING_MM
        ds.InstanceNumber = i + 1
        path = dst / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=False)
        out.append(path)
    return out


def series_bytes(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


# --------------------------------------------------------------------------------------------
# The model under test


def shipped_model_dir() -> Path | None:
    """The shipped model (``models/<name>/<version>/`` with model.keras + model.json), if any."""
    candidates = sorted((REPO / "models").glob("*/*/model.json"))
    for spec in reversed(candidates):
        if (spec.parent / "model.keras").is_file():
            return spec.parent
    return None


def standin_model_dir(dst: Path) -> Path:
    """The shipped architecture (Lite0 @ 224, ImageNet backbone, untrained head) + model.json.

    Used while the shipped model does not exist yet; same layers and size, so the same speed.
    """
    from node.model_spec import MODEL_FILE, ModelSpec, SeriesRule, SliceSelection, write_spec
    from node.preprocess import PREPROCESSING_VERSION
    from training.backbone import lite0_weights_path
    from training.model import build_classifier

    dst.mkdir(parents=True, exist_ok=True)
    try:
        weights: Path | None = lite0_weights_path()
    except FileNotFoundError:
        weights = None
    model = build_classifier(2, 224, weights)
    model.save(dst / MODEL_FILE)
    spec = ModelSpec(
        name="standin-lite0",
        version="0.0.0",
        classes=["non-COVID", "COVID-19"],
        positive_class="COVID-19",
        input_size=224,
        preprocessing_version=PREPROCESSING_VERSION,
        selection=SliceSelection(min_lung_fraction=0.05, min_slices=5),
        series_rule=SeriesRule(kind="top_k_mean", k=5, series_threshold=0.5),
    )
    write_spec(dst, spec)
    return dst


def model_under_test(workdir: Path) -> tuple[Path, str]:
    """(model directory, description): the shipped model if present, else the stand-in."""
    shipped = shipped_model_dir()
    if shipped is not None:
        return shipped, f"shipped model {shipped.relative_to(REPO)}"
    return (
        standin_model_dir(workdir / "standin-model"),
        "stand-in: training.model.build_classifier(2, 224, Lite0 ImageNet weights), untrained head",
    )


# --------------------------------------------------------------------------------------------
# Machine facts and child processes


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }


def run_child(
    module: str, args: Sequence[str] = (), env: dict[str, str] | None = None, timeout: float = 1800
) -> dict[str, Any]:
    """Run ``python -m <module> <args>`` and return the JSON object on its last stdout line."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{module} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        )
    return dict(json.loads(lines[-1]))


def emit(result: dict[str, Any]) -> None:
    """Print a child's result as one JSON line (what ``run_child`` reads)."""
    print(json.dumps(result), flush=True)


def target(value: float, limit: float, *, at_least: bool) -> dict[str, Any]:
    holds = value >= limit if at_least else value <= limit
    return {
        "value": rounded(value),
        "target": f"{'>=' if at_least else '<='} {limit:g}",
        "holds": holds,
    }
