"""Web console, the Hounsfield analysis on show: the PO/PHO table and the key slices drawn.

The verdict (``node.pipeline.analyse_series``) carries the numbers and, with ``draw=True``, the
key slices drawn from the very masks that were measured (``node.figures.draw_key_slices``, the
drawing the summary image shows too); this module only lays them out for the page.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from node.figures import KeyImage
from node.opacity import BANDS, ZONES, Quantification, Region
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


def key_views(key_images: Sequence[KeyImage]) -> tuple[KeyView, ...]:
    """The drawn key slices as page images (PNG data URIs)."""
    return tuple(
        KeyView(k.rank, k.z, k.po, rgb_data_uri(k.rgb, max_size=KEY_VIEW_SIZE)) for k in key_images
    )
