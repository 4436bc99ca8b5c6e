"""Web console, the Hounsfield analysis on show: the PO/PHO table and the key slices drawn.

The verdict (``node.pipeline.analyse_files``) carries the numbers; to draw them, the series is
read and segmented again with the same calls (``series_check`` -> ``lungs.read_volume`` ->
``lungs.segment`` -> ``opacity.opacity_mask``), so the outlines and the red opacity map are the
masks that were measured.  The masks live on the working grid (``masks.factor`` times coarser
in-plane); they are repeated back up to the original pixels and drawn over the lung window.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node import lungs
from node.figures import draw_key_slices
from node.opacity import BANDS, ZONES, Quantification, Region
from node.pipeline import Context
from node.preprocess import Window
from node.series_check import SliceRef, order_and_check, read_headers
from node.verdict import SeriesVerdict
from node.web.render import rgb_data_uri

logger = logging.getLogger(__name__)

KEY_VIEW_SIZE = 512


@dataclass(frozen=True)
class RegionRow:
    """One row of the opacity table: a region of the left lung, the right lung and both."""

    label: str
    kind: str  # "lung", "zone" or "band"
    left: Region
    right: Region
    both: Region


@dataclass(frozen=True)
class KeyView:
    """A key slice (most opacity) drawn with the lung outlines and the opacity map."""

    rank: int
    z: float
    po: float  # the slice's PO (%), as the verdict measured it
    image: str  # PNG data URI


@dataclass(frozen=True)
class SeriesVolume:
    """A checked series read once: its slices in body-axis order and the HU volume."""

    slices: list[SliceRef]
    hu: np.ndarray
    geometry: lungs.Geometry
    padding_hu: float | None


def region_rows(q: Quantification) -> tuple[RegionRow, ...]:
    """Whole lungs, then the upper/middle/lower zones, then the peripheral/central bands."""
    rows = [RegionRow("whole lung", "lung", q.lungs["left"], q.lungs["right"], q.total)]
    rows += [
        RegionRow(zone, "zone", q.zones["left"][zone], q.zones["right"][zone], q.zone(zone))
        for zone in ZONES
    ]
    rows += [
        RegionRow(band, "band", q.bands["left"][band], q.bands["right"][band], q.band(band))
        for band in BANDS
    ]
    return tuple(rows)


def read_series(paths: list[Path], ctx: Context) -> SeriesVolume:
    """Read a series as the analysis does (raises ``SeriesRejected`` as it would)."""
    slices = order_and_check(
        read_headers(paths),
        require_axial=ctx.settings.analysis.require_axial,
        max_gap_factor=ctx.settings.analysis.max_gap_factor,
    )
    hu, geometry, padding = lungs.read_volume(slices)
    return SeriesVolume(slices, hu, geometry, padding)


def key_views(series: SeriesVolume, verdict: SeriesVerdict, window: Window) -> tuple[KeyView, ...]:
    """The verdict's key slices with left/right lung outlines and the opacity map drawn over
    (``node.figures.draw_key_slices``, the drawing the summary image shows too).

    Raises ``SeriesRejected`` when the series cannot be segmented (it was, for the verdict).
    """
    if not verdict.key_slices:
        return ()
    masks = lungs.segment(series.hu, series.geometry, padding_hu=series.padding_hu)
    drawn = draw_key_slices(series.hu, masks, series.slices, verdict.key_slices, window)
    return tuple(
        KeyView(d.rank, d.z, d.po, rgb_data_uri(d.rgb, max_size=KEY_VIEW_SIZE)) for d in drawn
    )
