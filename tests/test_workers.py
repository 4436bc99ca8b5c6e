"""Several workers on PostgreSQL, as separate processes: ``triage-node receive`` and three
``triage-node work`` share the spool folder and the database; 30 series sent with ``storescu``
are each analysed once and their SR reaches a real Orthanc exactly once, although one worker is
SIGKILLed in the middle of an analysis (its job is reclaimed when its lease expires)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import create_engine, text

from tests.nodeproc import REPO, node_config
from tests.peers import (
    TCIA_SIEMENS_B70F,
    Orthanc,
    free_port,
    reidentify_copy,
    require_shared_data,
    series_files,
    storescu,
    wait_for,
)

SERIES = 30
SLICES = 20  # short real series: quick to analyse on two busy cores
LEASE_S = 5

ANALYSED = re.compile(r"job (\d+) series \S+ v\d+: .* in [\d.]+ s, ")
DELIVERED = re.compile(r"job (\d+) series \S+: .* delivered to pacs")
RECLAIMED = re.compile(r"job (\d+) series \S+: lease of the worker running its (\w+) expired")


class Proc:
    """One ``python -m node <command>`` process with its own log file."""

    def __init__(self, config: Path, command: str, name: str) -> None:
        self.log = config.parent / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node", "--config", str(config), command],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.log.name}: exited {self.proc.returncode}:\n{self.text()}")
        return "ready (" in self.text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def query(url: str, sql: str) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)).all())
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_three_workers_30_series_each_sr_once_with_a_worker_killed(
    tmp_path: Path,
    tiny_model_dir: Path,
    orthanc_factory: Callable[..., Orthanc],
    postgres_url: str,
    procs: list[Proc],
) -> None:
    require_shared_data(TCIA_SIEMENS_B70F)
    source = series_files(TCIA_SIEMENS_B70F)[5 : 5 + SLICES]
    studies = []
    for n in range(SERIES):
        copy = reidentify_copy(source, tmp_path / "send" / f"s{n:02d}", seed=f"workers-{n}")
        studies.append(str(pydicom.dcmread(copy[0], stop_before_pixels=True).StudyInstanceUID))
    port = free_port()
    orthanc = orthanc_factory(modalities={"triage": ("TRIAGE", "127.0.0.1", port)})
    config = node_config(
        tmp_path / "node",
        port=port,
        model_dir=tiny_model_dir,
        pacs_port=orthanc.dicom_port,
        quiet_s=1.0,
        extra={
            "storage": {"spool_dir": "spool", "database_url": postgres_url},
            "workers": {"lease_s": LEASE_S},
        },
    )
    receiver = Proc(config, "receive", "receiver")
    workers = [Proc(config, "work", f"worker{i}") for i in range(3)]
    procs.extend([receiver, *workers])
    for p in procs:
        wait_for(p.ready, 180, interval=0.5, what=f"{p.log.name} ready")

    # one association, 30 series; each completes (quiet timer) while the next ones arrive
    sent: list[subprocess.CompletedProcess[str]] = []
    sender = threading.Thread(
        target=lambda: sent.append(
            storescu(tmp_path / "send", port=port, aec="TRIAGE", aet="STORESCU", timeout=300)
        )
    )
    sender.start()

    # SIGKILL the worker of the first analysis seen running
    pids = {w.proc.pid: w for w in workers}
    running: list[Any] = []

    def an_analysis_running() -> bool:
        running[:] = query(
            postgres_url,
            "SELECT id, worker_id FROM jobs WHERE state = 'running' AND stage = 'analyse'",
        )
        return bool(running)

    wait_for(an_analysis_running, 120, interval=0.01, what="an analysis running")
    job_id, worker_id = running[0]
    victim = pids[int(worker_id.rsplit(":", 1)[1])]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    row = query(postgres_url, f"SELECT state, stage, worker_id FROM jobs WHERE id = {job_id}")
    assert row == [("running", "analyse", worker_id)], f"the kill came too late: {row}"
    sender.join(300)
    assert sent and sent[0].returncode == 0, sent

    def all_done() -> bool:
        states = query(postgres_url, "SELECT state FROM jobs")
        assert "failed" not in {s for (s,) in states}, states
        return len(states) == SERIES and {s for (s,) in states} == {"done"}

    try:
        wait_for(all_done, 240, interval=1.0, what=f"{SERIES} jobs done")
    except AssertionError as exc:
        jobs = query(postgres_url, "SELECT id, state, stage, attempts, worker_id FROM jobs")
        tails = "\n".join(f"--- {p.log.name}\n{p.text()[-3000:]}" for p in procs)
        raise AssertionError(f"{exc}\njobs: {jobs}\n{tails}") from None

    # each series: one job, done and delivered; its SR in Orthanc exactly once
    rows = query(postgres_url, "SELECT id, worker_id, delivered_at FROM jobs ORDER BY id")
    assert len(rows) == SERIES and all(r[2] is not None for r in rows)
    srs = {
        study: [t for t in orthanc.instances_in_study(study) if t.get("Modality") == "SR"]
        for study in studies
    }
    assert {study: len(found) for study, found in srs.items()} == dict.fromkeys(studies, 1)

    # analysed and delivered once each, across every worker's log (the victim's included)
    logs = [w.text() for w in workers]
    analysed = Counter(int(m) for log in logs for m in ANALYSED.findall(log))
    delivered = Counter(int(m) for log in logs for m in DELIVERED.findall(log))
    ids = [r[0] for r in rows]
    assert analysed == Counter(ids), analysed
    assert delivered == Counter(ids), delivered
    # the killed worker's job: reclaimed by another worker once the lease expired
    reclaims = [
        (int(j), stage, w)
        for w, log in zip(workers, logs, strict=True)
        for j, stage in RECLAIMED.findall(log)
    ]
    assert [(j, stage) for j, stage, _ in reclaims] == [(job_id, "analyse")], reclaims
    assert reclaims[0][2] is not victim
    final_owner = dict((r[0], r[1]) for r in rows)[job_id]
    assert final_owner != worker_id
    # and the work was shared
    assert len({r[1] for r in rows}) >= 2
