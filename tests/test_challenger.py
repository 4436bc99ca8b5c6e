"""Champion / challenger (``node.challenger``): a second model analysed in shadow, recorded and
never sent, compared on the same labelled series, and ``promote``: with real node processes and
a real Orthanc, promotion changes which model's SR reaches the PACS and nothing else."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from node import cli, jobs
from node.challenger import check_challenger, load_challenger, promote, shadow_analyse
from node.config import Settings, load_settings
from node.db import ChallengerResult, Job, JobStage, JobState, Label, Series, SeriesState
from node.errors import ConfigError, ModelError
from node.performance import collect_performance, format_performance
from node.pipeline import Context
from node.report import verdict_from_report
from node.service import open_state
from tests.faultkit import db_query, results_in_study
from tests.nodeproc import NodeProcess, node_config
from tests.peers import (
    TCIA_SIEMENS_B40F,
    Orthanc,
    free_port,
    reidentify_copy,
    require_shared_data,
    series_files,
    storescu,
    wait_for,
)

CHALLENGER_VERSION = "0.0.2-challenger"
LOCAL: dict[str, Any] = {"results": {"send_to": None}}  # no peers needed


def make_challenger(source: Path, target: Path) -> Path:
    """A copy of a model directory with another version and PO threshold (same network)."""
    shutil.copytree(source, target)
    raw = json.loads((target / "model.json").read_text())
    raw["version"] = CHALLENGER_VERSION
    raw.setdefault("analysis", {})["po_threshold"] = 0.05
    (target / "model.json").write_text(json.dumps(raw, indent=2) + "\n")
    return target


@pytest.fixture
def challenger_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return make_challenger(tiny_model_dir, tmp_path / "challenger")


# --------------------------------------------------------------------------------------------------
# configuration and promotion of config.yaml


def test_challenger_model_dir_is_validated_by_name(
    tiny_model_dir: Path, tmp_path: Path, challenger_dir: Path
) -> None:
    with pytest.raises(ValidationError, match=r"challenger_model_dir: .* is model_dir itself"):
        Settings.model_validate(
            {**LOCAL, "model_dir": str(tiny_model_dir), "challenger_model_dir": str(tiny_model_dir)}
        )
    missing = Settings.model_validate({**LOCAL, "challenger_model_dir": str(tmp_path / "nope")})
    with pytest.raises(ModelError, match=r"^challenger_model_dir: .*nope does not exist"):
        check_challenger(missing)
    (challenger_dir / "model.json").write_text('{"name": "x"}')
    broken = Settings.model_validate({**LOCAL, "challenger_model_dir": str(challenger_dir)})
    with pytest.raises(ModelError, match=r"^challenger_model_dir: .*model.json: invalid"):
        check_challenger(broken)
    assert check_challenger(Settings.model_validate(LOCAL)) is None


CONFIG = """\
# a node's configuration
node:
  port: 11112
