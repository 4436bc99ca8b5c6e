"""Series check stage: order the slices along the patient axis and refuse what cannot be analysed.

Raises ``SeriesRejected`` with a reason a radiologist can read ("not analysed: ...") for
non-axial or mixed orientations, gaps, duplicate positions, mixed sizes, multi-frame objects.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from node.errors import SeriesRejected

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Larger slices are refused before any pixel data is decoded (a 65535 x 65535 claim is 8 GiB).
MAX_DIMENSION = 4096
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


@dataclass(frozen=True)
class SliceRef:
    """One slice of a checked series, in body-axis order."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    z: float
    header: Dataset


def read_headers(paths: list[Path]) -> list[tuple[Path, Dataset]]:
    """Headers of every readable file (pixel data not read); unreadable files are reported."""
    headers = []
    unreadable = []
    for path in paths:
        try:
            headers.append((path, pydicom.dcmread(path, stop_before_pixels=True, force=True)))
        except Exception:  # pydicom raises many types on bad files
            unreadable.append(path.name)
    if unreadable:
        logger.warning("%d unreadable file(s) ignored: %s", len(unreadable), unreadable[:5])
    return headers


def _numbers(ds: Dataset, keyword: str, count: int) -> list[float]:
    """``count`` finite numbers from ``keyword``, or SeriesRejected naming the attribute."""
    value = ds.get(keyword)
    multiple = isinstance(value, (list, tuple, pydicom.multival.MultiValue))
    values = list(value) if multiple else [value]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError, OverflowError) as exc:
        raise SeriesRejected(f"{keyword} is not numeric") from exc
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        raise SeriesRejected(f"{keyword} must hold {count} finite number(s), has {len(numbers)}")
    return numbers


def order_and_check(
    headers: list[tuple[Path, Dataset]], *, require_axial: bool, max_gap_factor: float
) -> list[SliceRef]:
    """Sort slices by position along the slice normal and check the geometry.

    Raises
    ------
    SeriesRejected
        With the reason, also for header values that cannot be read as numbers.
    """
    try:
        return _order_and_check(headers, require_axial=require_axial, max_gap_factor=max_gap_factor)
    except (ValueError, TypeError, IndexError, AttributeError, OverflowError) as exc:
        raise SeriesRejected(f"geometry attributes cannot be read: {exc}") from exc


def _order_and_check(
    headers: list[tuple[Path, Dataset]], *, require_axial: bool, max_gap_factor: float
) -> list[SliceRef]:
    if not headers:
        raise SeriesRejected("no readable instances in the series")
    classes = {str(ds.get("SOPClassUID", "")) for _, ds in headers}
    if ENHANCED_CT_IMAGE_STORAGE in classes:
        raise SeriesRejected("Enhanced CT (multi-frame) series are not supported by this model")
    if classes != {CT_IMAGE_STORAGE}:
        raise SeriesRejected(f"series holds non-CT-image objects: SOP classes {sorted(classes)}")
    missing = [p.name for p, ds in headers if "ImageOrientationPatient" not in ds]
    missing += [p.name for p, ds in headers if "ImagePositionPatient" not in ds]
    if missing:
        raise SeriesRejected(
            f"{len(missing)} slice(s) lack Image Orientation/Position (Patient); "
            "slice order cannot be established"
        )
    no_rescale = [
        p.name for p, ds in headers if "RescaleSlope" not in ds or "RescaleIntercept" not in ds
    ]
    if no_rescale:
        raise SeriesRejected(
            f"{len(no_rescale)} slice(s) lack Rescale Slope/Intercept; "
            "Hounsfield units cannot be computed"
        )
    for _, ds in headers:
        _numbers(ds, "RescaleIntercept", 1)
        if _numbers(ds, "RescaleSlope", 1)[0] == 0:
            raise SeriesRejected("Rescale Slope is 0: Hounsfield units cannot be computed")
    orientations = np.array([_numbers(ds, "ImageOrientationPatient", 6) for _, ds in headers])
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise SeriesRejected("slices have different orientations (mixed or reformatted series)")
    row, col = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, col)
    if require_axial and abs(normal[2]) < 0.95:
        plane = (
            "sagittal"
            if abs(normal[0]) > 0.95
            else "coronal"
            if abs(normal[1]) > 0.95
            else "oblique"
        )
        raise SeriesRejected(f"series is {plane}, not axial; the model reads axial slices only")
    sizes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for _, ds in headers}
    if len(sizes) > 1:
        raise SeriesRejected(f"slices have different sizes {sorted(sizes)}")
    rows, columns = next(iter(sizes))
    if not (0 < rows <= MAX_DIMENSION and 0 < columns <= MAX_DIMENSION):
        raise SeriesRejected(
            f"slice size {rows} x {columns} is outside 1..{MAX_DIMENSION} pixels per side"
        )
    thicknesses = {
        round(_numbers(ds, "SliceThickness", 1)[0], 2) if ds.get("SliceThickness") else 0.0
        for _, ds in headers
    }
    if len(thicknesses) > 1:
        raise SeriesRejected(f"slices have different thicknesses {sorted(thicknesses)} mm")
    z = np.array(
        [float(np.dot(normal, _numbers(ds, "ImagePositionPatient", 3))) for _, ds in headers]
    )
    order = np.argsort(z, kind="stable")
    z_sorted = z[order]
    if len(z_sorted) >= 2:
        steps = np.diff(z_sorted)
        if steps.min() < 1e-3:
            raise SeriesRejected("two or more slices share one position (overlapping acquisitions)")
        median = float(np.median(steps))
        worst = int(np.argmax(steps))
        if steps[worst] > max_gap_factor * median:
            raise SeriesRejected(
                f"gap of {steps[worst]:.1f} mm between slices at {z_sorted[worst]:.1f} and "
                f"{z_sorted[worst + 1]:.1f} mm (regular spacing is {median:.1f} mm): "
                "missing slices"
            )
    return [
        SliceRef(
            path=headers[i][0],
            sop_instance_uid=str(headers[i][1].SOPInstanceUID),
            sop_class_uid=str(headers[i][1].SOPClassUID),
            z=float(z[i]),
            header=headers[i][1],
        )
        for i in order
    ]
