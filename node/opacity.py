"""Quantification stage: Hounsfield units + lung masks -> opacity burden and its distribution.

What is measured, in the terms of CT pneumonia quantification (Chaganti et al., Radiology: AI
2020, "Automated quantification of CT patterns associated with COVID-19"; Colombi et al.,
Radiology 2020, "Well-aerated lung on admitting chest CT ..."):

- **Opacity**: lung voxels between ``OPACITY_HU`` (-700 HU, the upper limit of well-aerated lung
  in Colombi et al.) and ``MAX_OPACITY_HU`` (+100 HU, above that is contrast or calcium, not
  parenchyma), once vessels are taken out (below).  **PO** = opacity volume / lung volume.
- **High opacity**: opacity at or above ``HIGH_OPACITY_HU`` (-200 HU, Chaganti et al.'s
  consolidation threshold).  **PHO** = high-opacity volume / lung volume.
- **Ground glass**: opacity below ``HIGH_OPACITY_HU``.

**Vessels** and airway walls are the crux: in a normal lung about 5-10 % of voxels lie in
-700..+100 HU, nearly all vessels, fissures and the partial-volume rim at the pleura.  They are
thin, and opacities of pneumonia are blobs: an in-plane morphological opening with a disc of
``VESSEL_MM`` radius removes every structure narrower than about twice that (segmental vessels,
fissures, bronchial walls, the pleural rim) and keeps patches of ground glass and consolidation
wider than it.  The hilar vessels, wider than the disc, lie medial to the aerated lung and are
outside the lung mask by construction (``node.lungs``: the closing never adds medial tissue).
Measured on the shared series (README, "The analysis"): this is what separates a normal lung from
a COVID-19 one; without it both read 6-9 %.

**Zones**: upper / middle / lower third of each lung's own cranio-caudal extent, and peripheral
(outer third of the distance from the costal pleura to the mediastinal edge) / central.
Distribution features a radiologist uses: bilateral, peripheral and lower-zone predominance,
ground-glass share, and focality (share of the opacity in its largest 3-D component).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage

from node.lungs import LungMasks, medial_of

logger = logging.getLogger(__name__)

QUANTIFICATION_VERSION = 1

OPACITY_HU = -700.0
HIGH_OPACITY_HU = -200.0
MAX_OPACITY_HU = 100.0
DENSE_HU = -300.0  # ground glass below, consolidation-range above (Colombi et al.: non-aerated)
GROUND_GLASS_OPEN_MM = 2.5
DENSE_OPEN_MM = 5.0
VESSEL_DENSE_SHARE = 0.25  # a narrow patch at least this dense is a vessel (with its halo)
PERIPHERAL_SHARE = 1.0 / 3.0
ZONES = ("upper", "middle", "lower")
BANDS = ("peripheral", "central")
SIDES = ("left", "right")


@dataclass(frozen=True)
class Region:
    """Volume and opacity of one lung region (a lung, a zone of it, a band of it, or both)."""

    volume_ml: float
    opacity_ml: float
    high_opacity_ml: float

    @property
    def po(self) -> float:
        """Percentage of opacity (0-100)."""
        return 100.0 * self.opacity_ml / self.volume_ml if self.volume_ml > 0 else 0.0

    @property
    def pho(self) -> float:
        """Percentage of high opacity (0-100)."""
        return 100.0 * self.high_opacity_ml / self.volume_ml if self.volume_ml > 0 else 0.0

    def as_json(self) -> dict[str, float]:
        return {
            "volume_ml": round(self.volume_ml, 1),
            "opacity_ml": round(self.opacity_ml, 2),
            "high_opacity_ml": round(self.high_opacity_ml, 2),
            "po": round(self.po, 3),
            "pho": round(self.pho, 3),
        }


@dataclass(frozen=True)
class Quantification:
    """Opacity burden of a series: both lungs, each lung, each lung's zones and bands."""

    total: Region
    lungs: dict[str, Region]  # "left", "right"
    zones: dict[str, dict[str, Region]]  # side -> zone -> region
    bands: dict[str, dict[str, Region]]  # side -> band -> region
    focality: float  # share of opacity volume in its largest 3-D component (0 when none)
    slice_po: tuple[float, ...] = field(default_factory=tuple)  # per slice of the series, 0-100
    slice_opacity_ml: tuple[float, ...] = field(default_factory=tuple)  # per slice, mL
    extent_mm: float = 0.0  # cranio-caudal length covered by lung

    @property
    def ground_glass_share(self) -> float:
        """Share of opacity below the high-opacity threshold (ground glass), 0-1."""
        t = self.total
        return (t.opacity_ml - t.high_opacity_ml) / t.opacity_ml if t.opacity_ml > 0 else 0.0

    def zone(self, zone: str) -> Region:
        return _sum([self.zones[s][zone] for s in SIDES])

    def band(self, band: str) -> Region:
        return _sum([self.bands[s][band] for s in SIDES])

    def as_json(self) -> dict[str, object]:
        return {
            "total": self.total.as_json(),
            "lungs": {s: r.as_json() for s, r in self.lungs.items()},
            "zones": {s: {z: r.as_json() for z, r in d.items()} for s, d in self.zones.items()},
            "bands": {s: {b: r.as_json() for b, r in d.items()} for s, d in self.bands.items()},
            "focality": round(self.focality, 3),
            "ground_glass_share": round(self.ground_glass_share, 3),
            "extent_mm": round(self.extent_mm, 1),
        }


