"""Offline classification: the node's analysis on DICOM files, without a PACS.

Files are grouped by Series Instance UID and each series goes through exactly the code path of a
job (``pipeline.analyse_files``), so its verdict equals what the node sends for the same files.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import pydicom
from PIL import Image

from node.config import Settings
from node.infer import load_model
from node.outputs import KINDS, build_outputs
from node.pipeline import analyse_series
from node.report import write_report

logger = logging.getLogger(__name__)


def collect_series(paths: list[Path]) -> dict[str, list[Path]]:
    """Group DICOM files (folders are searched recursively) by Series Instance UID."""
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    series: dict[str, list[Path]] = defaultdict(list)
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:  # not DICOM: skip (README files, manifests)
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid:
            series[uid].append(file)
    return dict(series)


def classify_paths(
    paths: list[Path], settings: Settings, model_dir: Path, out_dir: Path | None = None
) -> list[dict[str, object]]:
    """Analyse each series found under ``paths``; return its verdict as JSON.

    With ``out_dir``, every result object the node can send (``outputs.KINDS``: the TID 1500 SR,
    the key object selection, the summary image, the Basic Text SR), built exactly as the node
    builds them, is written into ``out_dir/<Series Instance UID>/<kind>.dcm`` (``sr.dcm``,
    ``kos.dcm``, ``summary.dcm``, ``text_sr.dcm``), plus ``summary.png`` (the summary image, to
    open without a DICOM viewer); the JSON names every file.
    """
    model = load_model(
        model_dir,
        runtime=settings.analysis.runtime,
        cache_dir=settings.storage.spool_dir / ".models",
    )
    results = []
    for series_uid, files in collect_series(paths).items():
        analysis = analyse_series(files, model, settings, draw=out_dir is not None)
        result = analysis.verdict.as_json()
        if out_dir is not None and analysis.evidence:
            objects = build_outputs(analysis, settings.results, kinds=KINDS)
            folder = out_dir / series_uid
            folder.mkdir(parents=True, exist_ok=True)
            written = {}
            for kind, ds in objects.items():
                write_report(ds, folder / f"{kind}.dcm")
                written[kind] = str(folder / f"{kind}.dcm")
            if "summary" in objects:
                Image.fromarray(objects["summary"].pixel_array).save(folder / "summary.png")
                written["summary_png"] = str(folder / "summary.png")
            result["sr_path"] = written["sr"]
            result["objects"] = written
        logger.info("series %s: %s", series_uid, result["finding"] or "not analysed")
        results.append(result)
    return results
