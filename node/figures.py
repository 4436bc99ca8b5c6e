"""Report stage, pictures: the key slices drawn with the lung outlines and the opacity map.

One drawing for the console (``node.web.analysis``) and the summary image (``node.summary``).
The masks are the ones that were measured (``node.lungs.segment``, ``node.opacity.opacity_mask``):
they live on the working grid (``masks.factor`` times coarser in-plane) and are repeated back up
to the original pixels, then drawn over the lung window (``node.web.render.overlay_rgb``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from node import opacity, preprocess
from node.lungs import LungMasks
from node.preprocess import Window
from node.series_check import SliceRef
from node.verdict import SliceScore
from node.web.render import outline, overlay_rgb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyImage:
    """A key slice (most opacity) drawn: outlines of both lungs, opacity in red."""

    rank: int  # 1 = most opacity
    sop_instance_uid: str
    z: float  # position along the body axis, mm
    po: float  # the slice's PO (%), as the verdict measured it
    rgb: np.ndarray  # uint8 (rows, columns, 3), the slice's own pixel grid


def to_pixels(mask: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """A working-grid 2-D mask repeated back to the original pixel grid (cropped edge: False)."""
    full = np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)
    out = np.zeros(shape, dtype=bool)
    out[: full.shape[0], : full.shape[1]] = full[: shape[0], : shape[1]]
    return out


def draw_key_slices(
    hu: np.ndarray,
    masks: LungMasks,
    slices: Sequence[SliceRef],
    key_slices: Sequence[SliceScore],
    window: Window,
) -> tuple[KeyImage, ...]:
    """The key slices with their lung outlines and opacity map.

    Parameters
    ----------
    hu
        The series in HU, ``(z, y, x)``, slices in the order of ``slices``.
    masks
        ``lungs.segment`` of ``hu``.
    slices
        The series' slices in body-axis order (``series_check.order_and_check``).
    key_slices
        The verdict's key slices, most opacity first.
    window
        Grey-level window the slices are shown in.

    Returns
    -------
    tuple of KeyImage
        One per key slice found in ``slices``, ranked as given.  The opacity map is computed on
        those slices only: ``opacity.opacity_mask`` works slice by slice.
    """
    index = {ref.sop_instance_uid: i for i, ref in enumerate(slices)}
    for key in key_slices:
        if key.sop_instance_uid not in index:
            logger.warning("key slice %s is not in the series read back", key.sop_instance_uid)
    kept = [
        (rank, key, index[key.sop_instance_uid])
        for rank, key in enumerate(key_slices, start=1)
        if key.sop_instance_uid in index
    ]
    if not kept:
        return ()
    rows = [i for _, _, i in kept]
    picked = dataclasses.replace(
        masks,
        hu=masks.hu[rows],
        left=masks.left[rows],
        right=masks.right[rows],
        aerated=masks.aerated[rows],
    )
    opacities = opacity.opacity_mask(picked)
    shape = (hu.shape[1], hu.shape[2])
    images = []
    for j, (rank, key, i) in enumerate(kept):
        rgb = overlay_rgb(
            preprocess.apply_window(hu[i], window),
            left=to_pixels(outline(picked.left[j]), masks.factor, shape),
            right=to_pixels(outline(picked.right[j]), masks.factor, shape),
            opacity=to_pixels(opacities[j], masks.factor, shape),
        )
        images.append(KeyImage(rank, key.sop_instance_uid, key.z, key.positive_score, rgb))
    return tuple(images)
