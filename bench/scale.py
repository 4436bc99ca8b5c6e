"""Benchmark 5, scale: ingest rate and ``status`` latency as the database grows to 100k instances.

The node runs as its own process on a SQLite database that is grown between measurements with
synthetic rows inserted directly through the ORM (series of 300 instances, each with a delivered
job).  At each size a fresh real series goes in through ``storescu`` (instances/s, from its wall
time) and ``node.status.collect_status`` (what ``triage-node status`` runs, engine set-up
included) is timed.  "Flat" means the largest size is within 20 % of the empty database.

Workers (``workers`` in the output): series per hour analysed by 1 and by 2 ``triage-node work``
processes sharing one queue (PostgreSQL from a throwaway cluster when PostgreSQL is installed,
else SQLite).  A ``triage-node receive`` process takes the series first (``storescu``), so the
queue is full before the workers start, and held until every worker is ready; the rate is the
series count over the span from that release to the last job finished (``jobs.finished_at``),
so model loading is not counted.  No PACS: a job ends with its analysis and written result objects.

``python -m bench.scale [--quick] [--workers]`` prints one JSON line (``--workers``: only the
worker measurement; ``--quick`` alone leaves it out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import REPO, build_series, emit, median, rounded, target, time_call

SERIES_SIZE = 300
STATUS_RUNS = 25


def grow(database_url: str, start: int, stop: int) -> None:
    """Insert synthetic instance rows ``start..stop`` (and their series and jobs) via the ORM."""
    from sqlalchemy import insert

    from node.db import Instance, Job, JobState, Series, SeriesState, make_engine, make_sessionmaker

    sessions = make_sessionmaker(make_engine(database_url))
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=1)
    for first in range(start, stop, SERIES_SIZE):
        last = min(first + SERIES_SIZE, stop)
        with sessions.begin() as session:
            series = Series(
                study_instance_uid=f"2.25.9{first}",
                series_instance_uid=f"2.25.8{first}",
                modality="CT",
                study_description="synthetic",
                series_description="synthetic",
                instance_count=last - first,
                state=SeriesState.COMPLETE,
                first_received_at=now,
                last_received_at=now,
                completed_at=now,
            )
            session.add(series)
            session.flush()
            session.execute(
                insert(Instance),
                [
                    {
                        "series_id": series.id,
                        "sop_instance_uid": f"2.25.7{i}",
                        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                        "path": f"/nonexistent/{i}.dcm",
                        "size": 527000,
                        "received_at": now,
                        "purged": 1,
                    }
                    for i in range(first, last)
                ],
            )
            session.add(
                Job(
                    series_id=series.id,
                    series_version=1,
                    state=JobState.DONE,
                    finding="non-COVID",
                    series_score=0.1,
                    finished_at=now,
                    delivered_at=now,
                )
            )


def instance_rows(database_url: str) -> int:
    from sqlalchemy import func, select

    from node.db import Instance, make_engine, make_sessionmaker

    with make_sessionmaker(make_engine(database_url))() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def run(quick: bool) -> dict[str, Any]:
    from node.config import load_settings
    from node.status import collect_status
    from tests.models import make_tiny_model
    from tests.nodeproc import NodeProcess, node_config
    from tests.peers import free_port, storescu

    sizes = (0, 2_000) if quick else (0, 10_000, 50_000, 100_000)
    per_series = 20 if quick else 100
    runs = 1 if quick else 3
    points = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        (work / "model").mkdir()
        model_dir = make_tiny_model(work / "model", ["non-COVID", "COVID-19"])
        port = free_port()
        config = node_config(
            work / "node", port=port, model_dir=model_dir, pacs_port=None, quiet_s=3600
        )
        settings = load_settings(config)
        url = settings.storage.database_url
        node = NodeProcess(config, port).start()
        try:
            synthetic = 0
            for size in sizes:
                grow_s = time_call(partial(grow, url, synthetic, size)) if size > synthetic else 0.0
                synthetic = max(synthetic, size)
                rows = instance_rows(url)
                ingest = []
                for r in range(runs):
                    folder = work / f"series-{size}-{r}"
                    build_series(folder, per_series, seed=f"bench-scale-{size}-{r}-{time.time()}")
                    ingest.append(
                        per_series / time_call(partial(storescu, folder, port=port, aec="TRIAGE"))
                    )
                time.sleep(1.0)  # let the node and the page cache settle after the ingest
                collect_status(settings)  # warm imports and the page cache
                status_ms = [
                    time_call(lambda: collect_status(settings)) * 1e3 for _ in range(STATUS_RUNS)
                ]
                points.append(
                    {
                        "instance_rows": rows,
                        "grow_s": round(grow_s, 2),
                        "ingest_instances_per_s": rounded(median(ingest)),
                        "status_ms": rounded(median(status_ms)),
                        "status_ms_min": rounded(min(status_ms)),
                    }
                )
        finally:
            node.stop()
    first, last = points[0], points[-1]
    ingest_ratio = last["ingest_instances_per_s"] / first["ingest_instances_per_s"]
    status_ratio = last["status_ms"] / first["status_ms"]
    return {
        "series_per_measurement": per_series,
        "runs": runs,
        "points": points,
        "ingest_ratio_largest_to_empty": rounded(ingest_ratio),
        "status_ratio_largest_to_empty": rounded(status_ratio),
        "targets": {
            "ingest_flat_within_20pct": target(ingest_ratio, 0.8, at_least=True),
            "status_flat_within_20pct": target(status_ratio, 1.2, at_least=False),
        },
    }


WORKER_COUNTS = (1, 2)


def _spawn(config: Path, command: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "node", "--config", str(config), command],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _jobs(database_url: str) -> list[Any]:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text("SELECT state, finished_at, worker_id FROM jobs")))
    finally:
        engine.dispose()


def _set_due(database_url: str, delay: dt.timedelta) -> dt.datetime:
    """Make every job due ``delay`` from now (naive UTC, as the node stores it); return when."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    due = dt.datetime.now(dt.UTC).replace(tzinfo=None) + delay
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET next_attempt_at = :due"), {"due": due})
    finally:
        engine.dispose()
    return due


