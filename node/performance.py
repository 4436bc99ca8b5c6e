"""Monitoring stage: local performance of each model version on labelled series.

For ``triage-node performance``.  A series' label is its own (``labels`` keyed by Series Instance
UID), else its study's.  The flag is the job's category (not ``negative`` = pneumonia-range
opacity); the score is the total percentage of opacity (PO) from the stored verdict.  Intervals:
Wilson for the proportions, the patient-clustered bootstrap of ``node.stats.auc_ci95`` for
the ROC AUC (the study stands in for the patient: the node stores no patient IDs).  Latency is from
the series' last received image to its SR: sent (``delivered_at``) or, when kept locally or in
shadow mode, ready (``finished_at``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from node.assess import NEGATIVE
from node.db import ChallengerResult, Job, JobStage, JobState, Label, Series
from node.stats import auc_ci95, roc_auc

logger = logging.getLogger(__name__)

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Case:
    """One analysed series version: what the model said, and the truth if known."""

    model_version: str
    study_instance_uid: str
    flagged: bool
    po: float | None
    truth: bool | None
    latency_s: float | None
    cnn_score: float | None = None  # the CNN's series score, for the console's distribution plot
    series_instance_uid: str = ""


def wilson(successes: int, total: int) -> dict[str, Any]:
    """Proportion ``successes / total`` with its 95% Wilson score interval (None when total=0)."""
    if total == 0:
        return {"value": None, "ci95": None, "n": 0}
    p = successes / total
    denom = 1 + Z95**2 / total
    centre = (p + Z95**2 / (2 * total)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / total + Z95**2 / (4 * total**2)) / denom
    return {
        "value": round(p, 4),
        "ci95": [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)],
        "n": total,
    }


def _auc(cases: list[Case]) -> dict[str, Any]:
    scored = [c for c in cases if c.po is not None and c.truth is not None]
    y = np.array([int(bool(c.truth)) for c in scored])
    if len(scored) == 0 or y.all() or not y.any():
        return {"value": None, "ci95": None, "n": len(scored)}
    s = np.array([float(c.po) for c in scored if c.po is not None])
    value = roc_auc(y, s)
    return {
        "value": None if value is None else round(value, 4),
        "ci95": auc_ci95(y, s, [c.study_instance_uid for c in scored]),
        "n": len(scored),
    }


def _latency(cases: list[Case]) -> dict[str, Any]:
    values = np.array([c.latency_s for c in cases if c.latency_s is not None])
    if values.size == 0:
        return {"median_s": None, "p95_s": None, "n": 0}
    return {
        "median_s": round(float(np.median(values)), 1),
        "p95_s": round(float(np.percentile(values, 95)), 1),
        "n": int(values.size),
    }


def summarise(cases: list[Case]) -> dict[str, Any]:
    """The numbers of one model version."""
    labelled = [c for c in cases if c.truth is not None]
    tp = sum(c.flagged and bool(c.truth) for c in labelled)
    fp = sum(c.flagged and not c.truth for c in labelled)
    fn = sum(not c.flagged and bool(c.truth) for c in labelled)
    tn = sum(not c.flagged and not c.truth for c in labelled)
    return {
        "series": len(cases),
        "labelled": len(labelled),
        "unlabelled": len(cases) - len(labelled),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "sensitivity": wilson(tp, tp + fn),
        "specificity": wilson(tn, tn + fp),
        "ppv": wilson(tp, tp + fp),
        "npv": wilson(tn, tn + fn),
        "auc_po": _auc(labelled),
        "latency_last_image_to_sr": _latency(cases),
    }


def _po(verdict_json: str) -> float | None:
    verdict = json.loads(verdict_json) if verdict_json else {}
    total = ((verdict.get("quantification") or {}).get("total")) or {}
    po = total.get("po")
    return None if po is None else float(po)


def load_cases(sessions: sessionmaker[Any]) -> list[Case]:
    """Every analysed series version (its analysis finished), the latest job per series and
    model version, with its label (series, else study) if one was imported."""
    with sessions() as session:
        labels = {
            (lab.key_kind, lab.key_value): bool(lab.pneumonia)
            for lab in session.scalars(select(Label))
        }
        rows = session.execute(
            select(Job, Series)
            .join(Series, Series.id == Job.series_id)
            .where(Job.analysed == 1, Job.stage == JobStage.DELIVER)
            .order_by(Job.series_version, Job.id)
        ).all()
    latest: dict[tuple[str, int], Case] = {}
    for job, series in rows:
        truth = labels.get(("series", series.series_instance_uid))
        if truth is None:
            truth = labels.get(("study", series.study_instance_uid))
        ready = job.delivered_at or (job.finished_at if job.state == JobState.DONE else None)
        latest[(job.model_version, series.id)] = Case(
            model_version=job.model_version,
            study_instance_uid=series.study_instance_uid,
            flagged=job.finding != NEGATIVE,
            po=_po(job.verdict_json),
            truth=truth,
            latency_s=(ready - series.last_received_at).total_seconds() if ready else None,
            cnn_score=job.series_score,
            series_instance_uid=series.series_instance_uid,
        )
    return list(latest.values())


def _truth(labels: dict[tuple[str, str], bool], series: Series) -> bool | None:
    truth = labels.get(("series", series.series_instance_uid))
    return labels.get(("study", series.study_instance_uid)) if truth is None else truth


def load_challenger_cases(sessions: sessionmaker[Any]) -> dict[str, list[Case]]:
    """Per challenger model version: its analysed verdicts (``challenger_results``, the latest
    per series; never sent, so without latency)."""
    return {
        version: [c for c, _ in pairs] for version, pairs in load_challenger_pairs(sessions).items()
    }


def load_challenger_pairs(sessions: sessionmaker[Any]) -> dict[str, list[tuple[Case, Case]]]:
    """``load_challenger_cases``, each case paired with the live verdict of the same job (the
    same files)."""
    with sessions() as session:
        labels = {
            (lab.key_kind, lab.key_value): bool(lab.pneumonia)
            for lab in session.scalars(select(Label))
        }
        rows = session.execute(
            select(ChallengerResult, Job, Series)
            .join(Job, Job.id == ChallengerResult.job_id)
            .join(Series, Series.id == Job.series_id)
            .where(ChallengerResult.analysed == 1, Job.analysed == 1)
            .order_by(Job.series_version, ChallengerResult.id)
        ).all()
    latest: dict[tuple[str, int], tuple[Case, Case]] = {}
    for result, job, series in rows:
        common = {
            "study_instance_uid": series.study_instance_uid,
            "truth": _truth(labels, series),
            "series_instance_uid": series.series_instance_uid,
        }
        challenger = Case(
            model_version=result.model_version,
            flagged=result.finding != NEGATIVE,
            po=_po(result.verdict_json),
            latency_s=None,
            cnn_score=result.series_score,
            **common,
        )
        live = Case(
            model_version=job.model_version,
            flagged=job.finding != NEGATIVE,
            po=_po(job.verdict_json),
            latency_s=None,
            cnn_score=job.series_score,
            **common,
        )
        latest[(result.model_version, series.id)] = (challenger, live)
    out: dict[str, list[tuple[Case, Case]]] = {}
    for pair in latest.values():
        out.setdefault(pair[0].model_version, []).append(pair)
    return out


def collect_performance(sessions: sessionmaker[Any]) -> dict[str, Any]:
    """Per model version (newest name last): ``summarise`` of its cases."""
    by_version: dict[str, list[Case]] = {}
    for case in load_cases(sessions):
        by_version.setdefault(case.model_version, []).append(case)
    versions = {v: summarise(cs) | {"role": "live"} for v, cs in sorted(by_version.items())}
    # a challenger beside the live model: the live verdicts of the very same jobs with it
    for version, pairs in sorted(load_challenger_pairs(sessions).items()):
        key = version if version not in versions else f"{version} (challenger)"
        versions[key] = summarise([c for c, _ in pairs]) | {
            "role": "challenger",
            "live_on_same_series": summarise([live for _, live in pairs]),
        }
    return {"model_versions": versions}


def _fmt(metric: dict[str, Any]) -> str:
    if metric["value"] is None:
        return f"-  (n={metric['n']})"
    ci = metric["ci95"]
    interval = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[-]"
    return f"{metric['value']:.3f} {interval} (n={metric['n']})"


def format_performance(report: dict[str, Any]) -> str:
    lines: list[str] = []
    for version, m in report["model_versions"].items():
        c, lat = m["confusion"], m["latency_last_image_to_sr"]
        role = " [challenger: shadow, never sent]" if m.get("role") == "challenger" else ""
        lines += [
            f"model version {version or '?'}{role}: {m['series']} series, {m['labelled']} "
            f"labelled, {m['unlabelled']} unlabelled",
            f"  TP {c['tp']}  FP {c['fp']}  FN {c['fn']}  TN {c['tn']}",
            f"  sensitivity  {_fmt(m['sensitivity'])}",
            f"  specificity  {_fmt(m['specificity'])}",
            f"  PPV          {_fmt(m['ppv'])}",
            f"  NPV          {_fmt(m['npv'])}",
            f"  ROC AUC (PO) {_fmt(m['auc_po'])}",
            "  last image to SR: "
            + (
                f"median {lat['median_s']:.1f} s, 95th percentile {lat['p95_s']:.1f} s "
                f"(n={lat['n']})"
                if lat["n"]
                else "-"
            ),
        ]
        if "live_on_same_series" in m:
            same = m["live_on_same_series"]
            lines += [
                f"  live model on the same {same['labelled']} labelled series: sensitivity "
                f"{_fmt(same['sensitivity'])}, specificity {_fmt(same['specificity'])}"
            ]
    return "\n".join(lines) or "no analysed series yet"
