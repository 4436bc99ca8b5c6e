"""Offline classification: the node's analysis on DICOM files, without a PACS.

Files are grouped by Series Instance UID and each series goes through exactly the code path of a
job (``pipeline.analyse_files``), so its verdict equals what the node sends for the same files.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import pydicom

from node.config import Settings
from node.infer import load_model
from node.pipeline import analyse_files
from node.report import build_report, write_report

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
    paths: list[Path], settings: Settings, model_dir: Path, sr_dir: Path | None = None
) -> list[dict[str, object]]:
    model = load_model(
        model_dir,
        runtime=settings.analysis.runtime,
        cache_dir=settings.storage.spool_dir / ".models",
    )
    results = []
    for series_uid, files in collect_series(paths).items():
        verdict, evidence = analyse_files(files, model, settings)
        result = verdict.as_json()
        if sr_dir is not None and evidence:
            sr = build_report(verdict, evidence, series_number=settings.results.series_number)
            sr_dir.mkdir(parents=True, exist_ok=True)
            target = sr_dir / f"{sr.SOPInstanceUID}.dcm"
            write_report(sr, target)
            result["sr_path"] = str(target)
        logger.info("series %s: %s", series_uid, result["finding"] or "not analysed")
        results.append(result)
    return results
