"""Web console over HTTP, in-process: config guard, basic auth, /metrics, dashboard (category,
PO, model notice) and its actions, /classify messages and limits, and a real series zip: its
category, PO/PHO table, key slices drawn with lung outlines and opacity map, and SR download equal
to the offline classify; labels from the series page (sign-in, token, same origin, audit rows),
the performance page against ``collect_performance`` (a challenger included), one vocabulary of
states across ``status``, ``status --json`` and the console, and the mode and drift banners.

The console runs as in the node (``start_web`` on a real socket, uvicorn in a thread) over a real
SQLite database; requests go over loopback with ``requests``.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import re
import shutil
import sys
import types
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from node import cli
from node.assess import CATEGORY_TEXT
from node.classify import classify_paths
from node.config import Settings, load_settings
from node.db import (
    ChallengerResult,
    Instance,
    Job,
    JobStage,
    JobState,
    Label,
    LabelAudit,
    Series,
    SeriesState,
    ShadowDelivery,
    utcnow,
)
from node.errors import ConfigError
from node.infer import load_model
from node.labels import import_labels
from node.model_spec import SPEC_FILE
from node.performance import collect_performance
from node.pipeline import Context
from node.report import verdict_from_report
from node.service import open_state
from node.status import STATES
from node.web.classify import UploadError, extract_zip
from node.web.render import LEFT_LUNG_RGB, RIGHT_LUNG_RGB
from node.web.server import WebServer, start_web
from tests.peers import CTMD_COVID, free_port, require_shared_data, series_files

Console = tuple[Context, str]


def make_settings(tmp_path: Path, model_dir: Path, **web: Any) -> Settings:
    return Settings.model_validate(
        {
            "storage": {
                "spool_dir": str(tmp_path / "spool"),
                "database_url": f"sqlite:///{tmp_path / 'node.sqlite3'}",
            },
            "results": {"send_to": None},
            "model_dir": str(model_dir),
            "web": {"port": free_port(), **web},
        }
    )


NOTICE = "tiny untrained test model: validated on nothing, do not rely on it."
MODEL_TAG = "tiny-test-model 0.0.1"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny test model with a notice in its model.json, as an exported model has."""
    target = tmp_path_factory.mktemp("noticed") / "model"
    shutil.copytree(tiny_model_dir, target)
    spec = json.loads((target / SPEC_FILE).read_text())
    (target / SPEC_FILE).write_text(json.dumps({**spec, "notice": NOTICE}))
    return target


@pytest.fixture
def console_factory(tmp_path: Path, model_dir: Path) -> Iterator[Callable[..., Console]]:
    """`console_factory(**web settings) -> (ctx, base url)`; servers stop at teardown."""
    servers: list[WebServer] = []
    model = load_model(model_dir)

    def factory(**web: Any) -> Console:
        settings = make_settings(tmp_path / f"node{len(servers)}", model_dir, **web)
        sessions, spool = open_state(settings)
        ctx = Context(settings=settings, sessions=sessions, spool=spool, model=model)
        server = start_web(ctx)
        servers.append(server)
        return ctx, server.url.rstrip("/")

    yield factory
    for server in servers:
        server.stop()


def seed_series(
    ctx: Context,
    uid: str,
    *,
    state: str = SeriesState.COMPLETE,
    job: dict[str, Any] | None = None,
    reason: str = "",
) -> tuple[int, int | None]:
    """One series row (current version 1) and optionally its job; returns (series id, job id)."""
    now = utcnow()
    with ctx.sessions.begin() as session:
        series = Series(
            study_instance_uid=f"{uid}.1",
            series_instance_uid=uid,
            modality="CT",
            study_date="20200401",
            series_description="Thorax 1.0 B40f",
            calling_ae="ORTHANC",
            instance_count=30,
            state=state,
            reject_reason=reason,
            last_received_at=now - dt.timedelta(seconds=40),
        )
        session.add(series)
        session.flush()
        session.add(
            Instance(
                series_id=series.id,
                sop_instance_uid=f"{uid}.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"/spool/{uid}.dcm",
                size=1,
            )
        )
        job_id = None
        if job is not None:
            delivered = {"delivered_at": now} if job["state"] == JobState.DONE else {}
            row = Job(series_id=series.id, series_version=1, **job, **delivered)
            session.add(row)
            session.flush()
            job_id = row.id
        return series.id, job_id


