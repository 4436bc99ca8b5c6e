"""Analysis results: the in-memory records passed from inference to the report and the database."""

from __future__ import annotations

from dataclasses import dataclass, field

from node.assess import Assessment
from node.opacity import Quantification


@dataclass(frozen=True)
class SliceScore:
    """One classified slice: its SOP Instance UID, position along the body axis, class scores."""

    sop_instance_uid: str
    sop_class_uid: str
    z: float
    probabilities: tuple[float, ...]
    positive_score: float


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str
    version: str
    sha256: str
    notice: str = ""  # the model's own caveat, shown to the radiologist in the SR


@dataclass(frozen=True)
class SeriesVerdict:
    """The outcome of one analysis of one series version.

    ``analysed`` is False when the series could not be analysed; ``reason`` then says why and the
    report says "not analysed" with that reason.  ``finding`` is one of ``classes`` when analysed.
    """

    study_instance_uid: str
    series_instance_uid: str
    series_version: int
    algorithm: AlgorithmInfo
    analysed: bool
    classes: tuple[str, ...] = ()
    finding: str | None = None
    probabilities: tuple[float, ...] = ()
    series_score: float | None = None
    rule: str = ""
    slices_total: int = 0
    slices_analysed: int = 0
    top_slices: tuple[SliceScore, ...] = field(default_factory=tuple)
    reason: str = ""
    # the Hounsfield analysis (node.lungs -> node.opacity -> node.assess); None if not analysed
    quantification: Quantification | None = None
    assessment: Assessment | None = None
    analysis_version: str = ""
    key_slices: tuple[SliceScore, ...] = field(default_factory=tuple)  # most opacity first
    coverage: tuple[str, ...] = ()  # caveats about what the series covers

    @property
    def category(self) -> str:
        """The triage category (``node.assess``), or "not analysed"."""
        if not self.analysed or self.assessment is None:
            return "not analysed"
        return self.assessment.category

    def as_json(self) -> dict[str, object]:
        """Plain dict for ``classify`` output, the database and logs (no patient data in here)."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "series_version": self.series_version,
            "analysed": self.analysed,
            "finding": self.finding,
            # a not-analysed verdict has no probabilities
            "probabilities": dict(zip(self.classes, self.probabilities, strict=True))
            if self.probabilities
            else {},
            "series_score": self.series_score,
            "rule": self.rule,
            "slices_total": self.slices_total,
            "slices_analysed": self.slices_analysed,
            "top_slices": [
                {"sop_instance_uid": s.sop_instance_uid, "z": s.z, "score": s.positive_score}
                for s in self.top_slices
            ],
            "reason": self.reason,
            "model": {"name": self.algorithm.name, "version": self.algorithm.version},
            "category": self.category,
            "assessment": self.assessment.as_json() if self.assessment else None,
            "quantification": self.quantification.as_json() if self.quantification else None,
            "analysis_version": self.analysis_version,
            "key_slices": [
                {"sop_instance_uid": s.sop_instance_uid, "z": s.z, "po": s.positive_score}
                for s in self.key_slices
            ],
            "coverage": list(self.coverage),
        }
