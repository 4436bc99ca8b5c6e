"""Web console, review: a radiologist's label for one series (agree / disagree with the verdict,
the true category) and the local-performance view.

Labels go through ``node.labels.set_series_label``: the same tables and audit trail as
``triage-node labels import``, with the signed-in user as who.  The performance page renders
``node.performance.collect_performance`` as it is (the numbers of ``triage-node performance``),
plus the score distributions by label of the same cases.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from node.db import ChallengerResult, Job, LabelAudit
from node.model_spec import ModelSpec
from node.performance import Case, collect_performance, load_cases, load_challenger_cases
from node.web.dashboard import SeriesRow
from node.web.render import Strip, strip_plot

logger = logging.getLogger(__name__)

AGREEMENT = ("agree", "disagree")
YES_NO = {"yes": True, "no": False}
COVID = {"yes": True, "no": False, "unknown": None}
#: Strip colours by label: truth positive, truth negative, not labelled yet.
LABEL_GROUPS = (
    ("pneumonia", "#c0392b"),
    ("no pneumonia", "#2e86c1"),
    ("unlabelled", "#98a4b0"),
)


#: How ``collect_performance`` names a challenger that has the live model's version number.
CHALLENGER_SUFFIX = " (challenger)"


class LabelFormError(ValueError):
    """A label form that cannot be stored; the message names the field."""


@dataclass(frozen=True)
class LabelChoice:
    pneumonia: bool
    covid: bool | None
    agreement: str  # "agree", "disagree", or "" when the series has no category to agree with

    def source(self, row: SeriesRow) -> str:
        """What the audit trail keeps beside the label: where, and what was agreed with."""
        if not self.agreement:
            return f"web console: no category to compare (series version {row.version})"
        return (
            f"web console: {self.agreement}d with the verdict {row.category} "
            f"(job {row.job_id}, model {row.model or '?'})"
        )


def csrf_token(secret: bytes, user: str, series_id: int) -> str:
    """The hidden form field that ties a label form to the signed-in user and the series."""
    message = f"label\0{user}\0{series_id}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def parse_label_form(form: Mapping[str, str], row: SeriesRow) -> LabelChoice:
    """Validate a posted label form against the series' verdict.

    ``agreement`` (agree / disagree) is required when the series has a category; ``pneumonia``
    (yes / no) may be left empty, then it follows from the agreement; ``covid`` is yes, no or
    unknown.

    Raises
    ------
    LabelFormError
        Naming the field and why.
    """
    agreement = (form.get("agreement") or "").strip()
    pneumonia_text = (form.get("pneumonia") or "").strip()
    covid_text = (form.get("covid") or "unknown").strip()
    if agreement and agreement not in AGREEMENT:
        raise LabelFormError(f"agreement: {agreement!r} is not agree or disagree")
    if pneumonia_text and pneumonia_text not in YES_NO:
        raise LabelFormError(f"pneumonia: {pneumonia_text!r} is not yes or no")
    if covid_text not in COVID:
        raise LabelFormError(f"covid: {covid_text!r} is not yes, no or unknown")
    if not row.category:
        if agreement:
            raise LabelFormError(
                "agreement: this series has no category to agree with; give pneumonia yes or no"
            )
        if not pneumonia_text:
            raise LabelFormError("pneumonia: choose yes or no")
        return LabelChoice(YES_NO[pneumonia_text], COVID[covid_text], "")
    if not agreement:
        raise LabelFormError("agreement: choose agree or disagree with the verdict")
    implied = row.flagged if agreement == "agree" else not row.flagged
    if pneumonia_text and YES_NO[pneumonia_text] != implied:
        raise LabelFormError(
            f"pneumonia: {pneumonia_text!r} contradicts {agreement!r} with "
            f"{'a flagged' if row.flagged else 'an unflagged'} verdict ({row.category_text})"
        )
    return LabelChoice(implied, COVID[covid_text], agreement)


def rule_text(spec: ModelSpec) -> str:
    """The CNN's series rule in words."""
    rule = spec.series_rule
    if rule.kind == "fraction_above":
        return (
            f"the share of slices scoring at least {rule.slice_threshold:g}, "
            f"positive from {rule.series_threshold:g}"
        )
    return f"the mean of the top {rule.k} slice scores, positive from {rule.series_threshold:g}"


def _strips(cases: list[Case], score: str) -> list[Strip]:
    groups: dict[str, list[float]] = {name: [] for name, _ in LABEL_GROUPS}
    for case in cases:
        value = case.po if score == "po" else case.cnn_score
        if value is None:
            continue
        name = "unlabelled" if case.truth is None else "pneumonia" if case.truth else "no pneumonia"
        groups[name].append(float(value))
    return [Strip(name, colour, tuple(groups[name])) for name, colour in LABEL_GROUPS]


def distribution_plots(cases: list[Case], spec: ModelSpec) -> dict[str, Markup]:
    """PO and CNN series score by label, as inline SVG."""
    return {
        "po": strip_plot(
            _strips(cases, "po"),
            title="PO by label",
            unit="PO: opacity, % of lung volume (both lungs)",
            threshold=spec.analysis.po_threshold,
            threshold_label=f"PO threshold {spec.analysis.po_threshold:g} % ({spec.version})",
        ),
        "cnn": strip_plot(
            _strips(cases, "cnn"),
            title="CNN series score by label",
            unit="CNN series score (its series rule: see above)",
            threshold=spec.series_rule.series_threshold,
            threshold_label=f"series rule {spec.series_rule.series_threshold:g} ({spec.version})",
            x_max=1.0,
        ),
    }


def performance_key(sessions: sessionmaker[Any]) -> tuple[Any, ...]:
    """What the performance numbers depend on, in one cheap query: jobs finished or delivered,
    label changes (every change has an audit row), challenger verdicts.  Equal keys: equal
    numbers, so the page can reuse them (the AUC bootstrap takes seconds with 1000 series)."""
    with sessions() as session:
        return tuple(
            session.execute(
                select(
                    select(func.count(Job.id)).scalar_subquery(),
                    select(func.max(Job.finished_at)).scalar_subquery(),
                    select(func.max(Job.delivered_at)).scalar_subquery(),
                    select(func.max(LabelAudit.id)).scalar_subquery(),
                    select(func.count(ChallengerResult.id)).scalar_subquery(),
                )
            ).one()
        )


def performance_context(
    sessions: sessionmaker[Any], spec: ModelSpec, challenger_spec: ModelSpec | None = None
) -> dict[str, Any]:
    """What the performance page shows: ``collect_performance`` as it is, one entry per model
    version it returns (a challenger's marked), with the distribution plots of that version's
    cases; their threshold lines are the live model's (``spec``), a challenger's its own
    (``challenger_spec``, the loaded challenger)."""
    report = collect_performance(sessions)
    live: dict[str, list[Case]] = {}
    for case in load_cases(sessions):
        live.setdefault(case.model_version, []).append(case)
    challengers = load_challenger_cases(sessions)
    versions = []
    for version, numbers in report["model_versions"].items():
        challenger = numbers.get("role") == "challenger"
        if challenger:
            cases = challengers.get(version.removesuffix(CHALLENGER_SUFFIX), [])
        else:
            cases = live.get(version, [])
        versions.append(
            {
                "version": version,
                "m": numbers,
                "challenger": challenger,
                "plots": distribution_plots(
                    cases, challenger_spec if challenger and challenger_spec else spec
                )
                if cases
                else None,
            }
        )
    return {"report": report, "versions": versions}