def stored_verdict(category: str, po: float, cnn: str, score: float) -> str:
    """A job row's verdict JSON, in the fields the dashboard reads (``SeriesVerdict.as_json``)."""
    return json.dumps(
        {
            "analysed": True,
            "finding": cnn,
            "probabilities": {"non-COVID": round(1 - score, 2), "COVID-19": score},
            "series_score": score,
            "reason": "",
            "category": category,
            "assessment": {"category": category, "pneumonia": category != "negative"},
            "quantification": {"total": {"volume_ml": 5200.0, "po": po, "pho": po / 4}},
        }
    )


DONE_POSITIVE = {
    "state": JobState.DONE,
    "stage": JobStage.DELIVER,
    "analysed": 1,
    "finding": "typical",
    "series_score": 0.81,
    "verdict_json": stored_verdict("typical", 12.345, "COVID-19", 0.81),
    "model_name": "tiny-test-model",
    "model_version": "0.0.1",
}
DONE_NEGATIVE = {
    **DONE_POSITIVE,
    "finding": "negative",
    "series_score": 0.2,
    "verdict_json": stored_verdict("negative", 0.104, "non-COVID", 0.2),
}
NOT_ANALYSED = {
    **DONE_POSITIVE,
    "analysed": 0,
    "finding": "not analysed",
    "series_score": None,
    "verdict_json": json.dumps(
        {
            "analysed": False,
            "reason": "no lungs found: 3 mL of lung in view",
            "category": "not analysed",
        }
    ),
}
DEAD_LETTER = {
    "state": JobState.FAILED,
    "stage": JobStage.DELIVER,
    "analysed": 1,
    "finding": "atypical",
    "attempts": 8,
    "last_error": "delivery failed 8 times, last: association rejected",
    "model_name": "tiny-test-model",
    "model_version": "0.0.1",
}


# --- configuration -------------------------------------------------------------------------------


def test_web_defaults_and_public_bind_needs_password(tmp_path: Path) -> None:
    web = Settings.model_validate({"results": {"send_to": None}}).web
    assert (web.enabled, web.bind_address, web.port, web.password) == (
        True,
        "127.0.0.1",
        8080,
        None,
    )
    config = tmp_path / "config.yaml"
    config.write_text("results: {send_to: null}\nweb: {bind_address: 0.0.0.0}\n")
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    assert "web.password" in str(refused.value) and "0.0.0.0" in str(refused.value)

    config.write_text("results: {send_to: null}\nweb: {bind_address: 0.0.0.0, password: s3cret}\n")
    settings = load_settings(config)
    assert settings.web.password is not None
    assert "s3cret" not in settings.model_dump_json()  # the startup log shows the settings


# --- auth, metrics -------------------------------------------------------------------------------


def test_basic_auth_guards_every_page(console_factory: Callable[..., Console]) -> None:
    _, url = console_factory(password="s3cret")
    for path in ("/", "/classify", "/metrics", "/model", "/static/style.css"):
        refused = requests.get(url + path, timeout=10)
        assert refused.status_code == 401, path
        assert refused.headers["WWW-Authenticate"].startswith("Basic")
        assert requests.get(url + path, auth=("any", "wrong"), timeout=10).status_code == 401
        assert requests.get(url + path, auth=("admin", "s3cret"), timeout=10).status_code == 200


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_parse_with_states_and_flagged_rate(
    console_factory: Callable[..., Console],
) -> None:
    ctx, url = console_factory()
    seed_series(ctx, "1.2.3.1", job=DONE_POSITIVE)
    seed_series(ctx, "1.2.3.2", job=DONE_NEGATIVE)
    seed_series(ctx, "1.2.3.3", job=DEAD_LETTER)
    seed_series(ctx, "1.2.3.4", state=SeriesState.REJECTED, reason="modality: 'MR'")
    seed_series(ctx, "1.2.3.5", state=SeriesState.RECEIVING)

    response = requests.get(url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)
    assert samples[("triage_series", (("state", "complete"),))] == 3
    assert samples[("triage_series", (("state", "rejected"),))] == 1
    assert samples[("triage_series", (("state", "receiving"),))] == 1
    assert samples[("triage_jobs", (("stage", "deliver"), ("state", "done")))] == 2
    assert samples[("triage_jobs", (("stage", "deliver"), ("state", "failed")))] == 1
    model = (("model_name", "tiny-test-model"), ("model_version", "0.0.1"))
    # flagged for reading first: typical and atypical, not negative
    assert samples[("triage_positive_rate", model)] == pytest.approx(2 / 3)
    for category in ("typical", "atypical", "negative"):
        assert samples[("triage_series_analysed", (("finding", category), *model))] == 1
    for outcome in ("stored", "duplicate", "refused"):
        assert ("triage_instances_received_total", (("outcome", outcome),)) in samples
    assert ("triage_analysis_seconds_count", ()) in samples
    assert ("triage_delivery_failures_total", ()) in samples


