"""Lung segmentation stage: a CT series in Hounsfield units -> left and right lung masks.

Classical, Hounsfield-native and fast (no model, nothing learnt from data), so it behaves the same
on scanners nobody trained on.  The steps, each on a working grid of about 1.25 mm in-plane
(block means of the original pixels, so HU keep their meaning):

1. **Padding outside the scan circle** becomes air: values below -1024 HU are already clipped by
   ``preprocess.hounsfield``; a *constant* border-connected value (``PixelPaddingValue``, or an
   export that pads with 0 or any other number) is found by equality and set to air.
2. **Body**: per slice, the largest component of soft tissue and bone (> ``BODY_HU``); table,
   cushions and arms that do not touch it fall away.
3. **Air inside the body**: per slice, the components of "not body" that do not touch the image
   border (holes of the body).  Outside air, the table's hollow shell and air under the patient
   touch the border or lie outside the body component.
4. **Which holes are lung**: 3-D components of that air, kept when big (``MIN_LUNG_ML`` and a
   share of the largest) and lung-like on average (mean between ``AIRWAY_MEAN_HU`` and
   ``LUNG_MAX_MEAN_HU``): bowel gas, the trachea alone and air pockets are dropped.
5. **Trachea and main bronchi**: per slice, components of the lung air that are small
   (< ``AIRWAY_MAX_AREA_MM2``) and either centred on the midline or mostly pure air (airway
   lumen, not parenchyma, which holds vessels and interstitium, about -850 HU); and gas: any
   component that is almost all pure air (stomach, bowel, the table's hollow interior).
6. **Left / right**: per slice, the column of least lung between the two lungs, near the body's
   midline (the anterior junction line where the lungs touch); which side is the patient's left
   comes from Image Orientation (Patient), so prone and feet-first series are right too.
7. **Dense opacities kept inside**: the air mask leaves out consolidation, the very thing to be
   measured.  Per slice and lung: holes filled (opacity surrounded by aerated lung), then a
   closing with a ``CLOSING_MM`` disc for opacities at the edge of the lung (subpleural
   consolidation bites).  The closing is only allowed to add tissue that could be lung: not
   brighter than ``MAX_ADDED_HU`` (bone, contrast-enhanced vessels and heart), and never medial
   to that row's aerated lung (the mediastinum and hila, where a closing would pull in the heart
   and the great vessels).

A series whose masks hold less than ``MIN_LUNG_ML`` raises ``SeriesRejected("no lungs found")``.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from node import preprocess
from node.errors import InvalidInstance, SeriesRejected
from node.series_check import SliceRef

logger = logging.getLogger(__name__)

SEGMENTATION_VERSION = 1

TARGET_PIXEL_MM = 1.25  # working grid: block means down to about this pixel size
BODY_HU = -500.0  # soft tissue, fat, bone; lung (-950..-600) and air are below
AIR_HU = -1024
LUNG_MAX_MEAN_HU = -500.0  # a "lung" component whose mean is denser is not aerated lung
AIRWAY_MEAN_HU = -960.0  # nearly pure air: airway lumen, gas, the table's hollow interior
PURE_AIR_HU = -950.0  # airway lumen and gas; parenchyma is mostly above (about -850 on average)
AIRWAY_PURITY = 0.6  # share of pure air in a small per-slice component that makes it airway
GAS_PURITY = 0.8  # share of pure air that makes a component of any size gas, not lung
AIRWAY_MAX_AREA_MM2 = 1200.0  # trachea ~200-500 mm2, carina and main bronchi up to ~1000
AIRWAY_MIDLINE_MM = 30.0  # a small component centred this close to the midline is an airway:
# trachea and main bronchi (streaks at the thoracic inlet can put their lumen at -850 HU), while
# the lung apices, the smallest lung sections, are centred 40 mm or more from the midline
MIN_LUNG_ML = 15.0  # less lung than this in the whole series: no lungs found
MIN_SHARE_OF_LARGEST = 0.05  # a second lung component must be at least this share of the first
CLOSING_MM = 10.0  # rolling-ball radius that takes subpleural opacities back into the lung
MAX_ADDED_HU = 150.0  # a closing may add consolidation (up to ~100 HU enhanced), not bone/contrast
SOLID_MEAN_HU = -300.0  # an enclosed region denser than this on average may be an organ (see below)
TOUCH_SHARE = 0.5  # ... when at least this share of it lies on tissue outside the lung
MIDLINE_BAND = 0.2  # the split column is searched within this share of the width around midline

_IN_PLANE = np.array(
    [[[0, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]], [[0, 0, 0]] * 3],
    dtype=bool,
)  # 4-connectivity within a slice only: labels every slice independently in one call


@dataclass(frozen=True)
class Geometry:
    """Where a volume lies in the patient: voxel size and which way is the patient's left.

    ``spacing`` is ``(dz, dy, dx)`` in mm.  ``left_step`` is +1 when the patient's left lies
    toward increasing column index (supine head-first: the image's right side), -1 otherwise.
    ``posterior_step`` likewise for rows.
    """

    spacing: tuple[float, float, float]
    left_step: int = 1
    posterior_step: int = 1
    superior_step: int = 1  # +1 when the slice index grows toward the head
    thickness_mm: float = 0.0  # reconstructed slice thickness (0: unknown, spacing is used)

    @property
    def thickness(self) -> float:
        return self.thickness_mm if self.thickness_mm > 0 else self.spacing[0]

    @classmethod
    def from_orientation(
        cls, spacing: tuple[float, float, float], orientation: list[float]
    ) -> Geometry:
        """From ImageOrientationPatient (row then column direction cosines, LPS axes)."""
        row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
        # +x (LPS) is the patient's left: the column index grows along ``row``'s direction.
        left = 1 if row[0] >= 0 else -1
        posterior = 1 if col[1] >= 0 else -1
        # slices are ordered by position along row x col (series_check): +z (LPS) is the head
        superior = 1 if np.cross(row, col)[2] >= 0 else -1
        return cls(spacing, left_step=left, posterior_step=posterior, superior_step=superior)

    @property
    def voxel_ml(self) -> float:
        dz, dy, dx = self.spacing
        return dz * dy * dx / 1000.0


@dataclass(frozen=True)
class LungMasks:
    """Left and right lung (dense opacities included) on the working grid of ``hu``."""

    hu: np.ndarray  # float32 (z, y, x), working grid, padding set to air
    left: np.ndarray  # bool, same shape
    right: np.ndarray
    aerated: np.ndarray  # bool: the air-threshold lung before dense opacities were added back
    geometry: Geometry  # of the working grid
    factor: int  # in-plane block size from the original pixels to the working grid

    @property
    def lungs(self) -> np.ndarray:
        return self.left | self.right


def read_volume(slices: list[SliceRef]) -> tuple[np.ndarray, Geometry, float | None]:
    """Read checked slices (body-axis order) into one float32 HU volume.

    Returns the volume, its geometry and the Pixel Padding Value in HU (None when absent or
    already below air).  Raises ``SeriesRejected`` naming the slice that cannot be decoded.
    """
    first = slices[0].header
    rows, columns = int(first.Rows), int(first.Columns)
    volume = np.empty((len(slices), rows, columns), dtype=np.float32)
    for i, ref in enumerate(slices):
        try:
            volume[i] = preprocess.hounsfield(preprocess.read_dicom(ref.path))
        except (InvalidInstance, ValueError) as exc:
            raise SeriesRejected(f"slice {ref.sop_instance_uid}: {exc}") from exc
    pixel = [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])]
    if len(slices) > 1:
        dz = float(np.median(np.diff([ref.z for ref in slices])))
    else:
        dz = float(first.get("SliceThickness", 1.0) or 1.0)
    orientation = [float(v) for v in first.ImageOrientationPatient]
    geometry = Geometry.from_orientation((abs(dz), pixel[0], pixel[1]), orientation)
    thickness = float(first.get("SliceThickness", 0) or 0)
    geometry = dataclasses.replace(geometry, thickness_mm=thickness if thickness > 0 else 0.0)
    padding = None
    if "PixelPaddingValue" in first:
        slope = float(first.get("RescaleSlope", 1.0) or 1.0)
        value = float(first.PixelPaddingValue) * slope + float(first.get("RescaleIntercept", 0))
        padding = value if value > AIR_HU else None
    return volume, geometry, padding


def working_factor(pixel_mm: float) -> int:
    """In-plane block size that brings ``pixel_mm`` to about ``TARGET_PIXEL_MM``."""
    return max(1, round(TARGET_PIXEL_MM / pixel_mm))


def downsample(hu: np.ndarray, factor: int) -> np.ndarray:
    """Block mean in-plane (float32); the volume is cropped to a multiple of ``factor``."""
    hu = np.asarray(hu)
    if factor == 1:
        return hu.astype(np.float32, copy=False)
    z, y, x = hu.shape
    y2, x2 = y - y % factor, x - x % factor
    out = np.zeros((z, y2 // factor, x2 // factor), dtype=np.float32)
    for i in range(factor):  # strided sums: ~10x faster than a reshaped mean over two axes
        for j in range(factor):
            out += hu[:, i:y2:factor, j:x2:factor]
    out *= np.float32(1.0 / (factor * factor))
    return out


def replace_padding(hu: np.ndarray, padding_hu: float | None = None) -> np.ndarray:
    """Set constant padding outside the scan circle to air, in place; return ``hu``.

    ``padding_hu`` is the padding in HU when the header says (Pixel Padding Value); otherwise
    the value that fills the image corners is taken as padding when it is constant over a
    border-connected region of at least 1% of the image (real anatomy is never that flat).
    """
    candidates = [] if padding_hu is None else [float(padding_hu)]
    corners = np.concatenate([hu[:, :2, :2].ravel(), hu[:, :2, -2:].ravel()])
    corners = np.concatenate([corners, hu[:, -2:, :2].ravel(), hu[:, -2:, -2:].ravel()])
    values, counts = np.unique(corners, return_counts=True)
    candidates.append(float(values[np.argmax(counts)]))
    for value in dict.fromkeys(candidates):
        if value <= AIR_HU:
            continue  # already air
        flat = hu == np.float32(value)
        if flat.mean() < 0.01:
            continue
        labels, n = ndimage.label(flat, structure=_IN_PLANE)
        touching = np.zeros(n, dtype=bool)
        outside = np.unique(_border_labels(labels))
        touching[outside[outside > 0] - 1] = True
        padding = _lookup(touching, labels)
        hu[padding] = AIR_HU
        logger.debug("padding %g HU replaced by air in %d voxels", value, int(padding.sum()))
    return hu


def _component_means(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Mean of ``values`` per label 1..n (``ndimage.mean`` is 10x slower on large volumes)."""
    inside = labels > 0
    flat = labels[inside]
    counts = np.bincount(flat, minlength=n + 1)[1:]
    sums = np.bincount(flat, weights=values[inside], minlength=n + 1)[1:]
    return sums / np.maximum(counts, 1)


def _lookup(keep: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``keep[label - 1]`` per voxel, False for label 0 (a table lookup, not ``np.isin``)."""
    return np.concatenate([[False], np.asarray(keep, dtype=bool)])[labels]


def _holes_2d(mask: np.ndarray) -> np.ndarray:
    """Per slice: the background regions of ``mask`` that do not reach the image border."""
    _, h, w = mask.shape
    out = np.zeros_like(mask)
    canvas = np.zeros((h + 2, w + 2), np.uint8)
    flood = np.zeros((h + 4, w + 4), np.uint8)
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        canvas[1:-1, 1:-1] = mask[k]
        flood[:] = 0
        filled = canvas.copy()
        cv2.floodFill(filled, flood, (0, 0), 1)  # the border-connected background becomes 1
        out[k] = filled[1:-1, 1:-1] == 0
    return out


def _border_labels(labels: np.ndarray) -> np.ndarray:
    """Label values found on the in-plane border of any slice."""
    return np.concatenate(
        [
            labels[:, 0, :].ravel(),
            labels[:, -1, :].ravel(),
            labels[:, :, 0].ravel(),
            labels[:, :, -1].ravel(),
        ]
    )


def _largest_per_slice(mask: np.ndarray) -> np.ndarray:
    """Per slice, the largest 8-connected component of ``mask`` (the body, not table or arms)."""
    out = np.zeros_like(mask)
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask[k].view(np.uint8), 8)
        if n > 1:
            largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            out[k] = labels == largest
    return out


def segment(hu: np.ndarray, geometry: Geometry, *, padding_hu: float | None = None) -> LungMasks:
    """Segment the lungs of a series.

    Parameters
    ----------
    hu
        ``(z, y, x)`` Hounsfield units, slices in body-axis order, original pixel grid.
    geometry
        Voxel spacing ``(dz, dy, dx)`` in mm of ``hu`` and the patient's left direction.
    padding_hu
        Pixel Padding Value in HU, when the header gives one.

    Returns
    -------
    LungMasks
        On the working grid (``factor`` times coarser in-plane).

    Raises
    ------
    SeriesRejected
        "no lungs found" when the series holds less than ``MIN_LUNG_ML`` of lung.
    """
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise SeriesRejected(f"no lungs found: volume of shape {hu.shape}")
    factor = working_factor(min(geometry.spacing[1:]))
    work = downsample(hu, factor)
    if work is hu:
        work = work.copy()
    dz, dy, dx = geometry.spacing
    grid = dataclasses.replace(geometry, spacing=(dz, dy * factor, dx * factor))
    replace_padding(work, None if padding_hu is None else padding_hu)
    air = _lung_air(work, grid)
    # everything after this works inside the lungs' bounding box (a third of the voxels)
    box = _bounding_box(air, margin=round(CLOSING_MM / grid.spacing[1]) + 2)
    sub_air, sub_work = air[box], work[box]
    sub_left, sub_right = _split(sub_air, sub_work, grid)
    # the two lungs are independent here: one thread each (OpenCV and numpy release the GIL)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(_with_dense_opacities, m, sub_air, sub_work, grid)
            for m in (sub_left, sub_right)
        ]
        sub_left, sub_right = (f.result() for f in futures)
    sub_right &= ~sub_left
    left, right = np.zeros_like(air), np.zeros_like(air)
    left[box], right[box] = sub_left, sub_right
    masks = LungMasks(work, left, right, air, grid, factor)
    volume = float(masks.lungs.sum()) * grid.voxel_ml
    if volume < MIN_LUNG_ML:
        raise SeriesRejected(
            f"no lungs found: {volume:.0f} mL of lung in view (at least {MIN_LUNG_ML:g} needed)"
        )
    return masks


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """The slices of ``mask``'s bounding box, ``margin`` voxels wider in-plane (whole if empty)."""
    if not mask.any():
        return (slice(None), slice(None), slice(None))
    box = []
    for axis, pad in ((0, 0), (1, margin), (2, margin)):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        box.append(slice(max(0, hit[0] - pad), min(mask.shape[axis], hit[-1] + pad + 1)))
    return box[0], box[1], box[2]


def _lung_air(work: np.ndarray, grid: Geometry) -> np.ndarray:
    """Steps 2-5: aerated lung (air-threshold), trachea and main bronchi removed."""
    body = _largest_per_slice(work > BODY_HU)
    holes = _holes_2d(body) & (
        work < BODY_HU
    )  # "not body" inside the largest component may still be dense
    lung = _lung_components(holes, work, grid)
    return lung & ~_airway(lung, work, grid)


def _lung_components(holes: np.ndarray, work: np.ndarray, grid: Geometry) -> np.ndarray:
    out = np.zeros_like(holes)
    if not holes.any():
        return out
    box = _bounding_box(holes, margin=0)
    out[box] = _lung_components_in(holes[box], work[box], grid)
    return out


def _lung_components_in(holes: np.ndarray, work: np.ndarray, grid: Geometry) -> np.ndarray:
    labels, n = ndimage.label(holes)
    if n == 0:
        return holes
    sizes = np.bincount(labels[holes], minlength=n + 1)[1:].astype(float)
    means = _component_means(work, labels, n)
    lung_like = (means > AIRWAY_MEAN_HU) & (means < LUNG_MAX_MEAN_HU)
    if not lung_like.any():
        return np.zeros_like(holes)
    largest = sizes[lung_like].max()
    keep = lung_like & (sizes >= MIN_SHARE_OF_LARGEST * largest)
    keep &= sizes * grid.voxel_ml >= MIN_LUNG_ML / 4
    return _lookup(keep, labels)


def _airway(lung: np.ndarray, work: np.ndarray, grid: Geometry) -> np.ndarray:
    """Per-slice components that are nearly pure air rather than parenchyma.

    Parenchyma holds vessels and interstitium: well under half of it is below ``PURE_AIR_HU``
    even in emphysema.  Small components that are mostly pure air are trachea and main bronchi;
    a component of any size that is almost all pure air is gas (stomach, bowel, pneumothorax)
    or the table's hollow interior.
    """
    out = np.zeros_like(lung)
    midline = _body_centre(work)
    pixel_mm2 = grid.spacing[1] * grid.spacing[2]
    pure_air = work < PURE_AIR_HU
    for k in np.flatnonzero(lung.any(axis=(1, 2))):
        n, labels, stats, centroids = cv2.connectedComponentsWithStats(
            lung[k].view(np.uint8), connectivity=4
        )
        area = stats[:, cv2.CC_STAT_AREA] * pixel_mm2
        purity = np.bincount(labels.ravel(), weights=pure_air[k].ravel(), minlength=n) / np.maximum(
            stats[:, cv2.CC_STAT_AREA], 1
        )
        central = np.abs(centroids[:, 0] - midline[k]) * grid.spacing[2] < AIRWAY_MIDLINE_MM
        small = area < AIRWAY_MAX_AREA_MM2
        airway = (small & (central | (purity >= AIRWAY_PURITY))) | (purity >= GAS_PURITY)
        airway[0] = False
        if airway.any():
            out[k] = airway[labels]
    return out


def _body_centre(work: np.ndarray) -> np.ndarray:
    """Per slice, the column of the body's centre of mass (the midline)."""
    body_cols = (work > BODY_HU).sum(axis=1)  # (z, x)
    weight = body_cols.sum(axis=1)
    columns = np.arange(work.shape[2])
    centre = (body_cols * columns).sum(axis=1) / np.maximum(weight, 1)
    return np.where(weight > 0, centre, work.shape[2] / 2.0)


def _split(air: np.ndarray, work: np.ndarray, grid: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Step 6: left and right lung, cut per slice at the column of least lung near the midline."""
    z, _, width = air.shape
    columns = np.arange(width)
    centre = _body_centre(work)
    profile = air.sum(axis=1).astype(float)  # (z, x): lung per column
    profile = ndimage.uniform_filter1d(profile, 3, axis=1)
    band = int(MIDLINE_BAND * width)
    cut = np.empty(z, dtype=int)
    for k in range(z):
        lo = max(0, int(centre[k]) - band)
        hi = min(width, int(centre[k]) + band + 1)
        cut[k] = lo + _middle_of_emptiest_run(profile[k, lo:hi], centre[k] - lo)
    high_side = columns[np.newaxis, np.newaxis, :] > cut[:, np.newaxis, np.newaxis]
    if grid.left_step > 0:
        return air & high_side, air & ~high_side
    return air & ~high_side, air & high_side


def _middle_of_emptiest_run(profile: np.ndarray, centre: float) -> int:
    """Index in the middle of the run of minimal values closest to ``centre``."""
    minima = np.flatnonzero(profile == profile.min())
    runs = np.split(minima, np.flatnonzero(np.diff(minima) > 1) + 1)
    middles = np.array([(run[0] + run[-1]) / 2.0 for run in runs])
    return round(float(middles[np.argmin(np.abs(middles - centre))]))


def _disc(radius_px: float) -> np.ndarray:
    r = max(1, round(radius_px))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    return mask | _holes_2d(mask)


def _with_dense_opacities(
    side: np.ndarray, air: np.ndarray, work: np.ndarray, grid: Geometry
) -> np.ndarray:
    """Step 7: one lung with the dense opacities inside and at its edge added back."""
    medial = medial_of(side, grid)
    holes = _fill_holes_2d(side) & ~side
    holes &= ~_solid_organ_holes(holes, side, work)
    filled = side | holes
    kernel = _disc(CLOSING_MM / grid.spacing[1])
    pad = kernel.shape[0]
    closed = np.zeros_like(filled)
    for k in np.flatnonzero(filled.any(axis=(1, 2))):
        padded = cv2.copyMakeBorder(
            filled[k].view(np.uint8), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0
        )
        closed[k] = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)[pad:-pad, pad:-pad] > 0
    added = closed & ~filled & (work <= MAX_ADDED_HU) & ~air & ~medial
    return filled | added


def _solid_organ_holes(holes: np.ndarray, side: np.ndarray, work: np.ndarray) -> np.ndarray:
    """Holes that are the cross-section of a solid organ, not lung disease.

    A dense region enclosed by aerated lung in one slice is either disease or something that
    lies outside the lung in the next slice: the top of a diaphragm dome, the cardiac apex
    wrapped by the lingula, a vessel leaving the lung.  Those continue into tissue outside the
    lung directly above or below for most of their area (``TOUCH_SHARE``) *and* are mostly
    solid (mean above ``SOLID_MEAN_HU``; partial volume at a dome's top reads about -120 HU).
    Ground glass averages lower and consolidation is mostly surrounded by lung above and below.
    A solid consolidation lying on the diaphragm is lost by this rule (a known limit, README).
    """
    out = np.zeros_like(holes)
    if not holes.any():
        return out
    box = _bounding_box(holes, margin=0)
    box = (slice(max(0, box[0].start - 1), box[0].stop + 1), box[1], box[2])  # +1 slice in z
    holes, side, work = holes[box], side[box], work[box]
    tissue = (work > BODY_HU) & ~side & ~holes
    touch = np.zeros_like(holes)
    touch[1:] |= tissue[:-1]
    touch[:-1] |= tissue[1:]
    labels, n = ndimage.label(holes)
    means = _component_means(work, labels, n)
    sizes = np.bincount(labels[holes], minlength=n + 1)
    touching = np.bincount(labels[touch & holes], minlength=n + 1) >= TOUCH_SHARE * sizes
    solid = np.concatenate([[False], means > SOLID_MEAN_HU]) & touching
    solid[0] = False
    out[box] = solid[labels]
    return out


def medial_of(side: np.ndarray, grid: Geometry) -> np.ndarray:
    """Voxels medial to the row's aerated lung of this side (toward the mediastinum)."""
    z, h, w = side.shape
    columns = np.arange(w)
    any_row = side.any(axis=2)  # (z, y)
    # which way is medial: toward the other lung, i.e. away from this lung's centre of mass
    total = side.sum()
    centre_x = (side.sum(axis=(0, 1)) * columns).sum() / max(total, 1)
    medial_is_high = centre_x < w / 2
    # rows without aerated lung: between two lung rows, the edge is interpolated; beyond the
    # lung's first or last row (above an anterior tip, below the posterior recess) no guard
    no_guard = w if medial_is_high else -1
    if medial_is_high:
        edge = np.where(any_row, w - 1 - np.argmax(side[:, :, ::-1], axis=2), no_guard)
    else:
        edge = np.where(any_row, np.argmax(side, axis=2), no_guard)
    edge = edge.astype(float)
    for k in range(z):
        rows = np.flatnonzero(any_row[k])
        if 0 < len(rows) < h:
            edge[k] = np.interp(np.arange(h), rows, edge[k, rows], left=no_guard, right=no_guard)
    if medial_is_high:
        return columns[np.newaxis, np.newaxis, :] > edge[:, :, np.newaxis]
    return columns[np.newaxis, np.newaxis, :] < edge[:, :, np.newaxis]
