"""Report stage, words: the verdict in the sentences every human-readable output shows.

The Basic Text SR (``node.textsr``) and the summary image (``node.summary``) say the same
things in the same words: the category, the flag, PO/PHO per lung, zone and band, the key
slices, the CNN's output (named as the CNN's), the caveats, the disclaimer and the model
notice.  The TID 1500 SR (``node.report``) carries the same content as coded items.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.assess import CATEGORY_TEXT
from node.opacity import BANDS, SIDES, ZONES, Quantification
from node.verdict import SeriesVerdict

TRIAGE_AID = "AI triage aid, not a diagnosis"
"""Burned into the summary image and the first line of every text report."""

DISCLAIMER = (
    f"{TRIAGE_AID}: produced by software (Hounsfield opacity measurement and an AI model) "
    "without human review. A radiologist must read the images."
)
MODEL_NOTICE_PREFIX = "Model notice: "
NOT_ANALYSED_PREFIX = "Not analysed: "
COVERAGE_PREFIX = "Coverage: "
ASSESSMENT_PREFIX = "Assessment: "
PO_EXPLAINED = "PO = opacity (-700..+100 HU, vessels removed) / lung volume"
PHO_EXPLAINED = "PHO = the part at or above -200 HU / lung volume"


@dataclass(frozen=True)
class Wording:
    """One verdict in sentences, grouped as the outputs show them."""

    headline: str  # the category in the RSNA wording, or "Not analysed: why"
    flag: str  # pneumonia-range opacity present / absent, and the likelihood; "" if not analysed
    measurements: tuple[str, ...]  # volumes, PO and PHO per lung, zone and band
    key_slices: str  # where the most opacity is; "" when none
    cnn: str  # the CNN's output, named as the CNN's; "" when it did not run
    caveats: tuple[str, ...]  # coverage caveats and the assessment's reasons
    notices: tuple[str, ...]  # the disclaimer and the model notice


def describe(verdict: SeriesVerdict) -> Wording:
    """The sentences of ``verdict`` (no patient data in them)."""
    a = verdict.assessment
    if not verdict.analysed or a is None:
        headline = NOT_ANALYSED_PREFIX + (verdict.reason or "no reason given")
        flag = ""
    else:
        headline = CATEGORY_TEXT[a.category]
        flag = (
            "Pneumonia-range lung opacity: "
            + ("PRESENT - read first" if a.pneumonia else "absent")
            + f"; COVID-19 likelihood of this category: {a.covid_likelihood}"
        )
    q = verdict.quantification
    measurements = () if q is None or not verdict.analysed else quantification_lines(q)
    key = ""
    if verdict.key_slices:
        key = "Key slices (most opacity by volume): " + ", ".join(
            f"{rank}: z {s.z:.0f} mm, slice PO {s.positive_score:.1f} %"
            for rank, s in enumerate(verdict.key_slices, start=1)
        )
    cnn = ""
    if verdict.finding is not None and verdict.series_score is not None:
        cnn = (
            f"CNN slice classifier (reference only): class {verdict.finding}, series score "
            f"{verdict.series_score:.3f} ({verdict.rule or 'series rule'}), "
            f"{verdict.slices_analysed} of {verdict.slices_total} slices classified"
        )
    caveats = tuple(COVERAGE_PREFIX + c for c in verdict.coverage)
    if a is not None:
        caveats += tuple(ASSESSMENT_PREFIX + r for r in a.reasons)
    notices: tuple[str, ...] = (DISCLAIMER,)
    if verdict.algorithm.notice:
        notices += (MODEL_NOTICE_PREFIX + verdict.algorithm.notice,)
    return Wording(headline, flag, measurements, key, cnn, caveats, notices)


def quantification_lines(q: Quantification) -> tuple[str, ...]:
    """Volumes, PO and PHO: both lungs and each, then PO per zone and band of each lung."""
    t, left, right = q.total, q.lungs["left"], q.lungs["right"]
    lines = [
        f"Lung volume: both {t.volume_ml:.0f} mL (left {left.volume_ml:.0f}, "
        f"right {right.volume_ml:.0f})",
        f"PO: both {t.po:.2f} % (left {left.po:.2f} %, right {right.po:.2f} %); {PO_EXPLAINED}",
        f"PHO: both {t.pho:.2f} % (left {left.pho:.2f} %, right {right.pho:.2f} %); "
        f"{PHO_EXPLAINED}",
    ]
    lines += [
        f"PO {part} zone: left {q.zones[SIDES[0]][part].po:.2f} %, "
        f"right {q.zones[SIDES[1]][part].po:.2f} %"
        for part in ZONES
    ]
    lines += [
        f"PO {part} band: left {q.bands[SIDES[0]][part].po:.2f} %, "
        f"right {q.bands[SIDES[1]][part].po:.2f} %"
        for part in BANDS
    ]
    return tuple(lines)