# --- dashboard -----------------------------------------------------------------------------------


def test_dashboard_rows_retry_and_rerun(console_factory: Callable[..., Console]) -> None:
    ctx, url = console_factory()
    delivered_id, _ = seed_series(ctx, "1.2.3.10", job=DONE_POSITIVE)
    _, dead_job = seed_series(ctx, "1.2.3.11", job=DEAD_LETTER)
    seed_series(ctx, "1.2.3.12", state=SeriesState.REJECTED, reason="modality: 'MR' not in ['CT']")
    seed_series(ctx, "1.2.3.13", job=DONE_NEGATIVE)
    seed_series(ctx, "1.2.3.14", job=NOT_ANALYSED)

    page = requests.get(url + "/", timeout=10).text
    assert NOTICE in page  # the model notice, once on the page
    verdicts = verdict_cells(page)
    assert verdicts["1.2.3.10"] == (
        "flagged typical",
        f"{CATEGORY_TEXT['typical']} PO 12.35 % CNN COVID-19 · score 0.81 · {MODEL_TAG}",
    )
    assert verdicts["1.2.3.11"][0] == "flagged atypical"  # a dead letter keeps its category
    assert CATEGORY_TEXT["atypical"] in verdicts["1.2.3.11"][1]
    assert verdicts["1.2.3.13"][0] == "neutral negative"
    assert verdicts["1.2.3.13"][1].startswith(f"{CATEGORY_TEXT['negative']} PO 0.10 %")
    assert verdicts["1.2.3.14"] == (
        "not-analysed not analysed",
        "not analysed no lungs found: 3 mL of lung in view",
    )
    assert verdicts["1.2.3.12"] == ("", "-")  # rejected: no job, no verdict
    assert (
        'id="flagged-count" title="category typical, indeterminate or atypical">read first <b>2'
        in page
    )
    assert "delivered" in page
    assert "association rejected" in page  # the dead letter's error
    assert "modality: &#39;MR&#39; not in" in page  # the rejection reason
    assert "2020-04-01" in page and "ORTHANC" in page and "Thorax 1.0 B40f" in page
    assert f'action="/jobs/{dead_job}/retry"' in page
    rows = {
        r["series_instance_uid"]: r for r in requests.get(url + "/api/series", timeout=10).json()
    }
    assert rows["1.2.3.10"]["turnaround_s"] == pytest.approx(40, abs=5)
    assert (rows["1.2.3.10"]["category"], rows["1.2.3.10"]["po"]) == ("typical", 12.345)
    assert rows["1.2.3.14"]["reason"] == "no lungs found: 3 mL of lung in view"

    # retry the dead letter: the job is queued again at its stage
    back = requests.post(url + f"/jobs/{dead_job}/retry", timeout=10)
    assert back.status_code == 200 and f"job {dead_job} requeued" in back.text
    with ctx.sessions() as session:
        job = session.get(Job, dead_job)
        assert job is not None and (job.state, job.stage, job.attempts) == ("queued", "deliver", 0)

    # re-run the delivered series: a new version with a new analysis job
    back = requests.post(url + f"/series/{delivered_id}/rerun", timeout=10)
    assert "re-run queued as job" in back.text
    with ctx.sessions() as session:
        series = session.get(Series, delivered_id)
        assert series is not None and series.version == 2
        jobs = session.query(Job).filter(Job.series_id == delivered_id).all()
        assert sorted((j.series_version, j.state, j.stage) for j in jobs) == [
            (1, "done", "deliver"),
            (2, "queued", "analyse"),
        ]
    again = requests.post(url + f"/series/{delivered_id}/rerun", timeout=10)
    assert "already queued or running" in again.text

    # a form posted from another site is refused
    forged = requests.post(
        url + f"/series/{delivered_id}/rerun", headers={"Origin": "http://evil.example"}, timeout=10
    )
    assert forged.status_code == 403


