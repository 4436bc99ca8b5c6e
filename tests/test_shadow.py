"""Shadow mode (``results.mode: shadow``) against a real Orthanc: everything is analysed, recorded
and written, nothing reaches the PACS; going live sends nothing old until ``resend --since``."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from node import cli, jobs
from node.config import ResultSettings, Settings
from node.db import Job, JobState, Series, SeriesState, ShadowDelivery
from node.pipeline import Context
from node.schedule import tick_work
from node.service import open_state
from tests.peers import Orthanc
from tests.test_jobs import write_sr


def make_context(tmp_path: Path, orthanc: Orthanc, mode: str) -> tuple[Context, Path]:
    raw: dict[str, Any] = {
        "peers": [
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ],
        "results": {"send_to": "pacs", "mode": mode},
        "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.sqlite3"},
    }
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(raw))  # JSON is YAML
    settings = Settings.model_validate(raw).resolve(tmp_path)
    sessions, spool = open_state(settings)
    model: Any = None  # deliveries only: no model needed
    return Context(settings=settings, sessions=sessions, spool=spool, model=model), config


def add_analysed_job(ctx: Context, n: int) -> tuple[int, Path]:
    """A complete series with its analysis recorded and its SR written: due for delivery."""
    study_uid = f"1.2.826.0.1.77.{n}"
    sr_path = write_sr(ctx.spool.results, study_uid)
    with ctx.sessions.begin() as session:
        series = Series(
            study_instance_uid=study_uid,
            series_instance_uid=f"{study_uid}.1",
            modality="CT",
            state=SeriesState.COMPLETE,
        )
        session.add(series)
        session.flush()
        job_id = jobs.enqueue(session, series).id
    jobs.analysed(
        ctx.sessions, job_id, analysed=1, finding="typical", sr_path=str(sr_path), verdict_json="{}"
    )
    return job_id, sr_path


def run_all(ctx: Context) -> None:
    while tick_work(ctx):
        pass


def job_row(ctx: Context, job_id: int) -> Job:
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_shadow_sends_nothing_records_everything_and_resend_sends_on_request(
    tmp_path: Path,
    orthanc_factory: Callable[..., Orthanc],
    capsys: pytest.CaptureFixture[str],
) -> None:
    orthanc = orthanc_factory(modalities={"NODE": ("TRIAGE", "127.0.0.1", 11112)})
    ctx, config = make_context(tmp_path, orthanc, "shadow")
    before = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(seconds=1)
    job_id, sr_path = add_analysed_job(ctx, 1)
    run_all(ctx)

    job = job_row(ctx, job_id)
    assert (job.state, job.delivered_at, job.last_error) == (JobState.DONE, None, "")
    assert job.sr_path == str(sr_path) and job.finding == "typical"
    assert sr_path.exists()  # the result objects stay where the analysis wrote them
    with ctx.sessions() as session:
        marks = session.scalars(select(ShadowDelivery)).all()
    assert [(m.job_id, m.peer, m.resent_at) for m in marks] == [(job_id, "pacs", None)]
    assert orthanc.series_instance_uids() == []  # nothing reached the PACS

    assert cli.main(["status", "--json", "--config", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "shadow" and report["shadow_jobs"] == 1
    assert report["recent_series"][0]["shadow"] is True
    assert cli.main(["status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("mode:   shadow: nothing is sent to pacs")
    assert " shadow " in text.splitlines()[5]

    # going live sends nothing by itself ...
    live, live_config = make_context(tmp_path, orthanc, "live")  # rewrites config.yaml
    run_all(live)
    assert orthanc.series_instance_uids() == []
    assert cli.main(["status", "--config", str(live_config)]) == 0
    assert "mode:   live: results go to pacs; 1 shadow result(s) unsent" in capsys.readouterr().out
    # ... resend --since requeues what shadow mode withheld since then, once
    assert cli.main(["resend", "--since", before.isoformat(), "--config", str(live_config)]) == 0
    assert "1 shadow result(s)" in capsys.readouterr().out
    run_all(live)
    job = job_row(live, job_id)
    assert job.state == JobState.DONE and job.delivered_at is not None
    uids = orthanc.series_instance_uids()
    assert uids == [str(pydicom.dcmread(sr_path).SeriesInstanceUID)]
    assert jobs.resend_shadowed(live.sessions, before) == []  # already resent: never twice


def test_resend_since_skips_older_shadow_results(
    tmp_path: Path, orthanc_factory: Callable[..., Orthanc]
) -> None:
    orthanc = orthanc_factory(modalities={"NODE": ("TRIAGE", "127.0.0.1", 11112)})
    ctx, _ = make_context(tmp_path, orthanc, "shadow")
    job_id, _ = add_analysed_job(ctx, 2)
    run_all(ctx)
    later = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(seconds=1)
    assert jobs.resend_shadowed(ctx.sessions, later) == []
    assert job_row(ctx, job_id).state == JobState.DONE


def test_results_mode_is_validated() -> None:
    assert ResultSettings().mode == "live"
    with pytest.raises(ValueError, match="mode"):
        ResultSettings.model_validate({"mode": "silent"})
