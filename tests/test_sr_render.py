"""What a radiologist's viewer shows of our objects (issue 12, point 4), with real tools.

A real series (COVID-CT-MD P001, Hounsfield analysis as the node runs it, tiny CNN) is analysed
and every object the node sends is written.  Each SR (the TID 1500 Comprehensive 3D SR, the Basic
Text SR fallback and the Key Object Selection) is rendered to HTML with DCMTK ``dsr2html``, as a
PACS web viewer or a DCMTK-based reading station shows it, and the summary Secondary Capture is
decoded to PNG.  The HTML is checked for what the reader must see (category, the opacity
numbers, the whole model notice, "not a diagnosis"), then each page is opened in headless Debian
Chromium and screenshotted to tests/output/screenshots/ (and docs/screenshots/ with
UPDATE_SCREENSHOTS=1, for the README).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from node.config import Settings
from tests.peers import CTMD_COVID
from tests.test_outputs import PACS, headers_of
from tests.tools import require_tool

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "tests" / "output" / "screenshots"
DOCS_SCREENSHOTS = REPO / "docs" / "screenshots"
SHIPPED = REPO / "models" / "covid-ct-lite0" / "1.1.0"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run"]


def noticed_model(tiny_model_dir: Path, target: Path) -> Path:
    """The tiny model with the shipped model's notice (the caveat every SR must show in full)."""
    shutil.copytree(tiny_model_dir, target)
    spec = json.loads((target / "model.json").read_text())
    spec["notice"] = json.loads((SHIPPED / "model.json").read_text())["notice"]
    (target / "model.json").write_text(json.dumps(spec, indent=2))
    return target


