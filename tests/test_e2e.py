"""End to end with real peers: Orthanc (PACS) auto-forwards real CT to the node process, the node
analyses it and its result objects (SR, key images, summary image) land back in the same study in
Orthanc, each in its own series, each valid.  Plus the node's fault promises: PACS down while the
results are due, SIGKILL in the middle of a series."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from node.report import verdict_from_report
from tests.faultkit import assert_each_result_once, results_in_study
from tests.nodeproc import NodeProcess, node_config
from tests.peers import (
    CTMD_COVID,
    TCIA_SIEMENS_B40F,
    Orthanc,
    free_port,
    require_shared_data,
    series_files,
    storescu,
    wait_for,
)
from tests.tools import require_tool

pytestmark = pytest.mark.slow

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    started: list[NodeProcess] = []

    def factory(port: int, model_dir: Path, pacs_port: int | None, **kw: Any) -> NodeProcess:
        config = node_config(
            tmp_path / "node", port=port, model_dir=model_dir, pacs_port=pacs_port, **kw
        )
        proc = NodeProcess(config, port)
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.stop()


KINDS_SENT = ["kos", "sr", "summary"]  # the default profile, to an Orthanc that accepts all
SCREENSHOTS = Path(__file__).resolve().parent / "output" / "screenshots"
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"


def orthanc_explorer_screenshot(url: str, wait_text: str, path: Path) -> None:
    """Open ``url`` in headless Debian Chromium (Playwright), wait for ``wait_text``, save a
    screenshot (and to docs/screenshots/ with UPDATE_SCREENSHOTS=1).  Without Chromium the
    step is left out, except under CI=true, where that is a failure."""
    if shutil.which("chromium") is None and os.environ.get("CI") != "true":
        return
    chromium = require_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--no-first-run"]
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(url)
            page.get_by_text(wait_text).first.wait_for(timeout=30_000)
            path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(path), full_page=True)
        finally:
            browser.close()
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SCREENSHOTS / path.name)


def sr_instances(orthanc: Orthanc, study_uid: str) -> list[dict[str, Any]]:
    return [t for t in orthanc.instances_in_study(study_uid) if t.get("SOPClassUID") == SR_CLASS]


def test_orthanc_forward_analyse_sr_back_in_same_study(
    orthanc_factory: Callable[..., Orthanc],
    node_factory: Callable[..., NodeProcess],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    require_shared_data(CTMD_COVID)
    dciodvfy = require_tool("dciodvfy")
    node_port = free_port()
    orthanc = orthanc_factory(
        modalities={
            "NODE": ("TRIAGE", "127.0.0.1", node_port),
            "STORESCU": ("STORESCU", "127.0.0.1", 104),
        },
        forward_to="NODE",
        stable_age=2,
    )
    node = node_factory(node_port, tiny_model_dir, orthanc.dicom_port).start()
    files = series_files(CTMD_COVID)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    storescu(CTMD_COVID, port=orthanc.dicom_port, aec=orthanc.aet, aet="STORESCU")

    wait_for(
        lambda: sorted(results_in_study(orthanc, source.StudyInstanceUID)) == KINDS_SENT,
        180,
        interval=1,
        what=f"the SR, key images and summary image in Orthanc (node log: {node.log})",
    )
    found = results_in_study(orthanc, source.StudyInstanceUID)
    files_back: dict[str, Path] = {}
    for kind, instances in found.items():
        assert len(instances) == 1, kind
        with urllib.request.urlopen(
            f"{orthanc.url}/instances/{instances[0]['_OrthancID']}/file"
        ) as rsp:
            files_back[kind] = tmp_path / f"{kind}.dcm"
            files_back[kind].write_bytes(rsp.read())
        back = pydicom.dcmread(files_back[kind], stop_before_pixels=True)
        assert back.StudyInstanceUID == source.StudyInstanceUID
        assert back.PatientID == source.PatientID
        check = subprocess.run(
            [dciodvfy, str(files_back[kind])], capture_output=True, text=True, timeout=60
        )
        errors = [
            line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")
        ]
        assert errors == [], f"{kind}: {check.stdout + check.stderr}"
    # as Orthanc Explorer lists the study: the CT and each result in its own dated series
    study_id = orthanc.post(
        "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": source.StudyInstanceUID}}
    )[0]
    listed = {
        s["MainDicomTags"].get("SeriesDescription", ""): s["MainDicomTags"]
        for s in orthanc.get(f"/studies/{study_id}/series")
    }
    assert len(listed) == 1 + len(KINDS_SENT), sorted(listed)
    for description, tags in listed.items():
        assert tags.get("SeriesDate"), f"{description!r} has no SeriesDate"
    assert sum("not a diagnosis" in d for d in listed) == len(KINDS_SENT)
    # the summary image as Orthanc renders it for its viewers
    summary_id = found["summary"][0]["_OrthancID"]
    with urllib.request.urlopen(f"{orthanc.url}/instances/{summary_id}/preview") as rsp:
        assert rsp.headers["Content-Type"] == "image/png"
        preview = rsp.read()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    (SCREENSHOTS / "orthanc_summary_preview.png").write_bytes(preview)
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        (DOCS_SCREENSHOTS / "orthanc_summary_preview.png").write_bytes(preview)
    summary = pydicom.dcmread(files_back["summary"])
    with Image.open(io.BytesIO(preview)) as shown:
        assert shown.size == (summary.Columns, summary.Rows)
        assert np.array_equal(np.asarray(shown.convert("RGB")), summary.pixel_array)
    orthanc_explorer_screenshot(
        f"{orthanc.url}/app/explorer.html#study?uuid={study_id}",
        "Lung opacity triage (AI) summary",
        SCREENSHOTS / "orthanc_study.png",
    )
    sr_file = files_back["sr"]
    sr = pydicom.dcmread(sr_file)
    dump = subprocess.run(
        [require_tool("dsrdump"), str(sr_file)], capture_output=True, text=True, timeout=60
    )
    assert dump.returncode == 0 and "not a diagnosis" in dump.stdout, dump.stdout + dump.stderr
    assert sr.SeriesDescription == "Lung opacity triage (AI) - not a diagnosis"

    # The node's verdict equals the offline `classify` of the same files.
    from_pacs = verdict_from_report(sr)
    offline = json.loads(node.cli("classify", str(CTMD_COVID)).stdout.strip().splitlines()[-1])
    assert from_pacs["analysed"] is True and offline["analysed"] is True
    assert from_pacs["finding"] == offline["finding"] or from_pacs["finding"].lower().startswith(
        offline["finding"].lower()[:3]
    )
    for name, value in offline["probabilities"].items():
        assert any(abs(v - value) < 1e-4 for v in from_pacs["probabilities"].values()), name
    assert from_pacs["slices_analysed"] == offline["slices_analysed"]

    status = node.status()
    row = next(
        r for r in status["recent_series"] if r["series_instance_uid"] == source.SeriesInstanceUID
    )
    assert row["instances"] == len(files)
    assert row["job_state"] == "done" and row["delivered_at"] is not None
    # the SR was not forwarded back to the node (Lua loop guard): one series only
    assert status["series_by_state"] == {"complete": 1}


def test_pacs_down_when_sr_due_delivers_once_when_back(
    orthanc_factory: Callable[..., Orthanc],
    node_factory: Callable[..., NodeProcess],
    tiny_model_dir: Path,
) -> None:
    require_shared_data(TCIA_SIEMENS_B40F)
    node_port = free_port()
    orthanc = orthanc_factory(modalities={"NODE": ("TRIAGE", "127.0.0.1", node_port)})
    orthanc.stop()
    node = node_factory(node_port, tiny_model_dir, orthanc.dicom_port, quiet_s=1.0).start()
    storescu(TCIA_SIEMENS_B40F, port=node_port, aec="TRIAGE", aet="STORESCU")

    def failed_attempts() -> int:
        rows = node.status()["recent_series"]
        return int(rows[0]["attempts"] or 0) if rows and rows[0]["job_stage"] == "deliver" else 0

    wait_for(lambda: failed_attempts() >= 2, 120, interval=1, what="two failed deliveries")
    # what `status` shows says what the log says: nothing listens (not "association aborted")
    last_error = node.status()["recent_series"][0]["last_error"]
    assert f"cannot connect to pacs (127.0.0.1:{orthanc.dicom_port}): Connection refused" in (
        last_error
    )
    orthanc.start()
    study_uid = str(pydicom.dcmread(series_files(TCIA_SIEMENS_B40F)[0]).StudyInstanceUID)
    wait_for(
        lambda: node.status()["recent_series"][0]["job_state"] == "done",
        60,
        interval=1,
        what="delivery after the PACS came back",
    )
    assert_each_result_once(orthanc, study_uid, node.config.parent / "spool")


def test_sigkill_mid_series_then_resend_loses_nothing_one_job(
    node_factory: Callable[..., NodeProcess], tiny_model_dir: Path
) -> None:
    require_shared_data(TCIA_SIEMENS_B40F)
    files = series_files(TCIA_SIEMENS_B40F)
    node_port = free_port()
    node = node_factory(node_port, tiny_model_dir, None, quiet_s=3.0).start()
    storescu(files[:15], port=node_port, aec="TRIAGE", aet="STORESCU")
    node.kill()
    node.start()
    storescu(files, port=node_port, aec="TRIAGE", aet="STORESCU")  # the sender resends all
    wait_for(
        lambda: node.status()["jobs_by_state"].get("done", 0) == 1,
        120,
        interval=1,
        what="the one job done",
    )
    status = node.status()
    assert status["series_by_state"] == {"complete": 1}
    assert status["recent_series"][0]["instances"] == len(files)
    assert status["recent_series"][0]["version"] == 1
    assert sum(status["jobs_by_state"].values()) == 1
    spooled = list((node.config.parent / "spool").rglob("*.dcm"))
    assert len([p for p in spooled if ".results" not in p.parts]) == len(files)


def test_catch_up_pulls_what_orthanc_failed_to_forward_while_node_was_down(
    orthanc_factory: Callable[..., Orthanc],
    node_factory: Callable[..., NodeProcess],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    """Orthanc does not retry a failed forward: the node's catch-up must find and pull it."""
    require_shared_data(TCIA_SIEMENS_B40F)
    import datetime as dt

    from tests.peers import reidentify_copy

    copies = reidentify_copy(series_files(TCIA_SIEMENS_B40F), tmp_path / "today", seed="catchup")
    today = dt.date.today().strftime("%Y%m%d")
    for path in copies:  # a study of today, so it is inside the catch-up lookback
        ds = pydicom.dcmread(path)
        ds.StudyDate = today
        ds.save_as(path, enforce_file_format=False)
    study_uid = str(pydicom.dcmread(copies[0]).StudyInstanceUID)

    node_port = free_port()
    orthanc = orthanc_factory(
        modalities={
            "NODE": ("TRIAGE", "127.0.0.1", node_port),
            "STORESCU": ("STORESCU", "127.0.0.1", 104),
        },
        forward_to="NODE",
        stable_age=1,
    )
    # the node is down: Orthanc's forward fails and is never retried
    storescu(copies, port=orthanc.dicom_port, aec=orthanc.aet, aet="STORESCU")
    wait_for(
        lambda: "forward" in orthanc.log_text().lower() and len(orthanc.get("/jobs")) >= 1,
        30,
        what="Orthanc's (failing) forward job",
    )
    node = node_factory(
        node_port,
        tiny_model_dir,
        orthanc.dicom_port,
        quiet_s=1.0,
        extra={
            "catch_up": {"enabled": True, "peer": "pacs", "interval_s": 2, "lookback_hours": 24}
        },
    ).start()
    wait_for(
        lambda: len(sr_instances(orthanc, study_uid)) == 1,
        120,
        interval=1,
        what=f"the SR of the caught-up series (node log: {node.log})",
    )
    status = node.status()
    assert status["recent_series"][0]["instances"] == len(copies)
    assert status["jobs_by_state"] == {"done": 1}
