"""Web console, drawing: grey images (plain or with lung outlines and the opacity map drawn over)
as PNG data URIs, probabilities and score curves as SVG.

Server-side and dependency-free (Pillow is already the node's), so the pages need no chart
library and no front-end build.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np
from markupsafe import Markup
from PIL import Image

#: Overlay colours (RGB): the two lungs' outlines and the opacity map, as the page's legend says.
LEFT_LUNG_RGB = (255, 200, 0)  # amber
RIGHT_LUNG_RGB = (0, 200, 255)  # sky blue
OPACITY_RGB = (255, 30, 30)
OPACITY_ALPHA = 0.45


def _data_uri(img: Image.Image, max_size: int) -> str:
    img.thumbnail((max_size, max_size))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _grey_pixels(unit: np.ndarray) -> np.ndarray:
    return (np.clip(unit, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def png_data_uri(unit: np.ndarray, max_size: int = 512) -> str:
    """A [0, 1] grey image as a ``data:image/png`` URI, at most ``max_size`` pixels a side."""
    return _data_uri(Image.fromarray(_grey_pixels(unit)), max_size)


def outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of a 2-D mask that touch its outside (4-neighbours): a one-pixel contour."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay_rgb(
    unit: np.ndarray, left: np.ndarray, right: np.ndarray, opacity: np.ndarray
) -> np.ndarray:
    """A [0, 1] grey slice with lung outlines and the opacity map drawn over it (uint8 RGB).

    ``left`` and ``right`` are the outline pixels of each lung (drawn opaque, ``LEFT_LUNG_RGB``
    and ``RIGHT_LUNG_RGB``), ``opacity`` the opacity voxels (``OPACITY_RGB`` blended at
    ``OPACITY_ALPHA``, so the grey underneath stays readable); all of the slice's shape.
    """
    rgb = np.repeat(_grey_pixels(unit)[..., np.newaxis], 3, axis=2).astype(np.float32)
    red = np.asarray(OPACITY_RGB, dtype=np.float32)
    rgb[opacity] = (1.0 - OPACITY_ALPHA) * rgb[opacity] + OPACITY_ALPHA * red
    rgb[left] = LEFT_LUNG_RGB
    rgb[right] = RIGHT_LUNG_RGB
    return (rgb + 0.5).astype(np.uint8)


def rgb_data_uri(rgb: np.ndarray, max_size: int = 512) -> str:
    """A uint8 RGB image (e.g. from ``overlay_rgb``) as a PNG URI, at most ``max_size`` a side."""
    return _data_uri(Image.fromarray(rgb), max_size)


def overlay_data_uri(
    unit: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    opacity: np.ndarray,
    max_size: int = 512,
) -> str:
    """``overlay_rgb`` as a PNG URI, at most ``max_size`` pixels a side."""
    return rgb_data_uri(overlay_rgb(unit, left, right, opacity), max_size)


def bar_chart(probabilities: Sequence[tuple[str, float]], highlight: str) -> Markup:
    """Horizontal bars, one per class, the ``highlight`` class in the warning colour."""
    row_h, label_w, bar_w = 30, 130, 260
    height = row_h * len(probabilities) + 6
    width = label_w + bar_w + 70
    parts = [
        f'<svg class="bars" role="img" aria-label="class probabilities" width="{width}"'
        f' height="{height}" viewBox="0 0 {width} {height}">'
    ]
    for i, (name, p) in enumerate(probabilities):
        y = 4 + i * row_h
        colour = "#c0392b" if name == highlight else "#2e86c1"
        length = max(1.0, bar_w * float(p))
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 18}" text-anchor="end">{escape(name)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{bar_w}" height="20" fill="#eef1f4"/>'
            f'<rect class="bar" data-class="{escape(name)}" data-p="{p:.4f}" x="{label_w}" '
            f'y="{y + 3}" width="{length:.1f}" height="20" fill="{colour}"/>'
            f'<text x="{label_w + bar_w + 8}" y="{y + 18}">{100 * p:.1f}%</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


@dataclass(frozen=True)
class CurvePoint:
    """One slice on the body axis: position (mm), positive-class score, used by the node or not."""

    z: float
    score: float
    selected: bool
    rank: int | None = None  # 1 = most suspicious of the slices the verdict names


def score_curve(points: Sequence[CurvePoint], threshold: float, positive: str) -> Markup:
    """Positive-class score per slice along the body axis (feet left, head right)."""
    width, height, left, right, top, bottom = 720, 230, 48, 12, 12, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    if not points:
        return Markup("")
    z = np.array([p.z for p in points], dtype=float)
    z_min, z_max = float(z.min()), float(z.max())
    span = z_max - z_min or 1.0

    def x_of(value: float) -> float:
        return left + plot_w * (value - z_min) / span

    def y_of(score: float) -> float:
        return top + plot_h * (1.0 - score)

    parts = [
        f'<svg class="curve" role="img" aria-label="{escape(positive)} score per slice" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fbfcfd" '
        'stroke="#ccd"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y_of(tick)
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e7eb"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{tick:g}</text>'
        )
    y_thr = y_of(threshold)
    parts.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{y_thr:.1f}" y2="{y_thr:.1f}" '
        f'stroke="#c0392b" stroke-dasharray="5 4"/><text x="{left + plot_w - 4}" '
        f'y="{y_thr - 4:.1f}" text-anchor="end" class="tick">threshold {threshold:g}</text>'
    )
    line = " ".join(f"{x_of(p.z):.1f},{y_of(p.score):.1f}" for p in points)
    parts.append(f'<polyline points="{line}" fill="none" stroke="#2e86c1" stroke-width="1.5"/>')
    for p in points:
        colour = "#2e86c1" if p.selected else "#b8c2cc"
        parts.append(
            f'<circle cx="{x_of(p.z):.1f}" cy="{y_of(p.score):.1f}" r="{4 if p.rank else 2.5}" '
            f'fill="{"#c0392b" if p.rank else colour}"><title>z {p.z:.1f} mm: {p.score:.3f}'
            f"{'' if p.selected else ' (too little lung: not used)'}</title></circle>"
        )
        if p.rank:
            parts.append(
                f'<text x="{x_of(p.z):.1f}" y="{y_of(p.score) - 8:.1f}" text-anchor="middle" '
                f'class="rank">{p.rank}</text>'
            )
    parts.append(
        f'<text x="{left}" y="{height - 8}" class="tick">z {z_min:.0f} mm (feet)</text>'
        f'<text x="{left + plot_w}" y="{height - 8}" text-anchor="end" class="tick">'
        f"z {z_max:.0f} mm (head)</text>"
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 8}" text-anchor="middle" class="tick">'
        "slice position along the body axis; grey: too little lung, not used</text></svg>"
    )
    return Markup("".join(parts))