def verdict_cells(page: str) -> dict[str, tuple[str, str]]:
    """Series UID -> (classes of its category badge, the verdict cell's text, spaces collapsed)."""
    out = {}
    for uid, cell in re.findall(
        r'<tr class="row" data-series-uid="([^"]+)".*?<td class="verdict-cell">(.*?)</td>',
        page,
        re.S,
    ):
        badge = re.search(r'<span class="category ([^"]*)" data-category="([^"]*)"', cell)
        text = " ".join(re.sub(r"<[^>]+>", " ", cell).split())
        out[uid] = (f"{badge[1]} {badge[2]}" if badge else "", text)
    return out


# --- classify ------------------------------------------------------------------------------------


def upload(url: str, name: str, data: bytes) -> requests.Response:
    return requests.post(url + "/classify", files={"file": (name, data)}, timeout=300)


def test_classify_refuses_unsupported_and_oversized(
    console_factory: Callable[..., Console], tmp_path: Path
) -> None:
    _, url = console_factory(max_upload_mb=0.05)
    text = upload(url, "notes.txt", b"hello, not an image")
    assert text.status_code == 422
    assert "notes.txt: unsupported file" in text.text and "PNG or JPEG" in text.text

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "no DICOM here")
    nothing = upload(url, "series.zip", buffer.getvalue())
    assert nothing.status_code == 422 and "holds no DICOM files" in nothing.text

    big = upload(url, "big.png", b"\x89PNG\r\n\x1a\n" + bytes(200_000))
    assert big.status_code == 413 and "web.max_upload_mb" in big.text

    forged = requests.post(
        url + "/classify",
        files={"file": ("a.png", b"x")},
        headers={"Origin": "http://evil.example"},
        timeout=10,
    )
    assert forged.status_code == 403

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.dcm", bytes(5_000_000))
    with pytest.raises(UploadError, match="expands to"):
        extract_zip(bomb, tmp_path / "out", max_bytes=1_000_000)


def data_uri_image(uri: str) -> Image.Image:
    head, _, data = uri.partition(",")
    assert head == "data:image/png;base64", head
    return Image.open(io.BytesIO(base64.b64decode(data)))


def region_table(page: str) -> dict[str, list[float]]:
    """Row label -> [left mL, PO, PHO, right mL, PO, PHO, both mL, PO, PHO] of the PO table."""
    table = page.split('<table class="regions" id="regions">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r'data-region="([^"]+)"><th>[^<]*</th>(.*?)</tr>', table, re.S)
    return {label: [float(v) for v in re.findall(r"<td[^>]*>([^<]+)</td>", r)] for label, r in rows}


