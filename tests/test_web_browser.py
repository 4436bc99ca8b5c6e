"""Web console in a real browser: headless Debian Chromium driven by Playwright, against the node
as a separate process with Orthanc as the PACS.

The dashboard is opened before a real series is sent to Orthanc and, without reloading, must show
it arrive and reach "delivered" with its category and PO (a COVID-19 series follows it);
/classify gets a real slice, a real DICOM file and a real series zip (category, PO table, key
slices with lung outlines and opacity map, the CNN's curve); /metrics of the same node is parsed
with prometheus_client.  A second node, in shadow mode with a password and a challenger model,
analyses three real series: labels come in by ``labels import`` and by the series page's form
(agree, then disagree: two audit rows), and the performance page, its challenger panel, the drift
and mode banners and the state names are checked against the CLI of the same node.
Screenshots go to tests/output/screenshots/; with UPDATE_SCREENSHOTS=1 they are also copied to
docs/screenshots/.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import yaml
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from node.assess import CATEGORY_TEXT
from node.model_spec import SPEC_FILE
from node.report import verdict_from_report
from tests.nodeproc import REPO, NodeProcess, node_config
from tests.peers import (
    CTMD_COVID,
    CTMD_NORMAL,
    SHARED_DATA,
    TCIA_SIEMENS_B40F,
    Orthanc,
    free_port,
    require_shared_data,
    series_files,
    start_orthanc,
    storescu,
    wait_for,
)
from tests.tools import require_tool

pytestmark = pytest.mark.slow

SCREENSHOTS = REPO / "tests" / "output" / "screenshots"
DOCS_SCREENSHOTS = REPO / "docs" / "screenshots"
MOSMED = SHARED_DATA / "slices" / "mosmed"
#: Debian's Chromium, as root, on a machine without outside network (see the machine notes).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def screenshot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SCREENSHOTS / path.name)
    return path


@dataclass
class WebNode:
    orthanc: Orthanc
    node: NodeProcess
    url: str
    sent: list[Path] = field(default_factory=list)  # series folders sent to Orthanc, in order


NOTICE = "tiny untrained test model: its scores mean nothing; do not rely on this verdict."


def model_with_card(source: Path, target: Path) -> Path:
    """A copy of the tiny test model with a notice, a model card and a figure, as an exported
    model has."""
    shutil.copytree(source, target)
    spec = json.loads((target / SPEC_FILE).read_text())
    (target / SPEC_FILE).write_text(json.dumps({**spec, "notice": NOTICE}, indent=2))
    (target / "MODEL_CARD.md").write_text(
        "# Model card: tiny-test-model 0.0.1\n\n"
        "## Intended use\nTests of the node only: a tiny fixed-weight CNN, **not trained**.\n\n"
        "## Measured performance\n| source | n | ROC AUC |\n|---|---|---|\n| none | 0 | n/a |\n"
    )
    figure = Image.new("RGB", (360, 240), "white")
    draw = ImageDraw.Draw(figure)
    draw.rectangle((40, 20, 340, 200), outline="black")
    draw.line((40, 200, 340, 20), fill="grey")
    draw.text((120, 210), "test figure (no evaluation)", fill="black")
    figure.save(target / "roc.png")
    return target


@pytest.fixture(scope="module")
def web_node(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[WebNode]:
    """Orthanc forwarding to a node process whose web console is on a free port."""
    require_shared_data(TCIA_SIEMENS_B40F, CTMD_COVID, MOSMED)
    require_tool("storescu")
    require_tool("Orthanc")
    tmp = tmp_path_factory.mktemp("web-e2e")
    node_port, web_port = free_port(), free_port()
    orthanc = start_orthanc(
        tmp / "orthanc",
        modalities={
            "NODE": ("TRIAGE", "127.0.0.1", node_port),
            "STORESCU": ("STORESCU", "127.0.0.1", 104),
        },
        forward_to="NODE",
        stable_age=2,
    )
    model_dir = model_with_card(tiny_model_dir, tmp / "model")
    config = node_config(
        tmp / "node",
        port=node_port,
        model_dir=model_dir,
        pacs_port=orthanc.dicom_port,
        extra={"web": {"port": web_port}},
    )
    node = NodeProcess(config, node_port)
    try:
        node.start()
        yield WebNode(orthanc, node, f"http://127.0.0.1:{web_port}")
    finally:
        node.stop()
        orthanc.cleanup()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(60_000)
    yield opened
    context.close()


def series_state(web: WebNode, series_uid: str) -> str | None:
    rows = requests.get(web.url + "/api/series", timeout=10).json()
    return next((r["state"] for r in rows if r["series_instance_uid"] == series_uid), None)


def is_delivered(web: WebNode, series_uid: str) -> bool:
    return series_state(web, series_uid) == "delivered"


def test_dashboard_shows_a_series_from_orthanc_reach_delivered(
    web_node: WebNode, page: Any
) -> None:
    files = series_files(TCIA_SIEMENS_B40F)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    page.goto(web_node.url + "/?refresh=1")
    page.wait_for_selector("#no-series")

    send(web_node, TCIA_SIEMENS_B40F)
    row = f'tr.row[data-series-uid="{source.SeriesInstanceUID}"]'
    seen: list[str] = []
    deadline = time.monotonic() + 180
    while not seen or seen[-1] != "delivered":  # the page refreshes itself: no reload here
        assert time.monotonic() < deadline, f"states seen: {seen} (node log: {web_node.node.log})"
        element = page.query_selector(row)
        state = element.get_attribute("data-state") if element is not None else None
        if state is not None and (not seen or seen[-1] != state):
            seen.append(state)
        time.sleep(0.2)
    print("states seen on the dashboard:", seen)
    assert len(seen) >= 2, seen
    assert set(seen[:-1]) <= {"receiving", "complete", "queued", "running", "reported"}, seen

    cells = [c.inner_text() for c in page.query_selector_all(f"{row} td")]
    age, study_date, series, slices, sender, state, verdict, label, turnaround, _ = cells
    assert age.endswith(" ago")
    assert study_date == f"{source.StudyDate[:4]}-{source.StudyDate[4:6]}-{source.StudyDate[6:]}"
    assert " ".join(str(source.SeriesDescription).split()) in series  # HTML collapses spaces
    assert slices == str(len(files)) and sender == "ORTHANC" and state.startswith("delivered")
    assert "CNN " in verdict  # the CNN's class and score, for reference
    assert turnaround.endswith(" s") or turnaround.endswith(" min")
    assert label == "label…"  # not labelled yet: a link to its page
    assert NOTICE in page.inner_text("#model-notice")
    flagged = verdict_flagged(page, row)

    # a COVID-19 series (COVID-CT-MD P001) after it: the newest row, its own category
    covid = series_uid(CTMD_COVID)
    send(web_node, CTMD_COVID)
    wait_for(partial(is_delivered, web_node, covid), 180, 0.5, "P001 delivered")
    covid_row = f'tr.row[data-series-uid="{covid}"]'
    page.wait_for_selector(f'{covid_row}[data-state="delivered"]')
    flagged += verdict_flagged(page, covid_row)
    assert page.query_selector("li.state.delivered b").inner_text() == "2"
    assert page.query_selector("#flagged-count b").inner_text() == str(flagged)
    content = page.content()
    for identifying in (source.get("PatientName"), source.get("PatientBirthDate")):
        if identifying:
            assert str(identifying) not in content
    screenshot(page, "dashboard")


def send(web: WebNode, folder: Path) -> None:
    storescu(series_files(folder), port=web.orthanc.dicom_port, aec=web.orthanc.aet, aet="STORESCU")
    web.sent.append(folder)


def series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(series_files(folder)[0], stop_before_pixels=True).SeriesInstanceUID)


def verdict_flagged(page: Any, row: str) -> int:
    """Check a row's verdict cell (category in the RSNA wording, its colour, PO); 1 if flagged."""
    badge = page.query_selector(f"{row} td.verdict-cell .category")
    category = badge.get_attribute("data-category")
    assert badge.inner_text() == CATEGORY_TEXT[category]
    flagged = category != "negative"  # typical, indeterminate, atypical: read first
    assert ("flagged" if flagged else "neutral") in badge.get_attribute("class").split()
    assert page.query_selector(f"{row} td.verdict-cell .po").inner_text().startswith("PO ")
    return int(flagged)


