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


def score_curve(
    points: Sequence[CurvePoint], threshold: float, positive: str, threshold_label: str = ""
) -> Markup:
    """Positive-class score per slice along the body axis (feet left, head right), with the
    threshold as a dashed line named ``threshold_label`` (default "threshold <value>")."""
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
        f'y="{y_thr - 4:.1f}" text-anchor="end" class="tick">'
        f"{escape(threshold_label or f'threshold {threshold:g}')}</text>"
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


@dataclass(frozen=True)
class Strip:
    """One row of a strip plot: a group's name, its colour and its values."""

    name: str
    colour: str
    values: tuple[float, ...]


def _nice_max(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``value``."""
    if value <= 0:
        return 1.0
    power = 10.0 ** np.floor(np.log10(value))
    return float(next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value))


def strip_plot(
    strips: Sequence[Strip],
    *,
    title: str,
    unit: str,
    threshold: float,
    threshold_label: str,
    x_max: float | None = None,
) -> Markup:
    """One row of dots per group (each dot a series) on a shared axis, with each group's median
    as a bar and the threshold as a dashed line: a score distribution by label, readable with a
    handful of series as with hundreds."""
    width, left, right, top, row_h, bottom = 620, 170, 20, 22, 34, 40
    plot_w = width - left - right
    height = top + row_h * len(strips) + bottom
    top_value = max([threshold * 1.5, *(v for s in strips for v in s.values)])
    span = x_max if x_max is not None else _nice_max(top_value)

    def x_of(value: float) -> float:
        return left + plot_w * min(max(value, 0.0), span) / span

    parts = [
        f'<svg class="strips" role="img" aria-label="{escape(title)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">',
    ]
    for i in range(5):
        tick = span * i / 4
        x = x_of(tick)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{height - bottom}" stroke="#e3e7eb"/>'
            f'<text x="{x:.1f}" y="{height - bottom + 14}" text-anchor="middle" class="tick">'
            f"{tick:g}</text>"
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 8}" text-anchor="middle" class="tick">'
        f"{escape(unit)}</text>"
    )
    for row, strip in enumerate(strips):
        y = top + row_h * row + row_h / 2
        parts.append(
            f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(strip.name)} '
            f'<tspan class="tick">n={len(strip.values)}</tspan></text>'
        )
        if strip.values:
            x = x_of(float(np.median(strip.values)))
            parts.append(
                f'<line class="median" x1="{x:.1f}" x2="{x:.1f}" y1="{y - row_h / 2 + 3:.1f}" '
                f'y2="{y + row_h / 2 - 3:.1f}" stroke="{strip.colour}" stroke-width="2.5"/>'
            )
        for j, value in enumerate(strip.values):
            jitter = ((j * 0.618034 + 0.5) % 1.0 - 0.5) * (row_h - 14)  # golden ratio, first at 0
            parts.append(
                f'<circle class="dot" data-group="{escape(strip.name)}" data-value="{value:.4f}" '
                f'cx="{x_of(value):.1f}" cy="{y + jitter:.1f}" r="4" fill="{strip.colour}" '
                f'fill-opacity="0.7" stroke="#fff"><title>{value:.3g}</title></circle>'
            )
    x_thr = x_of(threshold)
    parts.append(
        f'<line x1="{x_thr:.1f}" x2="{x_thr:.1f}" y1="{top - 4}" y2="{height - bottom}" '
        f'stroke="#c0392b" stroke-dasharray="5 4"/><text x="{x_thr + 4:.1f}" y="{top - 6}" '
        f'class="tick">{escape(threshold_label)}</text></svg>'
    )
    return Markup("".join(parts))