def test_classify_series_zip_gives_the_node_verdict_and_sr(
    console_factory: Callable[..., Console], tmp_path: Path, model_dir: Path
) -> None:
    require_shared_data(CTMD_COVID)
    ctx, url = console_factory()
    files = series_files(CTMD_COVID)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for f in files:
            archive.write(f, f"P001/{f.name}")
    response = upload(url, "P001.zip", buffer.getvalue())
    assert response.status_code == 200, response.text[-2000:]
    page = response.text
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    for identifying in ("PatientName", "PatientID", "PatientBirthDate"):
        if source.get(identifying):
            assert str(source.get(identifying)) not in page, identifying
    offline: dict[str, Any] = classify_paths([CTMD_COVID], ctx.settings, model_dir)[0]
    assessment, q = offline["assessment"], offline["quantification"]

    # the category in the RSNA wording, the flag, the likelihood, beside the model notice
    category = offline["category"]
    assert f'id="category" data-category="{category}">{CATEGORY_TEXT[category]}</span>' in page
    flag = "present: read this series first" if assessment["pneumonia"] else "absent"
    assert f'<dd id="pneumonia">{flag}</dd>' in page
    assert f'<dd id="likelihood">{assessment["covid_likelihood"]} ' in page
    assert page.count(NOTICE) == 2  # beside the category and beside the CNN's verdict
    thresholds = " ".join(page.split('id="thresholds">', 1)[1].split("</p>", 1)[0].split())
    thresholds = html.unescape(thresholds)
    po_threshold = ctx.model.spec.analysis.po_threshold
    assert thresholds.startswith("One threshold sets the verdict: a series is flagged when its PO")
    assert (
        f"reaches {po_threshold:g} % (model.json <code>analysis.po_threshold</code>" in thresholds
    )
    spec = ctx.model.spec  # the CNN's two thresholds, named as reference only
    assert f"slice operating point ({spec.threshold:.3f}" in thresholds
    assert f"positive from {spec.series_rule.series_threshold:g})" in thresholds
    assert thresholds.endswith("only make the CNN score shown for reference.")
    assert offline["rule"] in html.unescape(
        page
    )  # the verdict's own rule, beside the CNN's verdict

    # the PO table: left, right, both lungs; zones; bands (the verdict's numbers, 2 decimals)
    table = region_table(page)
    assert list(table) == ["whole lung", "upper", "middle", "lower", "peripheral", "central"]
    expected = {
        "whole lung": [q["lungs"]["left"], q["lungs"]["right"], q["total"]],
        "upper": [q["zones"]["left"]["upper"], q["zones"]["right"]["upper"], None],
        "peripheral": [q["bands"]["left"]["peripheral"], q["bands"]["right"]["peripheral"], None],
    }
    for label, regions in expected.items():
        for k, region in enumerate(regions):
            if region is None:  # both lungs: the sum of the two
                volume = table[label][0] + table[label][3]
                assert table[label][6] == pytest.approx(volume, abs=1.0)
                continue
            got = table[label][3 * k : 3 * k + 3]
            assert got == pytest.approx([region["volume_ml"], region["po"], region["pho"]], abs=0.6)
            assert got[1:] == pytest.approx([region["po"], region["pho"]], abs=0.006)
    assert sum(table[z][6] for z in ("upper", "middle", "lower")) == pytest.approx(
        table["whole lung"][6], abs=2.0
    )
    for caveat in offline["coverage"] or ["no coverage caveats"]:
        assert caveat in page

    # key slices: the lung window with both outlines and the red opacity map drawn over
    overlays = re.findall(r'<img class="overlay" src="([^"]+)" alt="key slice (\d)">', page)
    assert [int(rank) for _, rank in overlays] == list(range(1, len(offline["key_slices"]) + 1))
    assert overlays, "P001 has opacity: at least one key slice"
    outlined = dict.fromkeys((LEFT_LUNG_RGB, RIGHT_LUNG_RGB), 0)
    for (uri, _), key in zip(overlays, offline["key_slices"], strict=True):
        assert f"slice PO {key['po']:.1f} %" in page
        pixels = np.asarray(data_uri_image(uri).convert("RGB")).astype(int)
        assert pixels.shape[:2] == (source.Rows, source.Columns)
        for colour in outlined:
            outlined[colour] += int((pixels == colour).all(axis=2).sum())
        red = (pixels[..., 0] > pixels[..., 1] + 60) & (pixels[..., 0] > pixels[..., 2] + 60)
        assert red.sum() > 0, "a key slice has opacity: drawn in red"
    assert min(outlined.values()) > 500, outlined  # both lungs outlined, each in its colour

    # the CNN, for reference: its curve over every slice, and the SR equal to the offline run
    assert 'aria-label="CNN COVID-19 score per slice"' in page
    assert page.count('<circle cx="') == len(files)
    link = page.split('id="sr-download" href="', 1)[1].split('"', 1)[0]
    sr_bytes = requests.get(url + link, timeout=30).content
    sr = pydicom.dcmread(io.BytesIO(sr_bytes))
    from_console = verdict_from_report(sr)
    assert f'id="cnn-finding">{offline["finding"]}</span>' in page
    assert from_console["finding"] == offline["finding"]
    assert from_console["slices_analysed"] == offline["slices_analysed"]
    for name, value in offline["probabilities"].items():
        assert any(abs(v - value) < 1e-5 for v in from_console["probabilities"].values()), name


# --- labels from the console ---------------------------------------------------------------------


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
    assert found, "the label form carries a token"
    return found[1]


def post_label(
    url: str, series_id: int, auth: tuple[str, str] | None, **fields: str
) -> requests.Response:
    return requests.post(
        f"{url}/series/{series_id}/label", data=fields, auth=auth, timeout=10, allow_redirects=False
    )


def audit_rows(ctx: Context) -> list[LabelAudit]:
    with ctx.sessions() as session:
        return list(session.scalars(select(LabelAudit).order_by(LabelAudit.id)))


