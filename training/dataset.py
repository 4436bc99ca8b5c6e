"""Training data stage: labelled slices and series -> one manifest -> arrays via ``node.preprocess``.

Every reader returns ``list[Row]``; a manifest CSV is the same rows on disk.  Images are never
loaded here except through ``node.preprocess`` (``image_file_to_input`` for 8-bit slices,
``read_dicom`` + ``hounsfield`` + ``hu_to_input`` for DICOM), so training sees exactly what the
node sees.  Splits are by patient: a patient never crosses train/val/test.
"""

from __future__ import annotations

import csv
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from node.preprocess import (
    LUNG_WINDOW,
    Window,
    hounsfield,
    hu_to_input,
    image_file_to_input,
    read_dicom,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
COVID = "COVID-19"
NORMAL = "Normal"
PNEUMONIA = "Pneumonia"
NON_COVID = "non-COVID"
COVIDX_CLASSES = (NORMAL, PNEUMONIA, COVID)  # COVIDx CT class ids 0, 1, 2
SPLITS = ("train", "val", "test")

_LABEL_ALIASES = {
    "covid": COVID,
    "covid-19": COVID,
    "covid19": COVID,
    "ncp": COVID,
    "normal": NORMAL,
    "cp": PNEUMONIA,
    "cap": PNEUMONIA,
    "pneumonia": PNEUMONIA,
    "noncovid": NON_COVID,
    "non-covid": NON_COVID,
    "non_covid": NON_COVID,
}


@dataclass(frozen=True)
class Row:
    """One labelled slice: a manifest line."""

    path: str
    label: str
    patient_id: str
    source: str
    kind: str = "image"  # "image" (8-bit, already windowed) or "dicom" (Hounsfield units)
    slice_label: int | None = None  # 1 = infection marked on this slice, 0 = not, None = unknown
    z: float | None = None
    official_split: str | None = None
    series_uid: str | None = None
    split: str | None = None
    subgroup: str | None = None  # e.g. MosMed severity CT-0..CT-4, for per-subgroup metrics


def canonical_label(raw: str) -> str:
    """Map a dataset's label spelling to COVID-19 / Normal / Pneumonia / non-COVID.

    Unknown non-COVID findings (e.g. ``lung_cancer_dx(not COVID)``) become ``non-COVID``.
    """
    key = raw.strip().lower()
    if key in _LABEL_ALIASES:
        return _LABEL_ALIASES[key]
    if "not covid" in key or ("non" in key and "covid" in key):
        return NON_COVID
    raise ValueError(f"unknown label {raw!r}")


def class_index(label: str, classes: Sequence[str]) -> int | None:
    """Index of ``label`` in the model's ``classes``; None where the label does not fit them.

    A two-class model with a ``non-COVID`` class takes every non-COVID finding into it.
    """
    if label in classes:
        return list(classes).index(label)
    if label != COVID and NON_COVID in classes:
        return list(classes).index(NON_COVID)
    return None


# --------------------------------------------------------------------------------------- readers


def read_image_folders(root: Path, source: str) -> list[Row]:
    """Folder-per-class images: ``root/<label>/*.png``; each image is its own patient."""
    rows = []
    for class_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        label = canonical_label(class_dir.name)
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                pid = f"{source}:{path.relative_to(root).with_suffix('')}"
                rows.append(Row(str(path.resolve()), label, pid, source))
    return rows


def _kind_of(path: Path) -> str:
    return "image" if path.suffix.lower() in IMAGE_SUFFIXES else "dicom"


def read_csv_manifest(
    csv_path: Path, source: str | None = None, subgroup_column: str | None = None
) -> list[Row]:
    """A CSV with ``path,label[,patient_id][,official_split][,slice_infection_label][,z]``.

    Paths are relative to the CSV.  A path naming a folder stands for every DICOM file in it (a
    series labelled as a whole).  Without ``patient_id`` each file is its own patient.
    ``subgroup_column`` names a column (e.g. ``mosmed_category``) kept as ``Row.subgroup``.
    """
    csv_path = Path(csv_path)
    src = source or csv_path.parent.name
    rows: list[Row] = []
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if subgroup_column and subgroup_column not in (reader.fieldnames or []):
            missing.add(subgroup_column)
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}")
        for line in reader:
            path = (csv_path.parent / line["path"]).resolve()
            label = canonical_label(line["label"])
            pid = line.get("patient_id") or line.get("patient_folder") or path.stem
            if path.is_dir():
                rows.extend(read_dicom_series(path, label, f"{src}:{pid}", src))
                continue
            slice_label = line.get("slice_infection_label")
            z = line.get("z")
            rows.append(
                Row(
                    str(path),
                    label,
                    f"{src}:{pid}",
                    src,
                    kind=_kind_of(path),
                    slice_label=int(slice_label) if slice_label not in (None, "") else None,
                    z=float(z) if z not in (None, "") else None,
                    official_split=line.get("official_split") or None,
                    series_uid=line.get("SeriesInstanceUID") or None,
                    subgroup=(line[subgroup_column] or None) if subgroup_column else None,
                )
            )
    return rows


