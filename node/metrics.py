"""Metrics: the node's Prometheus metrics, served as text by the web console's ``/metrics``.

Event counts (instances received, delivery failures) and the analysis latency are counted where
they happen (``receive``, ``pipeline``) with one call each.  Everything that is state (series and
jobs by state, verdicts and positive rate per model version) is read from the database at scrape
time, so it survives restarts and agrees with ``triage-node status``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from node.assess import CATEGORIES, NEGATIVE
from node.db import Job, Series
from node.drift import KS_ALPHA, PSI_THRESHOLD, latest_report

logger = logging.getLogger(__name__)

disable_created_metrics()  # no *_created series: they only add noise to the node's few counters
REGISTRY = CollectorRegistry()

INSTANCES_RECEIVED = Counter(
    "triage_instances_received",
    "CT instances received by the Storage SCP, by outcome (stored, duplicate, refused)",
    ["outcome"],
    registry=REGISTRY,
)
for _outcome in ("stored", "duplicate", "refused"):
    INSTANCES_RECEIVED.labels(_outcome)  # present (at 0) before the first instance
ANALYSIS_SECONDS = Histogram(
    "triage_analysis_seconds",
    "Time to analyse one series version and write its SR (seconds)",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
DELIVERY_FAILURES = Counter(
    "triage_delivery_failures",
    "Failed attempts to send an SR to the result peer",
    registry=REGISTRY,
)


#: Categories that flag a series for reading first (pneumonia-range opacity).
FLAGGED = tuple(c for c in CATEGORIES if c != NEGATIVE)


class StateCollector(Collector):
    """Gauges read from the database: series/jobs by state, verdicts per model version.

    The job row's ``finding`` is the series' category (``node.assess``); the positive rate is
    the share of analysed series flagged (``FLAGGED``).
    """

    def __init__(self, sessions: sessionmaker[Any], model: tuple[str, str]):
        self.sessions = sessions
        self.model = model

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            series = session.execute(
                select(Series.state, func.count()).group_by(Series.state)
            ).all()
            jobs = session.execute(
                select(Job.state, Job.stage, func.count()).group_by(Job.state, Job.stage)
            ).all()
            verdicts = session.execute(
                select(Job.model_name, Job.model_version, Job.finding, func.count())
                .where(Job.analysed == 1)
                .group_by(Job.model_name, Job.model_version, Job.finding)
            ).all()
        by_series = GaugeMetricFamily("triage_series", "Series by state", labels=["state"])
        for state, count in series:
            by_series.add_metric([state], count)
        yield by_series
        by_job = GaugeMetricFamily(
            "triage_jobs", "Jobs by state and stage", labels=["state", "stage"]
        )
        for state, stage, count in jobs:
            by_job.add_metric([state, stage], count)
        yield by_job
        analysed = GaugeMetricFamily(
            "triage_series_analysed",
            "Series versions analysed, by model and finding (the category)",
            labels=["model_name", "model_version", "finding"],
        )
        rate = GaugeMetricFamily(
            "triage_positive_rate",
            "Fraction of analysed series flagged for reading first (category "
            f"{', '.join(FLAGGED)}), by model version",
            labels=["model_name", "model_version"],
        )
        totals: dict[tuple[str, str], list[int]] = {}
        for name, version, finding, count in verdicts:
            analysed.add_metric([name, version, finding], count)
            entry = totals.setdefault((name, version), [0, 0])
            entry[0] += count
            entry[1] += count if finding in FLAGGED else 0
        for (name, version), (total, positive) in sorted(totals.items()):
            rate.add_metric([name, version], positive / total)
        yield analysed
        yield rate
        info = GaugeMetricFamily(
            "triage_model_loaded",
            "The model this node loaded",
            labels=["model_name", "model_version"],
        )
        info.add_metric(list(self.model), 1)
        yield info
        yield from drift_metrics(latest_report(self.sessions))


def drift_metrics(report: dict[str, Any] | None) -> Iterator[Metric]:
    """Gauges of the latest drift comparison (``node.drift``); none before the first."""
    if report is None:
        return
    model = [report["model"]["name"], report["model"]["version"]]
    warning = GaugeMetricFamily(
        "triage_drift_warning",
        f"1 when the latest drift comparison found a shift (PSI > {PSI_THRESHOLD} or KS "
        f"p < {KS_ALPHA}), by model",
        labels=["model_name", "model_version"],
    )
    warning.add_metric(model, 1 if report.get("drifted") else 0)
    yield warning
    series = GaugeMetricFamily(
        "triage_drift_series", "Series in the latest drift comparison's window"
    )
    series.add_metric([], report.get("series", 0))
    yield series
    when = GaugeMetricFamily(
        "triage_drift_last_comparison_timestamp_seconds",
        "When the latest drift comparison ran (Unix time, UTC)",
    )
    computed = dt.datetime.fromisoformat(report["computed_at"]).replace(tzinfo=dt.UTC)
    when.add_metric([], computed.timestamp())
    yield when
    psi = GaugeMetricFamily(
        "triage_drift_psi",
        "Population stability index of the input mix against model.json's reference",
        labels=["feature"],
    )
    ks = GaugeMetricFamily(
        "triage_drift_ks_p_value",
        "Two-sample Kolmogorov-Smirnov p-value of the score against model.json's reference",
        labels=["feature"],
    )
    for name, entry in report.get("features", {}).items():
        if entry.get("psi") is not None:
            psi.add_metric([name], entry["psi"])
        if entry.get("p_value") is not None:
            ks.add_metric([name], entry["p_value"])
    yield psi
    yield ks


def render(collector: Collector) -> bytes:
    """Prometheus text exposition: the process-wide counters plus the database gauges."""
    state = CollectorRegistry()
    state.register(collector)
    return generate_latest(REGISTRY) + generate_latest(state)
