"""Monitoring stage: input and score drift of the analysed series against the model's
reference summary (``model.json`` ``reference``, written by ``training.analysis``).

Every analysis records the input mix of its series (``record_inputs``: manufacturer, scanner
model, convolution kernel, slice thickness band, contrast).  A scheduler job (weekly by default,
``drift.interval_hours``) compares the series analysed in the last ``drift.window_days`` with the
reference (``run_drift``) and stores the comparison (:class:`node.db.DriftReport`);
``current_warning`` gives the console, ``triage-node status`` and ``/metrics`` its warning.

The statistics and their thresholds (README, "Drift"):

- input mix, per feature: population stability index, ``PSI = sum (c - r) ln(c / r)`` over the
  categories of both, proportions smoothed with ``PSEUDO_COUNT`` per category (the reference has
  11 series: a category it lacks would otherwise give an infinite PSI).  PSI above
  ``PSI_THRESHOLD`` (0.25, the conventional "significant shift") is drift.  The share of series
  whose value the reference never saw is reported beside it.
- PO and the CNN series score: the two-sample Kolmogorov-Smirnov test (exact for these sizes),
  drift when ``p < KS_ALPHA`` (0.01).  Binning 11 reference values for a PSI would be noise; KS
  uses the values themselves and its p-value accounts for the small reference.
- nothing is called drift before ``drift.min_series`` series (30 by default) are in the window.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pydicom
from scipy.stats import ks_2samp
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from node.config import DriftSettings
from node.db import DriftReport, Job, JobInput, utcnow
from node.model_spec import ModelSpec, ReferenceSummary

logger = logging.getLogger(__name__)

MIX_FEATURES = ("manufacturer", "scanner_model", "kernel", "slice_thickness", "contrast")
SCORE_FEATURES = ("po", "cnn_score")
PSI_THRESHOLD = 0.25
KS_ALPHA = 0.01
PSEUDO_COUNT = 0.5
MIN_REFERENCE_VALUES = 5  # fewer reference values of a score: that score is not compared
#: upper edges (mm) of the slice thickness bands; thicker is "> 5 mm"
THICKNESS_BANDS = ((1.25, "<= 1.25 mm"), (3.1, "1.25-3 mm"), (5.1, "3-5 mm"))
UNKNOWN = "unknown"


@dataclass(frozen=True)
class InputMix:
    """The input features of one series, as its first header states them."""

    manufacturer: str
    scanner_model: str
    kernel: str
    slice_thickness_mm: float | None
    contrast: str  # "yes" (a contrast attribute is filled in) or "not stated"

    def categories(self) -> dict[str, str]:
        """Feature -> category, as compared (``MIX_FEATURES``)."""
        return {
            "manufacturer": self.manufacturer or UNKNOWN,
            "scanner_model": self.scanner_model or UNKNOWN,
            "kernel": self.kernel or UNKNOWN,
            "slice_thickness": thickness_band(self.slice_thickness_mm),
            "contrast": self.contrast or UNKNOWN,
        }


def thickness_band(mm: float | None) -> str:
    if mm is None or mm <= 0:
        return UNKNOWN
    for edge, name in THICKNESS_BANDS:
        if mm <= edge:
            return name
    return "> 5 mm"


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    return " ".join(str(value).split()).upper()[:64]


def input_mix(ds: pydicom.Dataset) -> InputMix:
    """The input features of a series from one of its headers (no patient data)."""
    try:
        thickness: float | None = float(ds.get("SliceThickness") or 0) or None
    except (TypeError, ValueError):
        thickness = None
    contrast_attributes = ("ContrastBolusAgent", "ContrastBolusRoute", "ContrastBolusVolume")
    stated = any(_text(ds, k) for k in contrast_attributes)
    return InputMix(
        manufacturer=_text(ds, "Manufacturer"),
        scanner_model=_text(ds, "ManufacturerModelName"),
        kernel=_text(ds, "ConvolutionKernel"),
        slice_thickness_mm=thickness,
        contrast="yes" if stated else "not stated",
    )


def record_inputs(
    sessions: sessionmaker[Any], job_id: int, evidence: Sequence[pydicom.Dataset]
) -> None:
    """Store the input mix of ``job_id``'s series (from its first header); replaces an earlier
    record of the same job (a re-analysis)."""
    if not evidence:
        return
    mix = input_mix(evidence[0])
    with sessions.begin() as session:
        row = session.scalars(select(JobInput).where(JobInput.job_id == job_id)).one_or_none()
        if row is None:
            row = JobInput(job_id=job_id)
            session.add(row)
        row.manufacturer, row.scanner_model, row.kernel = (
            mix.manufacturer,
            mix.scanner_model,
            mix.kernel,
        )
        row.slice_thickness_mm, row.contrast = mix.slice_thickness_mm, mix.contrast
        row.recorded_at = utcnow()


def reference_summary(
    po: Iterable[float], cnn_score: Iterable[float | None], mixes: Iterable[InputMix], source: str
) -> ReferenceSummary:
    """The ``reference`` block of model.json (``training.analysis --write-reference``)."""
    mixes = list(mixes)
    counts = {
        f: dict(sorted(Counter(m.categories()[f] for m in mixes).items())) for f in MIX_FEATURES
    }
    return ReferenceSummary(
        source=source,
        series=len(mixes),
        po=sorted(round(float(v), 4) for v in po),
        cnn_score=sorted(round(float(v), 4) for v in cnn_score if v is not None),
        mix=counts,
    )


def psi(reference: dict[str, int], current: dict[str, int]) -> float:
    """Population stability index of ``current`` against ``reference`` (category counts),
    each smoothed with ``PSEUDO_COUNT`` per category of either."""
    categories = sorted(set(reference) | set(current))
    n_ref = sum(reference.values()) + PSEUDO_COUNT * len(categories)
    n_cur = sum(current.values()) + PSEUDO_COUNT * len(categories)
    total = 0.0
    for c in categories:
        r = (reference.get(c, 0) + PSEUDO_COUNT) / n_ref
        q = (current.get(c, 0) + PSEUDO_COUNT) / n_cur
        total += (q - r) * math.log(q / r)
    return total


def _median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def compare_scores(
    reference: Sequence[float], current: Sequence[float], min_series: int
) -> dict[str, Any]:
    """KS two-sample test of ``current`` against ``reference`` (drift when p < ``KS_ALPHA``)."""
    out: dict[str, Any] = {
        "test": "two-sample Kolmogorov-Smirnov",
        "threshold": f"p < {KS_ALPHA}",
        "n_reference": len(reference),
        "n_current": len(current),
        "reference_median": _median(reference),
        "current_median": _median(current),
        "statistic": None,
        "p_value": None,
        "drifted": False,
        "compared": False,
    }
    if len(reference) < MIN_REFERENCE_VALUES:
        out["note"] = f"reference has {len(reference)} values (< {MIN_REFERENCE_VALUES})"
        return out
    if len(current) < min_series:
        out["note"] = f"{len(current)} series (< {min_series}): not compared"
        return out
    result = ks_2samp(list(current), list(reference))
    p = float(result.pvalue)
    out.update(
        statistic=round(float(result.statistic), 4),
        p_value=p,
        drifted=p < KS_ALPHA,
        compared=True,
    )
    return out


def compare_mix(
    reference: dict[str, int], current: dict[str, int], min_series: int
) -> dict[str, Any]:
    """PSI of one input feature (drift when PSI > ``PSI_THRESHOLD``)."""
    n = sum(current.values())
    unseen = sum(v for k, v in current.items() if k not in reference)
    out: dict[str, Any] = {
        "test": "population stability index",
        "threshold": f"PSI > {PSI_THRESHOLD}",
        "reference": reference,
        "current": dict(sorted(current.items())),
        "unseen_share": round(unseen / n, 4) if n else None,
        "psi": None,
        "drifted": False,
        "compared": False,
    }
    if not reference:
        out["note"] = "no reference counts"
        return out
    if n < min_series:
        out["note"] = f"{n} series (< {min_series}): not compared"
        return out
    value = psi(reference, current)
    out.update(psi=round(value, 4), drifted=value > PSI_THRESHOLD, compared=True)
    return out


def compare(
    reference: ReferenceSummary,
    po: Sequence[float],
    cnn_score: Sequence[float],
    mixes: Sequence[InputMix],
    min_series: int,
) -> dict[str, Any]:
    """Every feature compared; ``drifted`` lists the features beyond their threshold."""
    features: dict[str, Any] = {
        "po": compare_scores(reference.po, po, min_series),
        "cnn_score": compare_scores(reference.cnn_score, cnn_score, min_series),
    }
    for f in MIX_FEATURES:
        counts = dict(Counter(m.categories()[f] for m in mixes))
        features[f] = compare_mix(reference.mix.get(f, {}), counts, min_series)
    drifted = [name for name, entry in features.items() if entry["drifted"]]
    return {"features": features, "drifted": drifted}


def _describe(name: str, entry: dict[str, Any]) -> str:
    if entry["test"].startswith("population"):
        unseen = entry["unseen_share"] or 0
        return (
            f"{name.replace('_', ' ')} (PSI {entry['psi']:.2f} > {PSI_THRESHOLD}; "
            f"{100 * unseen:.0f}% of series with a value the reference never saw)"
        )
    label = "PO" if name == "po" else "CNN series score"
    return (
        f"{label} distribution (KS p={entry['p_value']:.3g} < {KS_ALPHA}; median "
        f"{entry['current_median']:.3g} vs {entry['reference_median']:.3g} in the reference)"
    )


def warning_text(report: dict[str, Any]) -> str:
    """The one-line warning for the console and ``status``; empty when nothing drifted.  It
    does not start with "Drift:": the console and ``status`` put that label before it."""
    if not report.get("drifted"):
        return ""
    model = report["model"]
    shifted = "; ".join(_describe(n, report["features"][n]) for n in report["drifted"])
    return (
        f"The {report['series']} series of the last {report['window']['days']:g} days "
        f"differ from what model {model['name']} {model['version']} was validated on: "
        f"{shifted}. Check local performance (labels, `triage-node performance`) before "
        "relying on the flags; `triage-node drift` shows the comparison."
    )


def _po(verdict_json: str) -> float | None:
    verdict = json.loads(verdict_json) if verdict_json else {}
    po = (((verdict.get("quantification") or {}).get("total")) or {}).get("po")
    return None if po is None else float(po)


def run_drift(
    sessions: sessionmaker[Any],
    spec: ModelSpec,
    settings: DriftSettings,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Compare the series ``spec``'s model analysed in the window with its reference; store and
    return the comparison."""
    end = now or utcnow()
    start = end - dt.timedelta(days=settings.window_days)
    with sessions() as session:
        rows = session.execute(
            select(JobInput, Job)
            .join(Job, Job.id == JobInput.job_id)
            .where(
                JobInput.recorded_at >= start,
                JobInput.recorded_at <= end,
                Job.model_name == spec.name,
                Job.model_version == spec.version,
            )
        ).all()
    mixes = [
        InputMix(i.manufacturer, i.scanner_model, i.kernel, i.slice_thickness_mm, i.contrast)
        for i, _ in rows
    ]
    po = [v for _, job in rows if job.analysed == 1 and (v := _po(job.verdict_json)) is not None]
    cnn = [
        job.series_score for _, job in rows if job.analysed == 1 and job.series_score is not None
    ]
    report: dict[str, Any] = {
        "computed_at": end.isoformat(timespec="seconds"),
        "window": {
            "start": start.isoformat(timespec="seconds"),
            "end": end.isoformat(timespec="seconds"),
            "days": settings.window_days,
        },
        "model": {"name": spec.name, "version": spec.version},
        "series": len(rows),
        "analysed": len(po),
        "min_series": settings.min_series,
        "thresholds": {"psi": PSI_THRESHOLD, "ks_alpha": KS_ALPHA},
    }
    if spec.reference is None:
        report.update(status="no reference", features={}, drifted=[])
        report["note"] = "model.json has no reference summary (training.analysis --write-reference)"
    else:
        report |= compare(spec.reference, po, cnn, mixes, settings.min_series)
        report["reference"] = {"series": spec.reference.series, "source": spec.reference.source}
        if report["drifted"]:
            report["status"] = "drift"
        elif len(rows) < settings.min_series:
            report["status"] = "too few series"
        else:
            report["status"] = "no drift"
    report["warning"] = warning_text(report)
    with sessions.begin() as session:
        session.add(
            DriftReport(
                computed_at=end,
                window_start=start,
                window_end=end,
                model_name=spec.name,
                model_version=spec.version,
                n_series=len(rows),
                drifted=int(bool(report["drifted"])),
                warning=report["warning"],
                report_json=json.dumps(report),
            )
        )
    log = logger.warning if report["warning"] else logger.info
    log(
        "drift comparison (%d series in %g days): %s%s",
        len(rows),
        settings.window_days,
        report["status"],
        f": {report['warning']}" if report["warning"] else "",
    )
    return report


