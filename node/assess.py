"""Assessment stage: opacity burden and distribution (+ the CNN) -> a category a radiologist knows.

Categories follow the RSNA consensus statement on chest CT reporting of COVID-19 pneumonia
(Simpson et al., Radiology: Cardiothoracic Imaging 2020), read from Hounsfield measurements:

- **negative**: no significant opacity (PO below the fitted ``po_threshold``);
- **typical**: bilateral, peripheral-predominant opacity, mostly ground glass;
- **atypical**: opacity that is unilateral and consolidation-dominant, or a solitary focus
  (lobar pneumonia, a mass): features the RSNA lists as uncommon in COVID-19;
- **indeterminate**: opacity without the typical pattern and without atypical features.

The triage flag is "pneumonia-range opacity present" (any category but negative): it is what the
Hounsfield measurements support across scanners.  The COVID-19 likelihood is the category's, as
the RSNA defines it; it is not a diagnosis, and the CNN score only moves it where the model's
``analysis.cnn_weight`` says so (0 in the shipped model: the CNN was measured at chance on
Hounsfield series, see ``model.json``).  Every threshold lives in the model's ``model.json``
(``node.model_spec.AnalysisSpec``), with its justification.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.model_spec import AnalysisSpec
from node.opacity import SIDES, Quantification

NEGATIVE = "negative"
TYPICAL = "typical"
INDETERMINATE = "indeterminate"
ATYPICAL = "atypical"
CATEGORIES = (TYPICAL, INDETERMINATE, ATYPICAL, NEGATIVE)

CATEGORY_TEXT = {
    TYPICAL: "Typical appearance of COVID-19 pneumonia",
    INDETERMINATE: "Indeterminate appearance for COVID-19 pneumonia",
    ATYPICAL: "Atypical appearance for COVID-19 pneumonia",
    NEGATIVE: "No significant lung opacity",
}
LIKELIHOOD = {TYPICAL: "high", INDETERMINATE: "intermediate", ATYPICAL: "low", NEGATIVE: "low"}


@dataclass(frozen=True)
class Assessment:
    """The series' category, triage flag and the features that decided them."""

    category: str
    pneumonia: bool  # pneumonia-range opacity present: read this series first
    covid_likelihood: str  # high / intermediate / low
    bilateral: bool
    peripheral_ratio: float  # PO of the peripheral band / PO of the central band
    lower_ratio: float  # PO of the lower zones / PO of the upper zones
    ground_glass_share: float
    focality: float
    reasons: tuple[str, ...]

    @property
    def text(self) -> str:
        return CATEGORY_TEXT[self.category]

    def as_json(self) -> dict[str, object]:
        return {
            "category": self.category,
            "category_text": self.text,
            "pneumonia": self.pneumonia,
            "covid_likelihood": self.covid_likelihood,
            "bilateral": self.bilateral,
            "peripheral_ratio": round(self.peripheral_ratio, 2),
            "lower_ratio": round(self.lower_ratio, 2),
            "ground_glass_share": round(self.ground_glass_share, 3),
            "focality": round(self.focality, 3),
            "reasons": list(self.reasons),
        }


def _ratio(a: float, b: float) -> float:
    """``a / b`` for percentages, bounded so that an empty denominator stays finite."""
    return min(99.0, a / max(b, 0.01))


def assess(q: Quantification, spec: AnalysisSpec, cnn_score: float | None = None) -> Assessment:
    """Categorise one series from its quantification (and the CNN score, weighted by ``spec``)."""
    po = q.total.po + spec.cnn_weight * (cnn_score or 0.0)
    side_po = [q.lungs[s].po for s in SIDES]
    bilateral = min(side_po) >= spec.bilateral_fraction * spec.po_threshold
    peripheral = _ratio(q.band("peripheral").po, q.band("central").po)
    lower = _ratio(q.zone("lower").po, q.zone("upper").po)
    gg = q.ground_glass_share
    reasons = [f"PO {q.total.po:.1f}% (threshold {spec.po_threshold:g}%)"]
    if po < spec.po_threshold:
        category = NEGATIVE
    else:
        reasons.append(
            f"{'bilateral' if bilateral else 'unilateral'} (left {side_po[0]:.1f}%, "
            f"right {side_po[1]:.1f}%), peripheral/central {peripheral:.1f}, "
            f"ground glass {100 * gg:.0f}%, largest focus {100 * q.focality:.0f}%"
        )
        # one focus holding most of the opacity in one lung: a mass or a lobar consolidation
        # (confluent disease in both lungs can also be one 3-D component: not solitary)
        solitary = q.focality >= spec.solitary_focality and not bilateral
        consolidation = gg < spec.ground_glass_share
        if solitary or (not bilateral and consolidation):
            category = ATYPICAL
        elif bilateral and peripheral >= spec.peripheral_ratio and not consolidation:
            category = TYPICAL
        else:
            category = INDETERMINATE
    return Assessment(
        category=category,
        pneumonia=category != NEGATIVE,
        covid_likelihood=LIKELIHOOD[category],
        bilateral=bilateral,
        peripheral_ratio=peripheral,
        lower_ratio=lower,
        ground_glass_share=gg,
        focality=q.focality,
        reasons=tuple(reasons),
    )
