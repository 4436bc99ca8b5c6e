"""Benchmark 5, scale: ingest rate and ``status`` latency as the database grows to 100k instances.

The node runs as its own process on a SQLite database that is grown between measurements with
synthetic rows inserted directly through the ORM (series of 300 instances, each with a delivered
job).  At each size a fresh real series goes in through ``storescu`` (instances/s, from its wall
time) and ``node.status.collect_status`` (what ``triage-node status`` runs, engine set-up
included) is timed.  "Flat" means the largest size is within 20 % of the empty database.

``python -m bench.scale [--quick]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import build_series, emit, median, rounded, target, time_call

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    emit(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