def test_metrics_of_the_running_node(web_node: WebNode) -> None:
    if not web_node.sent:  # run on its own: send a series here
        send(web_node, TCIA_SIEMENS_B40F)
    for uid in [series_uid(folder) for folder in web_node.sent]:
        wait_for(partial(is_delivered, web_node, uid), 180, 0.5, f"{uid} delivered")

    text = requests.get(web_node.url + "/metrics", timeout=10).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    sent = len(web_node.sent)
    instances = sum(len(series_files(folder)) for folder in web_node.sent)
    assert samples[("triage_instances_received_total", (("outcome", "stored"),))] == instances
    assert samples[("triage_series", (("state", "complete"),))] == sent
    assert samples[("triage_jobs", (("stage", "deliver"), ("state", "done")))] == sent
    assert samples[("triage_analysis_seconds_count", ())] == sent
    assert samples[("triage_delivery_failures_total", ())] == 0
    model = (("model_name", "tiny-test-model"), ("model_version", "0.0.1"))
    analysed = {
        dict(labels)["finding"]: value
        for (name, labels), value in samples.items()
        if name == "triage_series_analysed"
    }
    assert set(analysed) <= set(CATEGORY_TEXT) and sum(analysed.values()) == sent
    flagged = sent - analysed.get("negative", 0)
    assert samples[("triage_positive_rate", model)] == pytest.approx(flagged / sent)
    assert samples[("triage_model_loaded", model)] == 1