def test_label_from_the_console_with_sign_in_token_and_audit(
    console_factory: Callable[..., Console],
) -> None:
    ctx, url = console_factory(password="s3cret")
    series_id, job_id = seed_series(ctx, "1.2.3.20", job=DONE_POSITIVE)
    dr_a, dr_b = ("dr.a", "s3cret"), ("dr.b", "s3cret")

    page = requests.get(f"{url}/series/{series_id}", auth=dr_a, timeout=10).text
    assert NOTICE in page and 'id="label-form"' in page and "Save label as dr.a" in page
    assert "Not labelled yet." in page and 'id="audit-empty"' in page
    token = csrf_of(page)

    # refused: no sign-in, a wrong password, no token, another user's token, another site
    assert post_label(url, series_id, None, csrf=token, agreement="agree").status_code == 401
    wrong = ("dr.a", "nope")
    assert post_label(url, series_id, wrong, csrf=token, agreement="agree").status_code == 401
    assert post_label(url, series_id, dr_a, agreement="agree").status_code == 403
    assert post_label(url, series_id, dr_b, csrf=token, agreement="agree").status_code == 403
    forged = requests.post(
        f"{url}/series/{series_id}/label",
        data={"csrf": token, "agreement": "agree"},
        auth=dr_a,
        headers={"Origin": "http://evil.example"},
        timeout=10,
    )
    assert forged.status_code == 403
    # refused with the field named: agreeing with a flagged verdict but saying no pneumonia
    bad = post_label(url, series_id, dr_a, csrf=token, agreement="agree", pneumonia="no")
    assert (
        bad.status_code == 422 and "pneumonia: &#39;no&#39; contradicts &#39;agree&#39;" in bad.text
    )
    assert audit_rows(ctx) == []

    # disagree with "typical": no pneumonia, by dr.a
    done = post_label(url, series_id, dr_a, csrf=token, agreement="disagree", covid="no")
    assert done.status_code == 303 and done.headers["location"].startswith(f"/series/{series_id}")
    first = audit_rows(ctx)
    assert len(first) == 1 and first[0].changed_by == "dr.a" and first[0].before_json == ""
    after = json.loads(first[0].after_json)
    assert (after["pneumonia"], after["covid"], after["labelled_by"]) == (False, False, "dr.a")
    assert f"disagreed with the verdict typical (job {job_id}" in first[0].source
    performance = requests.get(url + "/api/performance", auth=dr_a, timeout=10).json()
    numbers = performance["model_versions"]["0.0.1"]
    assert (numbers["labelled"], numbers["unlabelled"], numbers["confusion"]["fp"]) == (1, 0, 1)

    # the same series labelled again, by dr.b, agreeing: both audit rows stay, chained
    page = requests.get(f"{url}/series/{series_id}", auth=dr_b, timeout=10).text
    assert "disagrees with the verdict" in page and "by dr.a" in page
    done = post_label(url, series_id, dr_b, csrf=csrf_of(page), agreement="agree", covid="yes")
    assert done.status_code == 303
    both = audit_rows(ctx)
    assert [a.changed_by for a in both] == ["dr.a", "dr.b"]
    assert json.loads(both[1].before_json) == after
    assert json.loads(both[1].after_json)["pneumonia"] is True
    with ctx.sessions() as session:
        label = session.scalars(select(Label)).one()
        assert (label.key_kind, label.key_value, label.pneumonia, label.covid) == (
            "series",
            "1.2.3.20",
            1,
            1,
        )
    page = requests.get(f"{url}/series/{series_id}", auth=dr_b, timeout=10).text
    assert page.count('<tr class="audit-row">') == 2
    numbers = requests.get(url + "/api/performance", auth=dr_b, timeout=10).json()
    assert numbers["model_versions"]["0.0.1"]["confusion"]["tp"] == 1
    dashboard_row = {
        r["series_instance_uid"]: r
        for r in requests.get(url + "/api/series", auth=dr_b, timeout=10).json()
    }["1.2.3.20"]
    assert dashboard_row["label"]["labelled_by"] == "dr.b" and dashboard_row["agrees"] is True


def test_labelling_needs_the_console_password(console_factory: Callable[..., Console]) -> None:
    ctx, url = console_factory()  # no web.password: nobody to record as who
    series_id, _ = seed_series(ctx, "1.2.3.21", job=DONE_NEGATIVE)
    page = requests.get(f"{url}/series/{series_id}", timeout=10).text
    assert 'id="labelling-off"' in page and 'id="label-form"' not in page
    refused = post_label(url, series_id, None, agreement="agree")
    assert refused.status_code == 403 and "web.password" in refused.text
    assert audit_rows(ctx) == []
    assert requests.get(f"{url}/series/999", timeout=10).status_code == 404