def covidx_patient_id(filename: str) -> str:
    """COVIDx CT file names are ``<prefix>_<patient>_<scan>_<slice>.png``: drop scan and slice."""
    parts = Path(filename).stem.split("_")
    return "_".join(parts[:-2]) if len(parts) > 2 else Path(filename).stem


def read_covidx(
    label_file: Path, image_dir: Path, metadata_csv: Path | None = None, source: str = "covidx"
) -> list[Row]:
    """COVIDx CT label file (``filename class xmin ymin xmax ymax``, class 0/1/2).

    ``metadata.csv`` (optional) maps a ``patient id`` column to its ``source`` dataset, which is
    appended to the row's source (e.g. ``covidx/CNCB``); patients missing from it keep ``source``.
    """
    sources: dict[str, str] = {}
    if metadata_csv is not None:
        with open(metadata_csv, newline="") as fh:
            for line in csv.DictReader(fh):
                pid = line.get("patient id") or line.get("patient_id")
                if pid:
                    sources[pid.strip()] = (line.get("source") or "").strip()
    rows = []
    split = Path(label_file).stem.split("_")[0].lower()
    official = {"train": "train", "val": "val", "test": "test"}.get(split)
    for n, text in enumerate(Path(label_file).read_text().splitlines(), 1):
        if not text.strip():
            continue
        parts = text.split()
        if len(parts) != 6:
            raise ValueError(f"{label_file}:{n}: expected 6 fields, got {len(parts)}")
        filename, cls = parts[0], int(parts[1])
        if cls not in (0, 1, 2):
            raise ValueError(f"{label_file}:{n}: class {cls} is not 0, 1 or 2")
        pid = covidx_patient_id(filename)
        sub = sources.get(pid)
        src = f"{source}/{sub}" if sub else source
        rows.append(
            Row(
                str((Path(image_dir) / filename).resolve()),
                COVIDX_CLASSES[cls],
                f"{source}:{pid}",
                src,
                official_split=official,
            )
        )
    return rows


def read_dicom_series(
    folder: Path,
    label: str,
    patient_id: str | None = None,
    source: str = "dicom",
    slice_labels: dict[str, int] | None = None,
) -> list[Row]:
    """Every DICOM file under ``folder`` (one or more series) with one series label.

    ``slice_labels`` maps a file name to 1/0 (infection marked on that slice or not).
    """
    import pydicom

    rows = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        if path.suffix.lower() in IMAGE_SUFFIXES or path.suffix.lower() in (".csv", ".txt", ".md"):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as exc:  # pydicom raises many types for non-DICOM files
            logger.debug("skipping %s: %s", path, exc)
            continue
        if "SeriesInstanceUID" not in ds:
            continue
        position = ds.get("ImagePositionPatient")
        z = float(position[2]) if position else float(ds.get("SliceLocation", 0.0) or 0.0)
        pid = patient_id or f"{source}:{ds.get('PatientID', Path(folder).name)}"
        rows.append(
            Row(
                str(path.resolve()),
                label,
                pid,
                source,
                kind="dicom",
                slice_label=(slice_labels or {}).get(path.name),
                z=z,
                series_uid=str(ds.SeriesInstanceUID),
            )
        )
    return rows


# ------------------------------------------------------------------------------ manifest on disk


def write_manifest(rows: Iterable[Row], csv_path: Path) -> None:
    names = [f.name for f in fields(Row)]
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})


def read_manifest(csv_path: Path) -> list[Row]:
    """Read a manifest written by ``write_manifest``."""
    rows = []
    with open(csv_path, newline="") as fh:
        for line in csv.DictReader(fh):
            rows.append(
                Row(
                    path=line["path"],
                    label=line["label"],
                    patient_id=line["patient_id"],
                    source=line["source"],
                    kind=line.get("kind") or "image",
                    slice_label=int(line["slice_label"]) if line.get("slice_label") else None,
                    z=float(line["z"]) if line.get("z") else None,
                    official_split=line.get("official_split") or None,
                    series_uid=line.get("series_uid") or None,
                    split=line.get("split") or None,
                    subgroup=line.get("subgroup") or None,
                )
            )
    return rows