def mosmed_covid_slice() -> Path:
    with open(MOSMED / "manifest.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["label"] == "COVID")
    return MOSMED / row["path"]


def classify_in_page(page: Any, url: str, path: Path) -> None:
    page.goto(url + "/classify")
    page.set_input_files("#file", str(path))
    page.click("#upload button[type=submit]")
    page.wait_for_selector("#result, #error", timeout=300_000)
    error = page.query_selector("#error")
    assert error is None, error.inner_text()


def bar_values(page: Any, scope: str = "#result") -> dict[str, float]:
    bars = page.query_selector_all(f"{scope} svg.bars rect.bar")
    return {b.get_attribute("data-class"): float(b.get_attribute("data-p")) for b in bars}


def test_classify_a_slice_image_and_a_dicom_file(web_node: WebNode, page: Any) -> None:
    classify_in_page(page, web_node.url, mosmed_covid_slice())
    probabilities = bar_values(page)
    assert set(probabilities) == {"non-COVID", "COVID-19"}
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-3)
    assert page.inner_text("#finding") in probabilities
    assert NOTICE in page.inner_text(".slice-result .model-notice")  # beside the CNN's verdict
    assert page.eval_on_selector("img.slice", "img => img.naturalWidth") > 0
    screenshot(page, "classify_slice")

    by_position = sorted(
        series_files(CTMD_COVID),
        key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    dicom = by_position[len(by_position) // 2]  # mid-chest
    classify_in_page(page, web_node.url, dicom)
    assert "lung window" in page.inner_text("#result figcaption")
    assert sum(bar_values(page).values()) == pytest.approx(1.0, abs=1e-3)
    screenshot(page, "classify_dicom")

    page.goto(web_node.url + "/classify")
    page.set_input_files("#file", str(MOSMED / "manifest.csv"))
    page.click("#upload button[type=submit]")
    assert "unsupported file" in page.inner_text("#error")


def test_classify_a_series_zip(web_node: WebNode, page: Any, tmp_path: Path) -> None:
    files = series_files(CTMD_COVID)
    archive = tmp_path / "covid-series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in files:
            zf.write(f, f"P001/{f.name}")
    classify_in_page(page, web_node.url, archive)

    # the category from the opacity analysis, with the flag, likelihood and the model notice
    category = page.get_attribute("#category", "data-category")
    assert page.inner_text("#category") == CATEGORY_TEXT[category]
    assert page.inner_text("#pneumonia").startswith(
        "present" if category != "negative" else "absent"
    )
    assert page.inner_text("#likelihood").split()[0] in ("high", "intermediate", "low")
    assert NOTICE in page.inner_text(".assessment .model-notice")
    assert "analysis.po_threshold" in page.inner_text("#thresholds")

    # the PO table: left, right, both for whole lungs, three zones and two bands
    rows = page.query_selector_all("#regions tbody tr")
    assert [r.get_attribute("data-region") for r in rows] == [
        "whole lung",
        "upper",
        "middle",
        "lower",
        "peripheral",
        "central",
    ]
    assert all(len(r.query_selector_all("td")) == 9 for r in rows)
    both_po = float(rows[0].query_selector_all("td.po")[2].inner_text())
    assert f"PO {both_po:.2f} %" in page.inner_text("#po-total")

    # key slices: the lung window with both lungs outlined and the opacity in red, all loaded
    overlays = page.query_selector_all("ol.key-slices img.overlay")
    assert 1 <= len(overlays) <= 3
    assert all(img.evaluate("img => img.naturalWidth") == 512 for img in overlays)

    # the CNN, for reference only: its verdict, bars, notice and one point per slice
    cnn = page.query_selector("section.cnn")
    assert set(bar_values(page, "section.cnn")) == {"non-COVID", "COVID-19"}
    assert NOTICE in cnn.inner_text()
    assert len(page.query_selector_all("svg.curve circle")) == len(files)
    screenshot(page, "classify_series")

    href = page.get_attribute("#sr-download", "href")
    response = page.request.get(web_node.url + href)
    assert response.ok and response.headers["content-type"] == "application/dicom"
    sr = verdict_from_report(pydicom.dcmread(io.BytesIO(response.body())))
    assert sr["analysed"] is True and sr["slices_analysed"] == len(files)
    assert page.inner_text("#cnn-finding") == sr["finding"]


def test_model_page_shows_card_figures_and_spec(web_node: WebNode, page: Any) -> None:
    page.goto(web_node.url + "/model")
    assert "tiny-test-model 0.0.1" in page.inner_text("#model-card h1")
    assert page.query_selector("#model-card table") is not None  # markdown tables rendered
    assert page.eval_on_selector(".figures img", "img => img.naturalWidth") == 360
    assert '"positive_class": "COVID-19"' in page.inner_text("#model-json")
    screenshot(page, "model")


# --- review: labels from the console and local performance, on a node in shadow mode --------------

PASSWORD = "console-pass"
RADIOLOGIST = "dr.browser"
CHALLENGER_VERSION = "0.0.2"
CHALLENGER_PO_THRESHOLD = 1.0  # the test model's is 0.5 %
DRIFT_WARNING = "input mix shifted: slice thickness 5 mm in 80 % of series (reference 12 %)"


@dataclass
class ReviewNode:
    node: NodeProcess
    url: str
    uids: dict[str, str]  # name -> Series Instance UID, all analysed (shadow: withheld)


@pytest.fixture(scope="module")
def review_node(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[ReviewNode]:
    """A node in shadow mode with the console behind a password and a challenger model (the test
    model as version 0.0.2, with a higher PO threshold), three real series analysed by both
    (sent straight to the node: shadow mode sends nothing, so no PACS is needed)."""
    folders = {"b40f": TCIA_SIEMENS_B40F, "covid": CTMD_COVID, "normal": CTMD_NORMAL}
    require_shared_data(*folders.values())
    require_tool("storescu")
    tmp = tmp_path_factory.mktemp("web-review")
    node_port, web_port = free_port(), free_port()
    config = node_config(
        tmp / "node",
        port=node_port,
        model_dir=model_with_card(tiny_model_dir, tmp / "model"),
        pacs_port=free_port(),  # nothing listens there: shadow mode never calls it
        extra={
            "challenger_model_dir": str(challenger_model(tiny_model_dir, tmp / "challenger")),
            "web": {"port": web_port, "password": PASSWORD},
            "drift": {"enabled": False},  # the test writes the drift report the banner shows
        },
    )
    raw = yaml.safe_load(config.read_text())
    raw["results"]["mode"] = "shadow"
    config.write_text(yaml.safe_dump(raw))
    node = NodeProcess(config, node_port)
    try:
        node.start()
        url = f"http://127.0.0.1:{web_port}"
        uids = {name: series_uid(folder) for name, folder in folders.items()}
        for folder in folders.values():
            storescu(series_files(folder), port=node_port, aec="TRIAGE", aet="STORESCU")
        for name, uid in uids.items():
            wait_for(partial(is_shadowed, url, uid), 300, 0.5, f"{name} analysed")
        wait_for(partial(challenger_done, url, len(uids)), 300, 0.5, "challenger verdicts")
        yield ReviewNode(node, url, uids)
    finally:
        node.stop()


def challenger_model(source: Path, target: Path) -> Path:
    """The test model as another version, whose analysis flags only more opacity."""
    model_with_card(source, target)
    spec = json.loads((target / SPEC_FILE).read_text())
    analysis = {**spec.get("analysis", {}), "po_threshold": CHALLENGER_PO_THRESHOLD}
    (target / SPEC_FILE).write_text(
        json.dumps({**spec, "version": CHALLENGER_VERSION, "analysis": analysis}, indent=2)
    )
    return target


def challenger_done(url: str, count: int) -> bool:
    report = requests.get(url + "/api/performance", auth=(RADIOLOGIST, PASSWORD), timeout=30)
    versions = report.json()["model_versions"]
    return bool(versions.get(CHALLENGER_VERSION, {}).get("series") == count)


def is_shadowed(url: str, series_uid: str) -> bool:
    """Analysed, its results written and withheld by shadow mode."""
    rows = requests.get(url + "/api/series", auth=(RADIOLOGIST, PASSWORD), timeout=10).json()
    return any(r["series_instance_uid"] == series_uid and r["state"] == "shadow" for r in rows)


def signed_in_page(browser: Any) -> Any:
    context = browser.new_context(
        viewport={"width": 1360, "height": 900},
        http_credentials={"username": RADIOLOGIST, "password": PASSWORD},
    )
    opened = context.new_page()
    opened.set_default_timeout(60_000)
    return opened


LIVE = 'section.model-version[data-version="0.0.1"]'
CHALLENGER = f'section.model-version[data-version="{CHALLENGER_VERSION}"]'


def page_counts(page: Any) -> tuple[int, int]:
    section = page.query_selector(LIVE)
    return (
        int(section.query_selector("b.n-labelled").inner_text()),
        int(section.query_selector("b.n-unlabelled").inner_text()),
    )


def cli_numbers(review: ReviewNode, version: str = "0.0.1") -> dict[str, Any]:
    report = json.loads(review.node.cli("performance", "--json").stdout)
    return dict(report["model_versions"][version])


def test_label_in_the_console_and_see_performance_change(
    review_node: ReviewNode, browser: Any, tmp_path: Path
) -> None:
    uids = review_node.uids
    # ground truth for two series from the CLI import, as a site would bring it
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "Series Instance UID,label,covid,labelled_by,labelled_at\n"
        f"{uids['b40f']},no pneumonia,no,dr.csv,2026-12-01T08:00:00\n"
        f"{uids['covid']},pneumonia,yes,dr.csv,2026-12-01T08:05:00\n"
    )
    assert "2 new" in review_node.node.cli("labels", "import", str(labels)).stdout

    # a drift warning, as the weekly comparison stores it: the banner shows it on every page
    from node.db import DriftReport, make_engine, make_sessionmaker

    database = review_node.node.config.parent / "node.sqlite3"
    sessions = make_sessionmaker(make_engine(f"sqlite:///{database}"))
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with sessions.begin() as session:
        session.add(
            DriftReport(
                window_start=now - dt.timedelta(days=7),
                window_end=now,
                drifted=1,
                warning=DRIFT_WARNING,
            )
        )

    page = signed_in_page(browser)
    page.goto(review_node.url + "/performance")
    before = cli_numbers(review_node)
    assert page_counts(page) == (before["labelled"], before["unlabelled"]) == (2, 1)
    assert page.inner_text("#drift-warning") == f"Drift: {DRIFT_WARNING}"
    assert "shadow mode: nothing sent to pacs" in page.inner_text("header")
    assert NOTICE in page.inner_text("#model-notice")
    assert "analysis.po_threshold" in page.inner_text("#threshold-story")
    rows = {
        r.get_attribute("data-metric"): r.query_selector("td.value").inner_text()
        for r in page.query_selector_all(f"{LIVE} table.metrics tbody tr")
    }
    for name in ("sensitivity", "specificity", "ppv", "npv", "auc_po"):
        value = before[name]["value"]
        assert rows[name] == ("-" if value is None else f"{value:.3f}"), name
    dots = page.query_selector_all(f"{LIVE} figure.plot.po circle.dot")
    assert sorted(d.get_attribute("data-group") for d in dots) == [
        "no pneumonia",
        "pneumonia",
        "unlabelled",
    ]
    # the challenger beside it: measured on the same series, marked as never sent
    challenger = cli_numbers(review_node, CHALLENGER_VERSION)
    assert challenger["role"] == "challenger" and challenger["labelled"] == 2
    assert "challenger, not sent" in page.inner_text(f"{CHALLENGER} h2")
    shown = page.inner_text(f'{CHALLENGER} tr[data-metric="sensitivity"] td.value')
    value = challenger["sensitivity"]["value"]
    assert shown == ("-" if value is None else f"{value:.3f}")
    assert len(page.query_selector_all(f"{CHALLENGER} figure.plot circle.dot")) == 6
    screenshot(page, "performance")

    # the unlabelled series, from the dashboard: agree with its verdict, then think again
    page.goto(review_node.url + "/")
    assert page.inner_text("#drift-warning") == f"Drift: {DRIFT_WARNING}"
    row = f'tr.row[data-series-uid="{uids["normal"]}"]'
    assert page.get_attribute(row, "data-state") == "shadow"
    page.click(f"{row} a.desc")
    page.wait_for_selector("#label-form")
    assert NOTICE in page.inner_text("#model-notice")  # beside the verdict
    assert page.inner_text("#current-label") == "Not labelled yet."
    category = page.get_attribute("#verdict .category", "data-category")
    flagged = category != "negative"
    page.check("input[name=agreement][value=agree]")
    page.check("input[name=covid][value=no]")
    page.click("#save-label")
    page.wait_for_selector("#flash")
    assert page.inner_text("#flash").startswith("label added")
    audit = page.query_selector_all("#audit tr.audit-row")
    assert len(audit) == 1 and audit[0].query_selector("td.who").inner_text() == RADIOLOGIST
    assert "agrees with the verdict" in page.inner_text("#current-label")
    after_agree = cli_numbers(review_node)
    assert (after_agree["labelled"], after_agree["unlabelled"]) == (3, 0)
    confusion = after_agree["confusion"]
    assert (
        confusion["tp" if flagged else "tn"] == before["confusion"]["tp" if flagged else "tn"] + 1
    )

    page.check("input[name=agreement][value=disagree]")
    page.click("#save-label")
    page.wait_for_selector("#flash")
    audit = page.query_selector_all("#audit tr.audit-row")
    assert len(audit) == 2  # both changes stay, newest first
    assert (
        audit[0]
        .query_selector("td.before")
        .inner_text()
        .startswith("pneumonia" if flagged else "no pneumonia")
    )
    assert "disagrees with the verdict" in page.inner_text("#current-label")
    screenshot(page, "series_label")
    after = cli_numbers(review_node)
    assert after["confusion"]["fn" if not flagged else "fp"] == (
        before["confusion"]["fn" if not flagged else "fp"] + 1
    )

    page.goto(review_node.url + "/performance")
    assert page_counts(page) == (3, 0)
    metrics = {
        r.get_attribute("data-metric"): r.query_selector("td.n").inner_text()
        for r in page.query_selector_all(f"{LIVE} table.metrics tbody tr")
    }
    assert metrics["sensitivity"] == str(after["sensitivity"]["n"])
    page.context.close()


def test_state_names_match_the_cli(review_node: ReviewNode, browser: Any) -> None:
    status = review_node.node.status()
    text = review_node.node.cli("status").stdout
    page = signed_in_page(browser)
    page.goto(review_node.url + "/")
    for uid in review_node.uids.values():
        (row,) = [r for r in status["recent_series"] if r["series_instance_uid"] == uid]
        (line,) = [line for line in text.splitlines() if line.startswith(uid)]
        shown = page.get_attribute(f'tr.row[data-series-uid="{uid}"]', "data-state")
        assert row["state"] == line.split()[3] == shown == "shadow"
    page.context.close()