def latest_report(sessions: sessionmaker[Any]) -> dict[str, Any] | None:
    """The latest stored comparison, or None before the first."""
    with sessions() as session:
        text = session.execute(
            select(DriftReport.report_json).order_by(DriftReport.id.desc()).limit(1)
        ).scalar_one_or_none()
    return None if not text else dict(json.loads(text))


def current_warning(sessions: sessionmaker[Any]) -> str | None:
    """The latest drift comparison's warning text, or None (no drift, or not yet computed)."""
    with sessions() as session:
        row = session.execute(
            select(DriftReport.warning).order_by(DriftReport.id.desc()).limit(1)
        ).scalar_one_or_none()
    return row or None


def format_report(report: dict[str, Any] | None) -> str:
    """``triage-node drift``: the latest comparison in lines."""
    if report is None:
        return "no drift comparison yet (the node runs one at start and every drift.interval_hours)"
    model = report["model"]
    lines = [
        f"drift: {report['status']} ({report['computed_at']}, model {model['name']} "
        f"{model['version']}, window {report['window']['start']} .. {report['window']['end']})",
        f"series in window: {report['series']} ({report['analysed']} analysed); "
        f"minimum to compare: {report['min_series']}",
    ]
    if "reference" in report:
        lines.append(
            f"reference: {report['reference']['series']} series ({report['reference']['source']})"
        )
    for name, e in report.get("features", {}).items():
        mark = "DRIFT" if e["drifted"] else ("ok" if e["compared"] else "-")
        if "psi" in e:
            value = "-" if e["psi"] is None else f"PSI {e['psi']:.3f}"
            unseen = e["unseen_share"]
            detail = f"unseen {100 * unseen:.0f}%" if unseen is not None else ""
            detail += f"; now {e['current']} vs reference {e['reference']}"
        else:
            value = (
                "-" if e["p_value"] is None else f"KS D {e['statistic']:.3f} p {e['p_value']:.3g}"
            )
            detail = f"median {e['current_median']} vs {e['reference_median']} (reference)"
        note = f" [{e['note']}]" if e.get("note") else ""
        lines.append(f"  {name:<16} {mark:<6} {value:<24} {detail}{note}")
    if report.get("warning"):
        lines += ["", report["warning"]]
    return "\n".join(lines)
