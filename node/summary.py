"""Report stage, summary image: one Secondary Capture that any viewer displays.

Every PACS viewer shows an image, while many show an SR poorly or not at all.  The summary is a
single RGB Secondary Capture in its own series of the source study:

- a banner burned in: "AI triage aid, not a diagnosis", the node and model versions;
- the category (RSNA wording) or "Not analysed" and why, the pneumonia-range flag;
- volumes, PO and PHO per lung, zone and band (``node.wording``: the text SR's sentences);
- the opacity per slice along the body axis (the key slices marked), and the CNN's slice
  score below it, labelled as reference only;
- the key slices with both lungs outlined and the opacity in red (``node.figures``: the
  console's drawing), with the legend;
- the caveats, the CNN's output, the disclaimer and the model notice.

No patient name, ID or birth date is burned in: the viewer shows those from the header.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.figures import KeyImage
from node.opacity import BANDS, SIDES, ZONES, Region
from node.report import SOFTWARE_VERSION, check_evidence, result_attributes
from node.sanitise import nameless_source
from node.verdict import SeriesVerdict
from node.web.render import LEFT_LUNG_RGB, OPACITY_RGB, RIGHT_LUNG_RGB
from node.wording import TRIAGE_AID, describe

SERIES_DESCRIPTION = "Lung opacity triage (AI) summary - not a diagnosis"
WIDTH = 1280
MARGIN = 24
KEY_SIZE = 400  # each key slice, pixels a side (three side by side)
BACKGROUND = (0, 0, 0)
TEXT = (235, 235, 235)
MUTED = (160, 160, 160)
BANNER = (150, 30, 20)
FLAGGED = (255, 160, 40)  # read first
CLEAR = (120, 200, 120)  # no significant opacity
CURVE = (90, 170, 255)
MIN_SECTION_SHARE = 0.1
GRID = (60, 60, 60)


@dataclass(frozen=True)
class Curves:
    """Per-slice values along the body axis, for the summary's plots."""

    # (z mm, PO %) of the slices with at least ``MIN_SECTION_SHARE`` of the largest lung section:
    # a sliver of lung at the apex or the base has a large PO and little to show
    slice_po: tuple[tuple[float, float], ...] = ()
    cnn: tuple[tuple[float, float], ...] = ()  # (z mm, positive-class score) of classified slices


def build_summary(
    verdict: SeriesVerdict,
    evidence: Sequence[Dataset],
    key_images: Sequence[KeyImage],
    curves: Curves,
    *,
    series_number: int,
    manufacturer: str = "triage-node",
    software_version: str = SOFTWARE_VERSION,
    institution_name: str | None = None,
) -> SCImage:
    """The summary Secondary Capture of ``verdict``.

    Parameters
    ----------
    verdict
        The analysis outcome (analysed or not).
    evidence
        Headers of the source CT instances (patient and study come from the first).
    key_images
        ``figures.draw_key_slices`` of the verdict's key slices (may be empty).
    curves
        Slice PO and CNN score along the body axis (may be empty).
    series_number
        Series Number of the summary series.
    manufacturer, software_version, institution_name
        As for ``node.report.build_report``.

    Returns
    -------
    highdicom.sc.SCImage
        RGB, 8 bits, burned-in annotation, in the source study, UIDs from
        ``report.result_uids(..., kind="summary")``.
    """
    check_evidence(verdict, evidence)
    source, patient_name = nameless_source(evidence[0])  # no name for highdicom to quote
    pixels = render(verdict, key_images, curves, software_version)
    sc = SCImage.from_ref_dataset(
        source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "P"),  # required by highdicom; emptied below
        transfer_syntax_uid=ExplicitVRLittleEndian,
        institution_name=institution_name,
        **result_attributes(
            verdict,
            "summary",
            series_number=series_number,
            series_description=SERIES_DESCRIPTION,
            manufacturer=manufacturer,
            software_version=software_version,
        ),
    )
    sc.copy_patient_and_study_information(source)  # all of it, as for the SRs
    sc.add(patient_name)
    sc.PatientOrientation = []  # a composed page has no patient orientation (Type 2C: empty)
    sc.BodyPartExamined = "CHEST"  # unpaired: no Laterality needed
    sc.ConversionType = "SYN"  # synthetic image (PS3.3 C.8.6.1), not a digitised one
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{TRIAGE_AID}: lung opacity triage summary"
    if verdict.key_slices:
        sc.SourceImageSequence = [
            _reference(s.sop_class_uid, s.sop_instance_uid) for s in verdict.key_slices
        ]
    return sc


