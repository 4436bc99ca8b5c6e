"""Web console in a real browser: headless Debian Chromium driven by Playwright, against the node
as a separate process with Orthanc as the PACS.

The dashboard is opened before a real series is sent to Orthanc and, without reloading, must show
it arrive and reach "delivered"; /classify gets a real slice, a real DICOM file and a real series
zip; /metrics of the same node is parsed with prometheus_client.  Screenshots go to
tests/output/screenshots/; with UPDATE_SCREENSHOTS=1 they are also copied to docs/screenshots/.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from node.report import verdict_from_report
from tests.nodeproc import REPO, NodeProcess, node_config
from tests.peers import (
    CTMD_COVID,
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
    sent: bool = False


def model_with_card(source: Path, target: Path) -> Path:
    """A copy of the tiny test model with a model card and a figure, as an exported model has."""
    shutil.copytree(source, target)
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


def test_dashboard_shows_a_series_from_orthanc_reach_delivered(
    web_node: WebNode, page: Any
) -> None:
    files = series_files(TCIA_SIEMENS_B40F)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    page.goto(web_node.url + "/?refresh=1")
    page.wait_for_selector("#no-series")

    storescu(files, port=web_node.orthanc.dicom_port, aec=web_node.orthanc.aet, aet="STORESCU")
    web_node.sent = True
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
    age, study_date, series, slices, sender, state, verdict, turnaround, _ = cells
    assert age.endswith(" ago")
    assert study_date == f"{source.StudyDate[:4]}-{source.StudyDate[4:6]}-{source.StudyDate[6:]}"
    assert " ".join(str(source.SeriesDescription).split()) in series  # HTML collapses spaces
    assert slices == str(len(files)) and sender == "ORTHANC" and state.startswith("delivered")
    assert "non-COVID" in verdict and "COVID-19" in verdict  # finding and both probabilities
    assert turnaround.endswith(" s") or turnaround.endswith(" min")
    assert page.query_selector("li.state.delivered b").inner_text() == "1"
    content = page.content()
    for identifying in (source.get("PatientName"), source.get("PatientBirthDate")):
        if identifying:
            assert str(identifying) not in content
    screenshot(page, "dashboard")


def test_metrics_of_the_running_node(web_node: WebNode) -> None:
    files = series_files(TCIA_SIEMENS_B40F)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    if not web_node.sent:  # run on its own: send the series here
        storescu(files, port=web_node.orthanc.dicom_port, aec=web_node.orthanc.aet, aet="STORESCU")
        web_node.sent = True
    wait_for(lambda: series_state(web_node, uid) == "delivered", 180, 0.5, "delivered")

    text = requests.get(web_node.url + "/metrics", timeout=10).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("triage_instances_received_total", (("outcome", "stored"),))] == len(files)
    assert samples[("triage_series", (("state", "complete"),))] == 1
    assert samples[("triage_jobs", (("stage", "deliver"), ("state", "done")))] == 1
    assert samples[("triage_analysis_seconds_count", ())] == 1
    assert samples[("triage_delivery_failures_total", ())] == 0
    model = (("model_name", "tiny-test-model"), ("model_version", "0.0.1"))
    assert samples[("triage_positive_rate", model)] in (0.0, 1.0)
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

    result = page.query_selector(".series-result")
    assert result is not None
    finding = page.inner_text("#finding")
    assert set(bar_values(page, ".series-result")) == {"non-COVID", "COVID-19"}
    assert len(page.query_selector_all("svg.curve circle")) == len(files)  # one point per slice
    thumbs = page.query_selector_all("ol.thumbs img")
    assert len(thumbs) == 5
    assert all(t.evaluate("img => img.naturalWidth") > 0 for t in thumbs)
    screenshot(page, "classify_series")

    href = page.get_attribute("#sr-download", "href")
    response = page.request.get(web_node.url + href)
    assert response.ok and response.headers["content-type"] == "application/dicom"
    sr = verdict_from_report(pydicom.dcmread(io.BytesIO(response.body())))
    assert sr["analysed"] is True and sr["slices_analysed"] == len(files)
    assert finding.lower()[:3] == str(sr["finding"]).lower()[:3]


def test_model_page_shows_card_figures_and_spec(web_node: WebNode, page: Any) -> None:
    page.goto(web_node.url + "/model")
    assert "tiny-test-model 0.0.1" in page.inner_text("#model-card h1")
    assert page.query_selector("#model-card table") is not None  # markdown tables rendered
    assert page.eval_on_selector(".figures img", "img => img.naturalWidth") == 360
    assert '"positive_class": "COVID-19"' in page.inner_text("#model-json")
    screenshot(page, "model")