# ---------------------------------------------------------------------------------------- splits


def split_by_patient(
    rows: Sequence[Row],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    use_official: bool = True,
    fixed: str | None = None,
) -> list[Row]:
    """Give every row a ``split``; all rows of one patient get the same one.

    Patients whose rows carry an ``official_split`` keep it (``use_official``).  ``fixed`` puts
    every patient in that split.  The others are shuffled (seeded) within each label and carved
    into test, val and train by the fractions, so each split keeps the label mix.
    """
    by_patient: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_patient[row.patient_id].append(row)
    assigned: dict[str, str] = {}
    free: dict[str, list[str]] = defaultdict(list)
    for pid, prow in sorted(by_patient.items()):
        officials = {r.official_split for r in prow if r.official_split}
        if len(officials) > 1:
            raise ValueError(f"patient {pid} has rows in several official splits: {officials}")
        if fixed:
            assigned[pid] = fixed
        elif use_official and officials:
            assigned[pid] = officials.pop()
        else:
            majority = Counter(r.label for r in prow).most_common(1)[0][0]
            free[majority].append(pid)
    rng = random.Random(seed)
    for label in sorted(free):
        pids = free[label]
        rng.shuffle(pids)
        n_test = round(len(pids) * test_fraction)
        n_val = round(len(pids) * val_fraction)
        for i, pid in enumerate(pids):
            assigned[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return [replace(row, split=assigned[row.patient_id]) for row in rows]


def check_patient_disjoint(rows: Sequence[Row]) -> None:
    """Raise if any patient has rows in more than one split."""
    seen: dict[str, set[str | None]] = defaultdict(set)
    for row in rows:
        seen[row.patient_id].add(row.split)
    crossing = {pid: s for pid, s in seen.items() if len(s) > 1}
    if crossing:
        raise ValueError(f"patients crossing splits: {dict(list(crossing.items())[:5])}")


# --------------------------------------------------------------------------------------- loading


def load_native(row: Row) -> np.ndarray:
    """The slice before windowing/resizing: Hounsfield units (DICOM) or [0, 1] grey (8-bit)."""
    if row.kind == "dicom":
        return hounsfield(read_dicom(row.path))
    from PIL import Image

    from node.preprocess import grey_image_to_unit

    with Image.open(row.path) as img:
        arr = np.asarray(img.convert("L") if img.mode not in ("L", "RGB", "RGBA") else img)
    return grey_image_to_unit(arr)


def load_input(
    row: Row, size: int, window: Window = LUNG_WINDOW, crop: str = "none", normalise: str = "none"
) -> np.ndarray:
    """One row -> the model input, by the node's own functions."""
    if row.kind == "dicom":
        return hu_to_input(hounsfield(read_dicom(row.path)), size, window, crop, normalise)
    return image_file_to_input(row.path, size, crop, normalise)


def load_inputs(
    rows: Sequence[Row],
    size: int,
    window: Window = LUNG_WINDOW,
    crop: str = "none",
    normalise: str = "none",
) -> np.ndarray:
    """Rows -> ``(n, size, size)`` float32 model inputs."""
    out = np.empty((len(rows), size, size), np.float32)
    for i, row in enumerate(rows):
        out[i] = load_input(row, size, window, crop, normalise)
    return out


def labels_array(rows: Sequence[Row], classes: Sequence[str]) -> np.ndarray:
    idx = [class_index(r.label, classes) for r in rows]
    if any(i is None for i in idx):
        bad = sorted({r.label for r, i in zip(rows, idx, strict=True) if i is None})
        raise ValueError(f"labels {bad} do not fit classes {list(classes)}")
    return np.asarray(idx, np.int64)


def sample_weights(
    labels: np.ndarray, sources: Sequence[str], source_weight: dict[str, float] | None = None
) -> np.ndarray:
    """Per-slice weights: classes balanced over all sources, times a per-source multiplier.

    A weight is ``source_weight[source] / (n_classes * count(class))``, scaled to mean 1, so
    each class carries the same total weight while sources keep their size (times the
    multiplier, default 1).
    """
    y = np.asarray(labels)
    present = np.unique(y)
    counts = {c: int((y == c).sum()) for c in present}
    mult = source_weight or {}
    w = np.array(
        [
            mult.get(s, 1.0) / (len(present) * counts[c])
            for s, c in zip(sources, y.tolist(), strict=True)
        ],
        np.float64,
    )
    return (w * len(w) / w.sum()).astype(np.float32)
