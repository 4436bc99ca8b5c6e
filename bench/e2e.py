"""Benchmark 4, end to end: Orthanc (as PACS) forwards a 300-slice series, the node sends the SR.

A real Orthanc with the shipped Lua ``OnStableSeries`` forward (``tests/peers.py``) receives the
series from ``storescu`` and sends it to the node process in one association; the node completes
the series, analyses it and C-STOREs the SR back to Orthanc.  The node runs with the shipped
defaults for ``series_quiet_seconds`` and ``scheduler_tick_s`` (what a user gets): a series is
complete when the association that brought it is released and the sender confirms its count
(``node/series_complete.py``), else when the quiet timer runs out.

Times are the node's own database stamps (one clock): from the last instance received to the SR
acknowledged by Orthanc (``jobs.delivered_at``, set on the Success status), split into completion
(release check, or the quiet timer), the waits for a worker to claim the analysis and then the
delivery stage (together), analysis (series check, lungs, slice selection, preprocessing,
inference, result objects) and delivery.  ``after_quiet_s`` (complete -> SR
acknowledged) is the figure with the quiet timer excluded, comparable to earlier runs that used a
2 s quiet timer.  Orthanc's own ``StableAge`` (2 s here) is before the forward and not counted.
Each run uses a fresh series; the SR is also looked up in Orthanc.

``python -m bench.e2e [--quick]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import build_series, emit, median, model_under_test, rounded, target

ORTHANC_STABLE_AGE_S = 2
TARGET_TOTAL_S = 4.0
TIMING_KEYS = (
    "total_s",
    "quiet_timer_s",
    "after_quiet_s",
    "worker_wait_s",
    "analysis_s",
    "delivery_s",
)


def _stamp(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def job_times(db: Path, series_uid: str) -> dict[str, Any] | None:
    """Timestamps of the series and its job, once the SR is delivered; else None."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        row = conn.execute(
            "SELECT s.last_received_at, s.completed_at, s.instance_count, j.started_at,"
            " j.analysis_s, j.delivered_at, j.state, j.analysed, j.sr_sop_instance_uid,"
            " j.last_error FROM series s JOIN jobs j ON j.series_id = s.id"
            " WHERE s.series_instance_uid = ?",
            (series_uid,),
        ).fetchone()
    if row is None:
        return None
    if row[6] == "failed":
        raise RuntimeError(f"job failed: {row[9]}")
    if row[5] is None:
        return None
    received, completed, started, delivered = (_stamp(row[i]) for i in (0, 1, 3, 5))
    assert received and completed and started and delivered
    analysis = float(row[4] or 0.0)
    return {
        "instances": row[2],
        "analysed": bool(row[7]),
        "sr_sop_instance_uid": row[8],
        "total_s": (delivered - received).total_seconds(),
        "quiet_timer_s": (completed - received).total_seconds(),
        "after_quiet_s": (delivered - completed).total_seconds(),
        # one stage per claim (node/jobs.py): started_at is the delivery stage's claim, so the
        # two waits for a worker (analysis claim, delivery claim) come out together
        "worker_wait_s": (started - completed).total_seconds() - analysis,
        "analysis_s": analysis,
        "delivery_s": (delivered - started).total_seconds(),
    }


def completed_by(log_text: str, series_uid: str) -> str:
    """How the node completed the series, from its log: "release", "quiet timer" or "?"."""
    done = re.compile(rf"series {re.escape(series_uid)} v\d+ complete (on release|after)")
    for line in log_text.splitlines():
        found = done.search(line)
        if found:
            return "release" if found.group(1) == "on release" else "quiet timer"
    return "?"


def one_run(
    orthanc: Any, node: Any, workdir: Path, count: int, seed: str, timeout: float = 600
) -> dict[str, Any]:
    from tests.peers import storescu

    folder = workdir / seed
    paths = build_series(folder, count, seed=seed)
    import pydicom

    series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    started = time.monotonic()
    storescu(folder, port=orthanc.dicom_port, aec=orthanc.aet, aet="STORESCU", timeout=600)
    db = node.config.parent / "node.sqlite3"
    deadline = time.monotonic() + timeout
    times = None
    while times is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no SR delivered in {timeout} s (node log: {node.log})")
        time.sleep(0.2)
        times = job_times(db, series_uid) if db.exists() else None
    times["wall_from_storescu_start_s"] = time.monotonic() - started
    times["completed_by"] = completed_by(node.log_text(), series_uid)
    times["sr_in_orthanc"] = bool(
        orthanc.post(
            "/tools/find",
            {"Level": "Instance", "Query": {"SOPInstanceUID": times["sr_sop_instance_uid"]}},
        )
    )
    return times


def with_shipped_timers(config: Path) -> dict[str, Any]:
    """Drop the test config's quiet timer and tick, so the node runs with the shipped defaults."""
    from node.config import Settings

    raw = yaml.safe_load(config.read_text())
    raw.pop("series_quiet_seconds", None)
    raw.pop("scheduler_tick_s", None)
    config.write_text(yaml.safe_dump(raw))
    effective = Settings.model_validate(raw)
    return {
        "series_quiet_seconds": effective.series_quiet_seconds,
        "scheduler_tick_s": effective.scheduler_tick_s,
    }


def run(quick: bool) -> dict[str, Any]:
    from tests.nodeproc import NodeProcess, node_config
    from tests.peers import free_port, start_orthanc

    count = 30 if quick else 300
    runs = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        work = Path(tmp)
        if quick:
            from tests.models import make_tiny_model

            (work / "tiny").mkdir()
            model_dir, description = (
                make_tiny_model(work / "tiny", ["non-COVID", "COVID-19"]),
                "tiny test model",
            )
        else:
            model_dir, description = model_under_test(work)
        node_port = free_port()
        orthanc = start_orthanc(
            work / "orthanc",
            modalities={
                "NODE": ("TRIAGE", "127.0.0.1", node_port),
                "STORESCU": ("STORESCU", "127.0.0.1", 104),
            },
            forward_to="NODE",
            stable_age=ORTHANC_STABLE_AGE_S,
        )
        node = None
        try:
            config = node_config(
                work / "node", port=node_port, model_dir=model_dir, pacs_port=orthanc.dicom_port
            )
            timers = with_shipped_timers(config)
            node = NodeProcess(config, node_port).start(timeout=300)
            results = [
                one_run(orthanc, node, work, count, f"bench-e2e-{r}-{time.time()}")
                for r in range(runs)
            ]
            runtime_line = [
                line
                for line in node.log_text().splitlines()
                if "runtime" in line and "loaded" in line
            ]
        finally:
            if node is not None:
                node.stop()
            orthanc.cleanup()
    summary = {k: rounded(median([r[k] for r in results])) for k in TIMING_KEYS}
    return {
        "model": description,
        "node_runtime_log": runtime_line[-1].split(": ", 1)[-1] if runtime_line else "",
        "instances": count,
        "runs": runs,
        **timers,
        "orthanc_stable_age_s": ORTHANC_STABLE_AGE_S,
        "completed_by": [r["completed_by"] for r in results],
        "median": summary,
        "all_runs": [
            {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in results
        ],
        "targets": {
            "total_s": target(summary["total_s"], TARGET_TOTAL_S, at_least=False),
            "after_quiet_s": target(summary["after_quiet_s"], 10.0, at_least=False),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    emit(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