model_dir: {live}   # the live model
challenger_model_dir: {challenger}  # analysed in shadow
results: {{send_to: null}}
"""


def test_promote_swaps_the_two_lines_only_and_keeps_a_backup(
    tiny_model_dir: Path, challenger_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    original = CONFIG.format(live=tiny_model_dir, challenger=challenger_dir)
    config.write_text(original)
    assert cli.main(["promote", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "restart the node" in out and "promote again to roll back" in out
    assert config.read_text() == CONFIG.format(live=challenger_dir, challenger=tiny_model_dir)
    assert (tmp_path / "config.yaml.bak").read_text() == original
    settings = load_settings(config)
    assert (settings.model_dir, settings.challenger_model_dir) == (challenger_dir, tiny_model_dir)
    # promote again: rolled back
    promote(config)
    assert config.read_text() == original
    promote(config, retire=True)
    assert config.read_text() == original.replace(
        f"model_dir: {tiny_model_dir}   #", f"model_dir: {challenger_dir}   #"
    ).replace(f"challenger_model_dir: {challenger_dir}  #", "challenger_model_dir: null  #")
    assert [p.name for p in tmp_path.glob(".promote-*")] == []  # no temp file left


def test_promote_refuses_and_changes_nothing(
    tiny_model_dir: Path, challenger_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    text = CONFIG.format(live=tiny_model_dir, challenger="null")
    config.write_text(text)
    assert cli.main(["promote", "--config", str(config)]) == 2
    assert "challenger_model_dir is not set: there is no challenger" in capsys.readouterr().err
    (challenger_dir / "model.keras").unlink()
    text = CONFIG.format(live=tiny_model_dir, challenger=challenger_dir)
    config.write_text(text)
    with pytest.raises(ModelError, match=r"challenger_model_dir: .*model.keras: missing"):
        promote(config)
    assert config.read_text() == text and not (tmp_path / "config.yaml.bak").exists()
    config.write_text(text + "model_dir: again\n")
    with pytest.raises(ConfigError, match="model_dir appears 2 times"):
        promote(config)


# --------------------------------------------------------------------------------------------------
# performance: the challenger beside the live model on the same labelled series


def _po_json(po: float) -> str:
    return json.dumps({"quantification": {"total": {"po": po}}})


def test_performance_reports_the_challenger_on_the_same_series(tmp_path: Path) -> None:
    raw = {
        **LOCAL,
        "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.sqlite3"},
    }
    sessions: sessionmaker[Any]
    sessions, _ = open_state(Settings.model_validate(raw).resolve(tmp_path))
    # 4 labelled series (2 with pneumonia) and 1 unlabelled; live flags 1 and 3, the
    # challenger flags 1, 2 and 3; the challenger saw series 1-4 only (added later)
    truth = [True, True, False, False, None]
    live = ["typical", "negative", "typical", "negative", "negative"]
    challenger = ["typical", "typical", "typical", "negative", None]
    t0 = dt.datetime(2026, 11, 30, 8)
    with sessions.begin() as session:
        for i in range(5):
            uid = f"1.2.826.0.1.55.{i}"
            series = Series(
                study_instance_uid=uid,
                series_instance_uid=f"{uid}.1",
                state=SeriesState.COMPLETE,
                last_received_at=t0,
            )
            session.add(series)
            session.flush()
            job = Job(
                series_id=series.id,
                series_version=1,
                state=JobState.DONE,
                stage=JobStage.DELIVER,
                analysed=1,
                finding=live[i],
                verdict_json=_po_json(float(i)),
                model_name="m",
                model_version="1.0",
                finished_at=t0 + dt.timedelta(seconds=10),
            )
            session.add(job)
            session.flush()
            if challenger[i] is not None:
                session.add(
                    ChallengerResult(
                        job_id=job.id,
                        model_name="m",
                        model_version="2.0",
                        analysed=1,
                        finding=challenger[i],
                        verdict_json=_po_json(float(i)),
                    )
                )
            known = truth[i]
            if known is not None:
                session.add(
                    Label(
                        key_kind="series",
                        key_value=f"{uid}.1",
                        pneumonia=int(known),
                        labelled_by="dr.a",
                        labelled_at=t0,
                    )
                )
    report = collect_performance(sessions)["model_versions"]
    assert list(report) == ["1.0", "2.0"]
    assert report["1.0"]["role"] == "live" and report["2.0"]["role"] == "challenger"
    assert report["1.0"]["confusion"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 1}
    assert report["2.0"]["confusion"] == {"tp": 2, "fp": 1, "fn": 0, "tn": 1}
    assert (report["2.0"]["series"], report["2.0"]["unlabelled"]) == (4, 0)
    assert report["2.0"]["latency_last_image_to_sr"]["n"] == 0  # never sent
    same = report["2.0"]["live_on_same_series"]
    assert same["confusion"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 1} and same["series"] == 4
    assert report["2.0"]["sensitivity"]["value"] == 1.0
    assert same["sensitivity"]["value"] == 0.5
    text = format_performance({"model_versions": report})
    assert "model version 2.0 [challenger: shadow, never sent]: 4 series" in text
    assert "live model on the same 4 labelled series: sensitivity 0.500" in text


def test_shadow_analyse_records_once_and_never_raises(
    tiny_model_dir: Path, challenger_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.model_validate(
        {
            **LOCAL,
            "model_dir": str(tiny_model_dir),
            "challenger_model_dir": str(challenger_dir),
            "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.sqlite3"},
        }
    ).resolve(tmp_path)
    sessions, spool = open_state(settings)
    challenger = load_challenger(settings)
    assert challenger is not None and challenger.spec.version == CHALLENGER_VERSION
    ctx = Context(settings, sessions, spool, model=challenger, challenger=challenger)
    with sessions.begin() as session:
        series = Series(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4")
        session.add(series)
        session.flush()
        job_id = jobs.enqueue(session, series).id
    job = jobs.ClaimedJob(
        job_id=job_id,
        series_id=1,
        series_version=1,
        series_instance_uid="1.2.3.4",
        study_instance_uid="1.2.3",
        stage=JobStage.DELIVER,
        attempts=1,
    )
    assert shadow_analyse(job, ctx) is True  # no files left: recorded as not analysed, and why
    assert shadow_analyse(job, ctx) is False  # once per job and challenger version
    with sessions() as session:
        [row] = session.scalars(select(ChallengerResult)).all()
    assert (row.job_id, row.model_version, row.analysed) == (job_id, CHALLENGER_VERSION, 0)
    assert row.error and row.finding == "not analysed"
    broken = dataclasses.replace(ctx, challenger=object())  # type: ignore[arg-type]
    assert shadow_analyse(job, broken) is False  # logged, never raised
    assert "challenger" in caplog.text


# --------------------------------------------------------------------------------------------------
# real node processes and a real Orthanc


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for proc in started:
        proc.stop()


def sr_model(orthanc: Orthanc, study_uid: str, tmp_path: Path) -> dict[str, Any]:
    """The model (name, version) named in the SR of ``study_uid`` in Orthanc."""
    [sr] = results_in_study(orthanc, study_uid)["sr"]
    with urllib.request.urlopen(f"{orthanc.url}/instances/{sr['_OrthancID']}/file") as rsp:
        path = tmp_path / f"{sr['_OrthancID']}.dcm"
        path.write_bytes(rsp.read())
    model = verdict_from_report(pydicom.dcmread(path))["model"]
    return {"name": model["name"], "version": model["version"]}


def result_uids(orthanc: Orthanc, study_uid: str) -> dict[str, list[str]]:
    return {
        kind: sorted(str(t["SOPInstanceUID"]) for t in tags)
        for kind, tags in results_in_study(orthanc, study_uid).items()
    }


@pytest.mark.slow
def test_promotion_changes_which_model_reaches_orthanc_and_nothing_else(
    orthanc_factory: Callable[..., Orthanc],
    nodes: list[NodeProcess],
    tiny_model_dir: Path,
    challenger_dir: Path,
    tmp_path: Path,
) -> None:
    require_shared_data(TCIA_SIEMENS_B40F)
    port = free_port()
    orthanc = orthanc_factory(modalities={"NODE": ("TRIAGE", "127.0.0.1", port)})
    config = node_config(
        tmp_path / "node",
        port=port,
        model_dir=tiny_model_dir,
        pacs_port=orthanc.dicom_port,
        extra={"challenger_model_dir": str(challenger_dir)},
    )
    db = tmp_path / "node" / "node.sqlite3"
    studies = []
    for n in (1, 2):  # the same slices twice, as two studies: one before, one after promotion
        files = reidentify_copy(series_files(TCIA_SIEMENS_B40F), tmp_path / f"s{n}", seed=n)
        studies.append(str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID))

    def analysed(study: int) -> bool:
        found = result_uids(orthanc, studies[study])
        recorded = db_query(db, "SELECT count(*) FROM challenger_results")[0][0]
        return "sr" in found and recorded == study + 1

    node = NodeProcess(config, port).start()
    nodes.append(node)
    storescu(tmp_path / "s1", port=port, aec="TRIAGE")
    wait_for(lambda: analysed(0), 180, interval=1, what=f"SR 1 (node log: {node.log})")
    champion = {"name": "tiny-test-model", "version": "0.0.1"}
    assert sr_model(orthanc, studies[0], tmp_path) == champion
    first = result_uids(orthanc, studies[0])
    jobs_before = db_query(db, "SELECT id, attempts, delivered_at FROM jobs")
    node.stop()

    out = node.cli("promote").stdout
    assert f"model_dir {tiny_model_dir} -> {challenger_dir}" in out
    node = NodeProcess(config, port).start()
    nodes.append(node)
    storescu(tmp_path / "s2", port=port, aec="TRIAGE")
    wait_for(lambda: analysed(1), 180, interval=1, what=f"SR 2 (node log: {node.log})")

    # the promoted model's SR reached Orthanc ...
    assert sr_model(orthanc, studies[1], tmp_path) == {**champion, "version": CHALLENGER_VERSION}
    # ... and nothing else changed: the same objects for the same series, the old ones not
    # re-sent (their job untouched), one job per series
    second = result_uids(orthanc, studies[1])
    assert sorted(second) == sorted(first) and all(len(v) == 1 for v in second.values())
    assert result_uids(orthanc, studies[0]) == first
    assert db_query(db, "SELECT id, attempts, delivered_at FROM jobs WHERE id = ?", [1]) == (
        jobs_before
    )
    assert db_query(db, "SELECT count(*), count(delivered_at) FROM jobs") == [(2, 2)]
    # the former live model now runs in shadow; each challenger verdict recorded, never sent
    shadow = db_query(
        db, "SELECT job_id, model_version, analysed FROM challenger_results ORDER BY job_id"
    )
    assert shadow == [(1, CHALLENGER_VERSION, 1), (2, "0.0.1", 1)]
    assert len(orthanc.series_instance_uids()) == 2 * len(first)  # result series only
    # the input mix of each analysed series is recorded for drift monitoring
    inputs = db_query(db, "SELECT manufacturer, kernel, slice_thickness_mm FROM job_inputs")
    assert inputs == [("SIEMENS", "B40F", 8.0)] * 2
    performance = json.loads(node.cli("performance", "--json").stdout)["model_versions"]
    roles = {(v, m["role"]) for v, m in performance.items() if m["series"] == 1}  # one series each
    assert roles == {
        ("0.0.1", "live"),
        (CHALLENGER_VERSION, "live"),
        ("0.0.1 (challenger)", "challenger"),
        (f"{CHALLENGER_VERSION} (challenger)", "challenger"),
    }