def _sum(regions: list[Region]) -> Region:
    return Region(
        sum(r.volume_ml for r in regions),
        sum(r.opacity_ml for r in regions),
        sum(r.high_opacity_ml for r in regions),
    )


def opacity_mask(masks: LungMasks) -> np.ndarray:
    """Opacity voxels (bool, working grid) inside the lungs, vessels opened away.

    Two steps, per slice.  (1) The whole opacity range (-700..+100 HU) is opened with a
    ``GROUND_GLASS_OPEN_MM`` disc: the partial-volume halo around vessels, fissures, bronchial
    walls and the pleural rim are thinner than that and go.  (2) What survives is judged by
    connected patch: a patch that is mostly dense (at least ``VESSEL_DENSE_SHARE`` of it at
    -300 HU or above) and nowhere wider than a ``DENSE_OPEN_MM`` disc is a vessel seen in cross
    section or along its length, and goes; wider dense patches (consolidation) and ground-glass
    patches stay.  Judging patches, not voxels, keeps a lesion whose noise straddles -300 HU
    whole (opening the two ranges separately erased such a lesion: tests/test_lungs.py).
    Thick slices smear an oblique vessel in-plane by about the slice thickness, so the first
    disc grows to half the thickness above 5 mm (chosen after seeing the 8 mm TCIA series, so
    that series is not a held-out test of it: README).
    """
    hu, lungs = masks.hu, masks.lungs
    candidate = lungs & (hu >= OPACITY_HU) & (hu <= MAX_OPACITY_HU)
    spacing = masks.geometry.spacing[1]
    first_mm = max(GROUND_GLASS_OPEN_MM, masks.geometry.thickness / 2.0)
    opened = _open_slices(candidate, first_mm / spacing)
    wide = _open_slices(opened, DENSE_OPEN_MM / spacing)
    dense = hu >= DENSE_HU
    out = np.zeros_like(opened)
    for k in np.flatnonzero(opened.any(axis=(1, 2))):
        n, labels = cv2.connectedComponents(opened[k].view(np.uint8), connectivity=8)
        flat = labels.ravel()
        size = np.bincount(flat, minlength=n)
        dense_share = np.bincount(flat, weights=dense[k].ravel(), minlength=n) / np.maximum(size, 1)
        is_wide = np.zeros(n, dtype=bool)
        is_wide[np.unique(labels[wide[k]])] = True
        keep = is_wide | (dense_share < VESSEL_DENSE_SHARE)
        keep[0] = False
        out[k] = keep[labels]
    return out & lungs