def _reference(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


# --- Drawing -----------------------------------------------------------------------------------


Font: TypeAlias = ImageFont.FreeTypeFont | ImageFont.ImageFont
_SPELLED = str.maketrans(
    {"\u2265": ">=", "\u2264": "<=", "\u00d7": "x", "\u2013": "-", "\u2014": "-", "\u2026": "..."}
)  # >=, <=, times, en and em dash, ellipsis


def drawable(text: str) -> str:
    """``text`` in characters Pillow's own font has (Latin-1): the usual signs spelled out."""
    spelled = text.translate(_SPELLED)
    return spelled.encode("latin-1", "replace").decode("latin-1")


def _font(size: int) -> Font:
    """Pillow's own font (bundled with it: no system font needed, same pixels everywhere)."""
    return ImageFont.load_default(size=size)


class _Page:
    """A tall canvas written top to bottom; ``image()`` crops it to what was drawn."""

    def __init__(self, height: int = 2400) -> None:
        self.canvas = Image.new("RGB", (WIDTH, height), BACKGROUND)
        self.draw = ImageDraw.Draw(self.canvas)
        self.y = 0

    def text(
        self,
        text: str,
        size: int,
        colour: tuple[int, int, int] = TEXT,
        *,
        x: int = MARGIN,
        width: int = WIDTH - 2 * MARGIN,
        gap: int = 6,
    ) -> None:
        """``text`` wrapped into ``width`` pixels from ``x``, advancing ``y``."""
        font = _font(size)
        for line in self.wrap(drawable(text), font, width):
            self.draw.text((x, self.y), line, font=font, fill=colour)
            self.y += size + gap

    def wrap(self, text: str, font: Font, width: int) -> list[str]:
        """Greedy word wrap by measured width (a single over-long word is cut)."""
        lines: list[str] = []
        line = ""
        for word in text.split():
            candidate = f"{line} {word}" if line else word
            if self.draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while self.draw.textlength(word, font=font) > width:
                cut = max(1, int(len(word) * width / self.draw.textlength(word, font=font)))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        return [*lines, line] if line else lines or [""]

    def image(self) -> np.ndarray:
        height = self.y + MARGIN
        return np.asarray(self.canvas.crop((0, 0, WIDTH, height + height % 2)), dtype=np.uint8)


def render(
    verdict: SeriesVerdict,
    key_images: Sequence[KeyImage],
    curves: Curves,
    software_version: str = SOFTWARE_VERSION,
) -> np.ndarray:
    """The summary page of ``verdict`` as uint8 RGB pixels (rows, ``WIDTH``, 3)."""
    words = describe(verdict)
    page = _Page()
    _banner(page, verdict, software_version)
    a = verdict.assessment
    colour = MUTED if a is None or not verdict.analysed else FLAGGED if a.pneumonia else CLEAR
    page.text(words.headline, 34, colour)
    if words.flag:
        page.text(words.flag, 22, colour)
    page.y += 10
    top = page.y
    if verdict.analysed and verdict.quantification is not None:
        _table(page, verdict)
        table_bottom = page.y
        page.y = top
        _plots(page, verdict, curves)
        page.y = max(page.y, table_bottom) + 16
    if key_images:
        _key_row(page, key_images)
    for text in (words.cnn, *words.caveats):
        if text:
            page.text(text, 17, MUTED)
    page.y += 6
    for text in words.notices:
        page.text(text, 17, TEXT)
    return page.image()


def _banner(page: _Page, verdict: SeriesVerdict, software_version: str) -> None:
    page.draw.rectangle((0, 0, WIDTH, 56), fill=BANNER)
    page.draw.text((MARGIN, 12), TRIAGE_AID.upper(), font=_font(30), fill=(255, 255, 255))
    right = drawable(
        f"Lung opacity triage - triage-node {software_version}, "
        f"{verdict.algorithm.name} {verdict.algorithm.version}"
    )
    font = _font(16)
    width = page.draw.textlength(right, font=font)
    page.draw.text((WIDTH - MARGIN - width, 20), right, font=font, fill=(255, 230, 220))
    page.y = 56 + 14


def _table(page: _Page, verdict: SeriesVerdict) -> None:
    """Volume, PO and PHO of each lung and both; PO of each zone and band (left column)."""
    q = verdict.quantification
    assert q is not None
    rows: list[tuple[str, ...]] = [
        ("", "left", "right", "both"),
        ("lung volume, mL", *(f"{r.volume_ml:.0f}" for r in (*_sides(q.lungs), q.total))),
        ("PO, %", *(f"{r.po:.2f}" for r in (*_sides(q.lungs), q.total))),
        ("PHO, %", *(f"{r.pho:.2f}" for r in (*_sides(q.lungs), q.total))),
    ]
    rows += [
        (f"PO {z} zone", *(f"{q.zones[s][z].po:.2f}" for s in SIDES), f"{q.zone(z).po:.2f}")
        for z in ZONES
    ]
    rows += [
        (f"PO {b} band", *(f"{q.bands[s][b].po:.2f}" for s in SIDES), f"{q.band(b).po:.2f}")
        for b in BANDS
    ]
    font = _font(20)
    columns = (MARGIN, MARGIN + 250, MARGIN + 370, MARGIN + 490)
    for i, row in enumerate(rows):
        colour = MUTED if i == 0 else TEXT
        for j, (x, cell) in enumerate(zip(columns, row, strict=True)):
            if j == 0:
                page.draw.text((x, page.y), cell, font=font, fill=colour)
            else:  # numbers right-aligned in their column
                w = page.draw.textlength(cell, font=font)
                page.draw.text((x + 100 - w, page.y), cell, font=font, fill=colour)
        page.y += 28
    small = _font(15)
    for note in (
        "PO: opacity -700..+100 HU, vessels removed, / lung volume",
        "PHO: the part at or above -200 HU / lung volume",
    ):
        page.draw.text((MARGIN, page.y), note, font=small, fill=MUTED)
        page.y += 20


def _sides(regions: dict[str, Region]) -> list[Region]:
    return [regions[s] for s in SIDES]


def _plots(page: _Page, verdict: SeriesVerdict, curves: Curves) -> None:
    """Slice PO along the body axis (key slices marked), then the CNN's slice score."""
    x0, x1 = 650, WIDTH - MARGIN
    ranks = {round(s.z, 3): i for i, s in enumerate(verdict.key_slices, start=1)}
    z = [p[0] for p in (*curves.slice_po, *curves.cnn)]
    if not z:
        return
    z_range = (min(z), max(z))  # one axis for both plots
    if curves.slice_po:
        top = max(5.0, float(np.ceil(max(po for _, po in curves.slice_po))))
        title = "opacity per slice (PO, %; lung slivers left out), feet -> head; key slices"
        _plot(page, curves.slice_po, z_range, (x0, x1), 170, top, title, ranks, "%")
    if curves.cnn:
        page.y += 8
        title = "CNN score per slice (reference only)"
        _plot(page, curves.cnn, z_range, (x0, x1), 90, 1.0, title, {}, "")


def _plot(
    page: _Page,
    points: Sequence[tuple[float, float]],
    z_range: tuple[float, float],
    span: tuple[int, int],
    height: int,
    top: float,
    title: str,
    ranks: dict[float, int],
    unit: str,
) -> None:
    draw, (x0, x1) = page.draw, span
    draw.text((x0, page.y), title, font=_font(16), fill=MUTED)
    page.y += 22
    y0, y1 = page.y, page.y + height
    draw.rectangle((x0, y0, x1, y1), outline=GRID)
    z_min, z_max = z_range
    width = (z_max - z_min) or 1.0

    def xy(zv: float, v: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * (zv - z_min) / width, y1 - (y1 - y0) * min(v, top) / top

    small = _font(13)
    for frac in (0.5, 1.0):
        y = y1 - (y1 - y0) * frac
        draw.line((x0, y, x1, y), fill=GRID)
        draw.text(
            (x0 - 6 - draw.textlength(f"{top * frac:g}{unit}", font=small), y - 7),
            f"{top * frac:g}{unit}",
            font=small,
            fill=MUTED,
        )
    ordered = sorted(points)
    draw.line([xy(zv, v) for zv, v in ordered], fill=CURVE, width=2)
    for zv, v in ordered:
        rank = ranks.get(round(zv, 3))
        if rank is not None:
            x, y = xy(zv, v)
            draw.line((x, y0, x, y1), fill=OPACITY_RGB)
            label_y = y0 + 2 + 17 * (rank - 1)  # neighbouring key slices: labels one below another
            draw.text((x + 3, label_y), str(rank), font=_font(16), fill=OPACITY_RGB)
    draw.text((x0, y1 + 2), f"z {z_min:.0f} mm", font=small, fill=MUTED)
    label = f"z {z_max:.0f} mm"
    draw.text((x1 - draw.textlength(label, font=small), y1 + 2), label, font=small, fill=MUTED)
    page.y = y1 + 20


def _key_row(page: _Page, key_images: Sequence[KeyImage]) -> None:
    """The key slices side by side, each with its rank, position and slice PO; the legend."""
    gap = (WIDTH - 2 * MARGIN - 3 * KEY_SIZE) // 2
    font = _font(18)
    for i, key in enumerate(key_images[:3]):
        x = MARGIN + i * (KEY_SIZE + gap)
        tile = Image.fromarray(key.rgb).resize((KEY_SIZE, KEY_SIZE), Image.Resampling.LANCZOS)
        page.canvas.paste(tile, (x, page.y + 26))
        caption = f"{key.rank}: z {key.z:.0f} mm, slice PO {key.po:.1f} %"
        page.draw.text((x, page.y), caption, font=font, fill=TEXT)
    page.y += 26 + KEY_SIZE + 8
    x = MARGIN
    for colour, label in (
        (LEFT_LUNG_RGB, "left lung outline"),
        (RIGHT_LUNG_RGB, "right lung outline"),
        (OPACITY_RGB, "opacity (PO)"),
    ):
        page.draw.rectangle((x, page.y + 4, x + 14, page.y + 18), fill=colour)
        page.draw.text((x + 20, page.y), label, font=_font(16), fill=MUTED)
        x += 40 + int(page.draw.textlength(label, font=_font(16)))
    page.y += 30


__all__ = ["Curves", "build_summary", "render"]