def measure_workers(
    work: Path, model_dir: Path, database_url: str, workers: int, series: list[Path]
) -> dict[str, Any]:
    """Queue ``series`` through a receiver, then let ``workers`` work processes empty it."""
    from tests.nodeproc import node_config
    from tests.peers import free_port, storescu, wait_for

    port = free_port()
    config = node_config(
        work / f"node-{workers}",
        port=port,
        model_dir=model_dir,
        pacs_port=None,
        quiet_s=1.0,
        extra={"storage": {"spool_dir": "spool", "database_url": database_url}},
    )
    procs = [_spawn(config, "receive", config.parent / "receiver.log")]
    try:
        wait_for(lambda: "ready (" in (config.parent / "receiver.log").read_text(), 120)
        for folder in series:
            storescu(folder, port=port, aec="TRIAGE")
        wait_for(lambda: len(_jobs(database_url)) == len(series), 120, interval=0.5)
        _set_due(database_url, dt.timedelta(days=1))  # held until every worker is ready
        logs = [config.parent / f"worker{i}.log" for i in range(workers)]
        procs += [_spawn(config, "work", log) for log in logs]
        wait_for(lambda: all("ready (" in log.read_text() for log in logs), 300, interval=0.5)
        released = _set_due(database_url, dt.timedelta(0))
        wait_for(
            lambda: {r[0] for r in _jobs(database_url)} == {"done"},
            3600,
            interval=1.0,
            what="every job done",
        )
    finally:
        _stop(procs)
    rows = _jobs(database_url)
    span_s = (max(r[1] for r in rows) - released).total_seconds()
    return {
        "workers": workers,
        "series": len(rows),
        "span_s": round(span_s, 1),
        "series_per_hour": round(len(rows) / span_s * 3600, 1),
        "workers_that_ran_jobs": len({r[2] for r in rows}),
    }


def run_workers(quick: bool) -> dict[str, Any]:
    """Series per hour with 1 and 2 worker processes on one queue."""
    from bench.common import model_under_test
    from tests.pg import pg_bin

    n_series = 4 if quick else 12
    slices = 40 if quick else 100
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        work = Path(tmp)
        model_dir, model = model_under_test(work)
        cluster = None
        if pg_bin() is not None:
            from tests.pg import start_cluster

            cluster = start_cluster()
        try:
            points = []
            for workers in WORKER_COUNTS:
                series = []
                for i in range(n_series):
                    folder = work / f"series-{workers}-{i}"
                    build_series(folder, slices, seed=f"bench-workers-{workers}-{i}-{time.time()}")
                    series.append(folder)
                url = (
                    cluster.create_database()
                    if cluster is not None
                    else f"sqlite:///{work / f'workers-{workers}.sqlite3'}"
                )
                points.append(measure_workers(work, model_dir, url, workers, series))
                for folder in series:
                    shutil.rmtree(folder)
        finally:
            if cluster is not None:
                cluster.stop()
    one, two = points[0]["series_per_hour"], points[-1]["series_per_hour"]
    return {
        "database": "postgresql" if cluster is not None else "sqlite",
        "model": model,
        "slices_per_series": slices,
        "points": points,
        "speedup_2_vs_1": rounded(two / one),
        "note": "each worker process uses every core for its analysis; on 2 cores a second "
        "worker overlaps I/O, database and delivery waits with the other's analysis",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", action="store_true", help="only series/hour by workers")
    args = parser.parse_args()
    if args.workers:
        emit({"workers": run_workers(args.quick)})
        return
    result = run(args.quick)
    if not args.quick:  # the quick smoke run stays short: `--workers --quick` smokes this part
        result["workers"] = run_workers(args.quick)
    emit(result)


if __name__ == "__main__":
    main()