# --- one vocabulary of states --------------------------------------------------------------------


def test_state_names_are_the_same_in_cli_json_and_console(
    console_factory: Callable[..., Console], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx, url = console_factory()
    analysing = {**DONE_POSITIVE, "stage": JobStage.ANALYSE, "analysed": None, "finding": ""}
    kept = {**DONE_POSITIVE, "state": JobState.QUEUED, "last_error": ""}
    expected = {
        "1.2.3.30": "receiving",
        "1.2.3.31": "rejected",
        "1.2.3.32": "complete",
        "1.2.3.33": "queued",
        "1.2.3.34": "running",
        "1.2.3.35": "reported",
        "1.2.3.36": "shadow",
        "1.2.3.37": "delivered",
        "1.2.3.38": "failed",
    }
    seed_series(ctx, "1.2.3.30", state=SeriesState.RECEIVING)
    seed_series(ctx, "1.2.3.31", state=SeriesState.REJECTED, reason="modality: 'MR'")
    seed_series(ctx, "1.2.3.32")
    seed_series(ctx, "1.2.3.33", job={**analysing, "state": JobState.QUEUED})
    seed_series(ctx, "1.2.3.34", job={**analysing, "state": JobState.RUNNING})
    seed_series(ctx, "1.2.3.35", job=kept)
    _, shadow_job = seed_series(ctx, "1.2.3.36", job={**DONE_POSITIVE, "state": "done"})
    seed_series(ctx, "1.2.3.37", job=DONE_POSITIVE)
    seed_series(ctx, "1.2.3.38", job=DEAD_LETTER)
    with ctx.sessions.begin() as session:
        job = session.get(Job, shadow_job)
        assert job is not None
        job.delivered_at = None  # shadow mode: done, withheld, not sent
        session.add(ShadowDelivery(job_id=shadow_job, peer="pacs"))

    config = tmp_path / "status-config.yaml"
    config.write_text(
        json.dumps(
            {
                "storage": {
                    "spool_dir": str(ctx.settings.storage.spool_dir),
                    "database_url": ctx.settings.storage.database_url,
                },
                "results": {"send_to": None},
            }
        )
    )
    assert cli.main(["status", "--json", "--config", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)
    from_json = {r["series_instance_uid"]: r["state"] for r in report["recent_series"]}
    assert cli.main(["status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    from_text = {
        line.split()[0]: line.split()[3] for line in text.splitlines() if line.startswith("1.2.3.")
    }
    page = requests.get(url + "/", timeout=10).text
    from_page = dict(
        re.findall(r'<tr class="row" data-series-uid="([^"]+)" data-state="([^"]+)"', page)
    )
    from_api = {
        r["series_instance_uid"]: r["state"]
        for r in requests.get(url + "/api/series", timeout=10).json()
    }
    assert from_json == from_text == from_page == from_api == expected
    assert list(report["by_state"]) == list(STATES) and set(expected.values()) == set(STATES)
    assert report["by_state"] == dict.fromkeys(STATES, 1)
    assert "series: " + ", ".join(f"{s} 1" for s in STATES) in text
    legend = re.findall(r'<dt><span class="state ([a-z]+)">', page)
    summary = re.findall(r'<li class="state [a-z]+" data-state="([a-z]+)"', page)
    assert legend == summary == list(STATES)


# --- performance page and the banners ------------------------------------------------------------


def test_performance_page_renders_collect_performance(
    console_factory: Callable[..., Console], tmp_path: Path
) -> None:
    ctx, url = console_factory()
    seeded = {  # uid: (job, label)
        "1.2.3.40": (DONE_POSITIVE, "pneumonia"),
        "1.2.3.41": (DONE_POSITIVE, "no pneumonia"),
        "1.2.3.42": (DONE_NEGATIVE, "no pneumonia"),
        "1.2.3.43": (DONE_NEGATIVE, "pneumonia"),
        "1.2.3.44": (DONE_NEGATIVE, ""),
    }
    for uid, (job, _) in seeded.items():
        seed_series(ctx, uid, job=job)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "series_instance_uid,label,labelled_by,labelled_at\n"
        + "".join(f"{uid},{lab},dr.csv,2026-12-01\n" for uid, (_, lab) in seeded.items() if lab)
    )
    import_labels(ctx.sessions, labels)
    expected = collect_performance(ctx.sessions)["model_versions"]["0.0.1"]

    page = requests.get(url + "/performance", timeout=10).text
    section = page.split('data-version="0.0.1">', 1)[1].split("</section>", 1)[0]
    for name in ("sensitivity", "specificity", "ppv", "npv", "auc_po"):
        row = section.split(f'data-metric="{name}">', 1)[1].split("</tr>", 1)[0]
        value = expected[name]["value"]
        assert (f"{value:.3f}" if value is not None else ">-<") in row, name
        assert f'<td class="num n">{expected[name]["n"]}</td>' in row, name
        if expected[name]["ci95"]:
            low, high = expected[name]["ci95"]
            assert f"{low:.3f} \N{EN DASH} {high:.3f}" in row, name
    assert expected["sensitivity"]["value"] == 0.5 and expected["unlabelled"] == 1
    assert f'<b class="n-unlabelled">{expected["unlabelled"]}</b>' in section
    assert f'<b class="n-labelled">{expected["labelled"]}</b>' in section
    assert NOTICE in page and 'id="threshold-story"' in page
    # the score distributions: one dot per series and score, in the group of its label
    dots = re.findall(r'<circle class="dot" data-group="([^"]+)" data-value="([0-9.]+)"', section)
    assert len(dots) == 2 * len(seeded)
    po_dots = sorted((g, float(v)) for g, v in dots[: len(seeded)])
    assert po_dots == sorted(
        [
            ("pneumonia", 12.345),
            ("no pneumonia", 12.345),
            ("no pneumonia", 0.104),
            ("pneumonia", 0.104),
            ("unlabelled", 0.104),
        ]
    )

    # a challenger (recorded beside the live model, never sent) is shown as such, with the live
    # model's numbers on the same series
    with ctx.sessions.begin() as session:
        jobs = session.execute(
            select(Job.id, Series.series_instance_uid).join(Series, Series.id == Job.series_id)
        ).all()
        for job_id, uid in jobs:
            if uid in ("1.2.3.40", "1.2.3.43"):  # flags both pneumonia series, PO 20 %
                session.add(
                    ChallengerResult(
                        job_id=job_id,
                        model_name="tiny-test-model",
                        model_version="0.0.2",
                        analysed=1,
                        finding="typical",
                        series_score=0.9,
                        verdict_json=stored_verdict("typical", 20.0, "COVID-19", 0.9),
                    )
                )
    report = collect_performance(ctx.sessions)["model_versions"]
    assert report["0.0.2"]["role"] == "challenger"
    page = requests.get(url + "/performance", timeout=10).text
    assert page.count('class="panel model-version') == 2
    live_section = page.split('data-version="0.0.1">', 1)[1].split("</section>", 1)[0]
    challenger = page.split('data-version="0.0.2">', 1)[1].split("</section>", 1)[0]
    assert "challenger, not sent" in challenger and "challenger, not sent" not in live_section
    sensitivity = r'"sensitivity"><th>Sensitivity</th>\s*<td class="num value">1.000<'
    assert re.search(sensitivity, challenger)
    same = report["0.0.2"]["live_on_same_series"]["sensitivity"]["value"]
    assert f'<td class="num" data-metric="sensitivity">{same:.3f}</td>' in challenger
    assert challenger.count('<circle class="dot"') == 4  # 2 series x (PO, CNN score)


def test_mode_and_drift_banners_on_every_page(
    console_factory: Callable[..., Console], monkeypatch: pytest.MonkeyPatch
) -> None:
    drift = types.ModuleType("node.drift")
    warning = "PO distribution shifted: KS 0.41 > 0.2 over 31 series (7 days)"
    drift.current_warning = lambda sessions: warning  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "node.drift", drift)
    ctx, url = console_factory(password="s3cret")
    series_id, _ = seed_series(ctx, "1.2.3.50", job=DONE_POSITIVE)
    for path in ("/", "/performance", f"/series/{series_id}", "/classify", "/model"):
        page = html.unescape(requests.get(url + path, auth=("dr.a", "s3cret"), timeout=10).text)
        assert f'id="drift-warning" role="alert"><b>Drift:</b> {warning}</p>' in page, path
        assert 'class="model-tag mode-live"' in page, path

    monkeypatch.setitem(sys.modules, "node.drift", None)  # not there yet: ImportError, no banner
    _, url = console_factory()
    page = requests.get(url + "/performance", timeout=10).text
    assert 'id="drift-warning"' not in page and "live mode" in page