@pytest.fixture(scope="module")
def written(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """P001 through ``triage-node classify --out`` (real Hounsfield analysis, tiny CNN with the
    shipped notice): every object kind written to disk, and the verdict as JSON."""
    from node.classify import classify_paths

    headers_of(CTMD_COVID)  # skips (or fails under CI) without the real data
    model_dir = noticed_model(tiny_model_dir, tmp_path_factory.mktemp("model") / "m")
    config = Settings.model_validate(
        {"model_dir": str(model_dir), "peers": [PACS], "results": {"send_to": "pacs"}}
    )
    out = tmp_path_factory.mktemp("out")
    [result] = classify_paths([CTMD_COVID], config, model_dir, out_dir=out)
    assert result["analysed"], result["reason"]
    files = {kind: Path(path) for kind, path in result["objects"].items()}
    assert sorted(files) == ["kos", "sr", "summary", "summary_png", "text_sr"]
    assert {p.parent for p in files.values()} == {out / str(result["series_instance_uid"])}
    notice = json.loads((model_dir / "model.json").read_text())["notice"]
    return {"result": result, "files": files, "notice": " ".join(notice.split())}


def dsr2html(path: Path, out: Path) -> str:
    """Render ``path`` as ``dsr2html`` does by default (HTML 4.01), UTF-8; return the HTML."""
    result = subprocess.run(
        [require_tool("dsr2html"), "+U8", str(path), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # DCMTK 3.6.7 says what it cannot check (its VR checker knows no UTF-8, ISO_IR 192; it has
    # no template constraints for TID 2010); anything else it says counts
    unchecked = ("does not support this Specific", "template constraints not yet supported")
    problems = [
        line
        for line in result.stderr.splitlines()
        if line.startswith(("W:", "E:", "F:")) and not any(u in line for u in unchecked)
    ]
    assert problems == [], result.stderr
    return out.read_text(encoding="utf-8")


def visible_text(page_html: str) -> str:
    """The text a reader sees: tags dropped, entities decoded, whitespace collapsed."""
    text = re.sub(r"<[^>]+>", " ", page_html)
    return " ".join(html.unescape(text).split())


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def screenshot(browser: Any, url: str, name: str, width: int = 1000) -> tuple[Path, int]:
    """Open ``url``, save the top of the page (at most 1400 px, what a reader sees first) as
    ``name``.png; return the path and the whole page's height in CSS pixels."""
    page = browser.new_page(viewport={"width": width, "height": 700})
    try:
        page.goto(url)
        page.wait_for_load_state("load")
        height = int(page.evaluate("document.documentElement.scrollHeight"))
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        clip = {"x": 0, "y": 0, "width": width, "height": min(height, 1400)}
        page.screenshot(path=str(path), clip=clip, full_page=True)
    finally:
        page.close()
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SCREENSHOTS / path.name)
    return path, height


def test_tid1500_sr_renders_with_category_numbers_and_whole_notice(
    written: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    result = written["result"]
    text = visible_text(dsr2html(written["files"]["sr"], tmp_path / "sr.html"))
    assert "Imaging Measurement Report" in text
    assert result["assessment"]["category_text"] in text
    # each measurement with its name (a CONTINUOUS container would print bare "1.94 %"),
    # whole lungs first: the PO the verdict rests on
    po = re.findall(r"Percentage of opacity: ([0-9.]+) %", text)
    assert len(po) == 1 + 2 + 2 * 3 + 2 * 2, "both lungs, each lung, 3 zones and 2 bands each"
    assert abs(float(po[0]) - result["quantification"]["total"]["po"]) < 0.01
    assert re.search(r"Volume: [0-9.]+ ml", text)
    # the notice in full, not cut off (dsrdump without +Pl truncates it; a viewer must not)
    assert written["notice"] in text
    assert "not a diagnosis" in text.lower()
    _, height = screenshot(browser, (tmp_path / "sr.html").as_uri(), "sr_dsr2html")
    assert height > 2000, "the browser lays out the whole report"


def test_basic_text_sr_renders_the_same_story(
    written: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    result = written["result"]
    text = visible_text(dsr2html(written["files"]["text_sr"], tmp_path / "text.html"))
    assert "Basic Text SR" in text
    assert result["assessment"]["category_text"] in text
    assert written["notice"] in text
    # each statement under its own name, not run together into one paragraph
    assert re.search(r"Finding: Lung volume: both [0-9]+ mL", text)
    assert "Conclusion: " + result["assessment"]["category_text"] in text
    screenshot(browser, (tmp_path / "text.html").as_uri(), "text_sr_dsr2html")


def test_key_object_selection_renders_the_key_slices(
    written: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    key_slices = written["result"]["key_slices"]
    text = visible_text(dsr2html(written["files"]["kos"], tmp_path / "kos.html"))
    assert "Key Object Selection" in text and "Of Interest" in text
    assert "not a diagnosis" in text
    kos = pydicom.dcmread(written["files"]["kos"])
    images = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [
        k["sop_instance_uid"] for k in key_slices
    ]
    assert images
    # dsr2html links each referenced image by its SOP class: one "CT image" per key slice
    assert text.count("CT image") == len(images)
    screenshot(browser, (tmp_path / "kos.html").as_uri(), "kos_dsr2html")


def test_summary_image_as_png_in_a_browser(
    written: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    sc = pydicom.dcmread(written["files"]["summary"])
    png = written["files"]["summary_png"]  # classify --out writes it beside summary.dcm
    with Image.open(png) as image:
        assert np.array_equal(np.asarray(image), sc.pixel_array)
    page = png.parent / "summary.html"
    page.write_text(
        '<html><body style="margin:0;background:#000">'
        f'<img style="display:block" src="{png.name}"></body></html>'
    )
    shot, height = screenshot(browser, page.as_uri(), "summary_in_browser", width=sc.Columns)
    assert height == max(700, sc.Rows), "the image is shown at full size, not broken"
    with Image.open(shot) as image:
        # the browser shows the pixels we wrote: the top-left banner is red ("not a diagnosis")
        banner = np.asarray(image.convert("RGB"))[5:50, 5:400].astype(int)
    assert (banner[..., 0] > banner[..., 2] + 40).mean() > 0.5
