"""The benchmark suite runs and reports its JSON shape (cheap parts, --quick; no timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.peers import CTMD_COVID, require_shared_data
from tests.tools import require_tool

REPO = Path(__file__).resolve().parents[1]


def test_quick_preprocessing_and_scale_json_shape(tmp_path: Path) -> None:
    require_shared_data()
    require_tool("storescu")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "preprocessing", "scale", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    saved = json.loads(out.read_text())
    assert saved["quick"] is True
    assert set(printed["benchmarks"]) == set(saved["benchmarks"]) == {"preprocessing", "scale"}

    pre = saved["benchmarks"]["preprocessing"]
    for key in ("vectorised_slices_per_s", "thesis_loop_slices_per_s", "ratio_vectorised_to_loop"):
        assert isinstance(pre[key], float) and pre[key] > 0, key
    assert pre["max_abs_diff_loop_vs_node"] < 0.05  # same transform, up to 8-bit quantisation
    assert pre["machine"]["nproc"] >= 1

    scale = saved["benchmarks"]["scale"]
    assert scale["points"][0]["instance_rows"] == 0
    assert scale["points"][-1]["instance_rows"] >= 2000
    for point in scale["points"]:
        assert point["ingest_instances_per_s"] > 0 and point["status_ms"] > 0

    assert set(saved["targets"]) == {
        "preprocessing.slices_per_s_per_core",
        "preprocessing.ratio_to_loop",
        "scale.ingest_flat_within_20pct",
        "scale.status_flat_within_20pct",
    }
    for entry in saved["targets"].values():
        assert set(entry) == {"value", "target", "holds"} and isinstance(entry["holds"], bool)


def test_quick_lungs_json_shape(tmp_path: Path) -> None:
    require_shared_data(CTMD_COVID)
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "lungs", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(out.read_text())
    lungs = saved["benchmarks"]["lungs"]
    assert lungs["series"]["shape"][1:] == [512, 512] and lungs["series"]["source_slices"] == 74
    for config in (lungs["one_thread"], lungs["node"]):
        assert config["seconds"] > 0 and config["peak_rss_mb"] > 0
        assert 0 < config["segment_share"] <= 1
        assert set(config["steps_s"]) >= {"lungs._lung_air", "lungs._split", "opacity.quantify"}
        assert config["dominant_step"] and config["profile_top_own_time"]
        assert config["lung_ml"] > 100  # P001's lungs, stretched onto 60 x 1 mm
    assert lungs["one_thread"]["threads"] == "1"
    assert set(saved["targets"]) == {
        "lungs.seconds_300_slices_node",
        "lungs.seconds_300_slices_one_thread",
    }