def _open_slices(mask: np.ndarray, radius_px: float) -> np.ndarray:
    radius = max(1, round(radius_px))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    out = np.zeros_like(mask)
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        out[k] = cv2.morphologyEx(mask[k].view(np.uint8), cv2.MORPH_OPEN, kernel) > 0
    return out


def peripheral_band(side: np.ndarray, masks: LungMasks) -> np.ndarray:
    """The outer third of one lung, by distance from its costal surface (not the mediastinum)."""
    extended = side | medial_of(masks.aerated & side, masks.geometry)
    out = np.zeros_like(side)
    for k in np.flatnonzero(side.any(axis=(1, 2))):
        dist = cv2.distanceTransform(extended[k].view(np.uint8), cv2.DIST_L2, 3)
        inside = dist[side[k]]
        out[k] = side[k] & (dist <= PERIPHERAL_SHARE * float(inside.max()))
    return out


def quantify(masks: LungMasks) -> Quantification:
    """Measure opacity burden and distribution from the lung masks of a series."""
    masks = _cropped(masks)
    opacity = opacity_mask(masks)
    high = opacity & (masks.hu >= HIGH_OPACITY_HU)
    ml = masks.geometry.voxel_ml

    def region(where: np.ndarray) -> Region:
        return Region(
            float(np.count_nonzero(where)) * ml,
            float(np.count_nonzero(opacity & where)) * ml,
            float(np.count_nonzero(high & where)) * ml,
        )

    sides = {"left": masks.left, "right": masks.right}
    zones: dict[str, dict[str, Region]] = {}
    bands: dict[str, dict[str, Region]] = {}
    for name, side in sides.items():
        zones[name] = {z: region(m) for z, m in zip(ZONES, _thirds(side, masks), strict=True)}
        periph = peripheral_band(side, masks)
        bands[name] = {"peripheral": region(periph), "central": region(side & ~periph)}
    lungs = masks.lungs
    per_slice_lung = lungs.sum(axis=(1, 2))
    per_slice_opacity = opacity.sum(axis=(1, 2))
    slice_po = 100.0 * per_slice_opacity / np.maximum(per_slice_lung, 1)
    covered = np.flatnonzero(per_slice_lung)
    extent = (covered[-1] - covered[0] + 1) * masks.geometry.spacing[0] if len(covered) else 0.0
    return Quantification(
        total=region(lungs),
        lungs={n: region(m) for n, m in sides.items()},
        zones=zones,
        bands=bands,
        focality=_focality(opacity),
        slice_po=tuple(float(v) for v in slice_po),
        slice_opacity_ml=tuple(float(v) * ml for v in per_slice_opacity),
        extent_mm=float(extent),
    )


def _cropped(masks: LungMasks) -> LungMasks:
    """The same masks cut in-plane to the lungs' bounding box (every slice kept)."""
    lungs = masks.lungs
    if not lungs.any():
        return masks
    rows = np.flatnonzero(lungs.any(axis=(0, 2)))
    cols = np.flatnonzero(lungs.any(axis=(0, 1)))
    box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return dataclasses.replace(
        masks,
        hu=masks.hu[box],
        left=masks.left[box],
        right=masks.right[box],
        aerated=masks.aerated[box],
    )


def _thirds(side: np.ndarray, masks: LungMasks) -> list[np.ndarray]:
    """Upper, middle, lower third of one lung's own cranio-caudal extent (by slice)."""
    slices = np.flatnonzero(side.any(axis=(1, 2)))
    out = [np.zeros_like(side) for _ in ZONES]
    if len(slices) == 0:
        return out
    lo, hi = slices[0], slices[-1] + 1
    edges = np.linspace(lo, hi, 4).round().astype(int)
    order = [0, 1, 2] if masks.geometry.superior_step < 0 else [2, 1, 0]  # index 0 = upper
    for zone, third in zip(order, range(3), strict=True):
        out[zone][edges[third] : edges[third + 1]] = side[edges[third] : edges[third + 1]]
    return out


def _focality(opacity: np.ndarray) -> float:
    if not opacity.any():
        return 0.0
    labels, n = ndimage.label(opacity)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return float(sizes.max() / sizes.sum())
