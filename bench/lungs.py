"""Benchmark 6, lungs: Hounsfield lung segmentation + opacity quantification of a 300-slice series.

The series is real anatomy at a thin-slice size: COVID-CT-MD P001 (74 slices of 512 x 512 at
4 mm, JPEG Lossless) read as the node reads it (``series_check`` + ``lungs.read_volume``), then
linearly interpolated along the body axis to 300 slices over P001's own extent and declared 1 mm
apart (P001 covers 292 mm: the anatomy is stretched by 299/292 = 1.024 along z).  The volume is
written once to a temporary ``.npy``; each configuration runs in its own process that loads it,
so each peak RSS is a process holding the series (as ``pipeline.analyse_files`` does) plus what
``lungs.segment`` and ``opacity.quantify`` add on top.

Configurations: one thread (OpenCV ``setNumThreads(1)``, one BLAS/OpenMP thread) and as the node
runs it (library defaults: OpenCV uses every core; numpy and scipy.ndimage are single-threaded
here anyway).  Timers wrap the steps from outside (``lungs._lung_air``, ``lungs._split``,
``lungs._with_dense_opacities``, ``opacity.quantify`` and ``opacity.opacity_mask``,
``opacity.peripheral_band`` within it) by replacing the module attributes in the child; one extra
run under cProfile lists the functions with the most own time.

``python -m bench.lungs [--quick]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import pstats
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import SHARED_DATA, emit, median, peak_rss_mb, rounded, run_child, target

SOURCE = SHARED_DATA / "ct_dicom" / "covid_ct_md" / "COVID" / "P001"
SLICES = 300
SPACING_Z_MM = 1.0
TARGET_S = 1.5
#: the steps timed, as (module, attribute); module "lungs" is node.lungs, "opacity" node.opacity
STEPS = (
    ("lungs", "replace_padding"),
    ("lungs", "_lung_air"),
    ("lungs", "_split"),
    ("lungs", "_with_dense_opacities"),
    ("opacity", "quantify"),
    ("opacity", "opacity_mask"),
    ("opacity", "peripheral_band"),
)
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def build_volume(path: Path, slices: int) -> dict[str, Any]:
    """P001 in HU, interpolated to ``slices`` slices; saved as ``path`` (.npy) + its geometry."""
    from node import lungs
    from node.series_check import order_and_check, read_headers

    if not SOURCE.is_dir():
        raise FileNotFoundError(f"real data not available: {SOURCE} is missing")
    files = sorted(p for p in SOURCE.iterdir() if p.suffix.lower() == ".dcm")
    refs = order_and_check(read_headers(files), require_axial=True, max_gap_factor=1.6)
    source, geometry, padding = lungs.read_volume(refs)
    positions = np.linspace(0.0, len(source) - 1, slices)
    volume = np.empty((slices, *source.shape[1:]), dtype=np.float32)
    for k, t in enumerate(positions):  # slice by slice: no full-size temporaries
        i = min(int(t), len(source) - 2)
        w = np.float32(t - i)
        np.multiply(source[i], np.float32(1.0) - w, out=volume[k])
        volume[k] += w * source[i + 1]
    np.save(path, volume)
    return {
        "shape": list(volume.shape),
        "spacing_mm": [SPACING_Z_MM, *geometry.spacing[1:]],
        "orientation": [float(v) for v in refs[0].header.ImageOrientationPatient],
        "padding_hu": padding,
        "source_slices": len(source),
        "source_spacing_mm": list(geometry.spacing),
    }


def _timed(fn: Callable[..., Any], totals: dict[str, list[float]], name: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name].append(time.perf_counter() - start)

    return wrapper


def child_time(args: argparse.Namespace) -> dict[str, Any]:
    """One process: load the volume, time segment + quantify ``runs`` times, split by step."""
    import cv2

    from node import lungs, opacity

    if args.threads == "1":
        cv2.setNumThreads(1)
    modules = {"lungs": lungs, "opacity": opacity}
    volume = np.load(args.volume)
    rss_loaded = _status_mb("VmRSS")
    reset = _reset_peak()
    spacing = (args.spacing[0], args.spacing[1], args.spacing[2])
    geometry = lungs.Geometry.from_orientation(spacing, args.orientation)
    geometry = dataclasses.replace(geometry, thickness_mm=spacing[0])  # as read_volume sets it

    def analyse() -> opacity.Quantification:
        masks = lungs.segment(volume, geometry)
        return opacity.quantify(masks)

    q = analyse()  # warm-up: imports, the allocator's heap
    per_run: list[dict[str, float]] = []
    totals_s: list[float] = []
    for _ in range(args.runs):
        steps: dict[str, list[float]] = defaultdict(list)
        originals = {(m, a): getattr(modules[m], a) for m, a in STEPS}
        for (m, a), fn in originals.items():
            setattr(modules[m], a, _timed(fn, steps, f"{m}.{a}"))
        try:
            start = time.perf_counter()
            analyse()
            totals_s.append(time.perf_counter() - start)
        finally:
            for (m, a), fn in originals.items():
                setattr(modules[m], a, fn)
        per_run.append({name: sum(times) for name, times in steps.items()})
    profile = cProfile.Profile()
    profile.runcall(analyse)
    split = {name: rounded(median([r.get(name, 0.0) for r in per_run])) for name in per_run[0]}
    total = median(totals_s)
    segment_s = total - split["opacity.quantify"]
    return {
        "threads": "1" if args.threads == "1" else f"library default (cv2: {cv2.getNumThreads()})",
        "runs": args.runs,
        "seconds": rounded(total),
        "seconds_all_runs": [rounded(t) for t in totals_s],
        "segment_s": rounded(segment_s),
        "quantify_s": split["opacity.quantify"],
        "steps_s": split,
        "segment_share": rounded(segment_s / total),
        "dominant_step": _dominant(split, segment_s),
        "peak_rss_mb": round(peak_rss_mb()),
        "rss_after_loading_volume_mb": round(rss_loaded),
        "peak_above_loaded_volume_mb": round(_status_mb("VmHWM") - rss_loaded) if reset else None,
        "lung_ml": round(q.total.volume_ml),
        "po": round(q.total.po, 3),
        "profile_top_own_time": _top(profile, 8),
    }


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory figure (VmRSS: now, VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak of the analysis alone shows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _dominant(split: dict[str, float], segment_s: float) -> str:
    """The step with the largest share: segmentation steps, the rest of segment, quantify."""
    seg_steps = {k: v for k, v in split.items() if k.startswith("lungs.")}
    shares = {**seg_steps, "lungs.segment (rest)": segment_s - sum(seg_steps.values())}
    shares["opacity.quantify"] = split["opacity.quantify"]
    name = max(shares, key=lambda k: shares[k])
    whole = segment_s + split["opacity.quantify"]
    return f"{name} ({100 * shares[name] / whole:.0f} % of segment + quantify)"


def _top(profile: cProfile.Profile, count: int) -> list[dict[str, Any]]:
    stats = pstats.Stats(profile)
    rows = []
    entries = stats.stats.items()  # type: ignore[attr-defined]  # not in typeshed's Stats
    for (filename, line, func), (_, calls, own, cumulative, _) in entries:
        where = Path(filename).name if filename != "~" else "builtin"
        rows.append((own, f"{where}:{line}({func})", calls, cumulative))
    rows.sort(reverse=True)
    return [
        {"function": f, "calls": c, "own_s": rounded(o), "cumulative_s": rounded(cu)}
        for o, f, c, cu in rows[:count]
    ]


def run(quick: bool) -> dict[str, Any]:
    slices = 60 if quick else SLICES
    runs = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-lungs-") as tmp:
        path = Path(tmp) / "volume.npy"
        built = build_volume(path, slices)
        common = ["--volume", str(path), "--runs", str(runs), "--orientation"]
        common += [str(v) for v in built["orientation"]]
        common += ["--spacing", *(str(v) for v in built["spacing_mm"])]
        one = run_child("bench.lungs", ["--child", "--threads", "1", *common], env=ONE_THREAD_ENV)
        node = run_child("bench.lungs", ["--child", "--threads", "node", *common])
    source_extent = (built["source_slices"] - 1) * built["source_spacing_mm"][0]
    stretch = (slices - 1) * SPACING_Z_MM / source_extent
    return {
        "series": {
            **built,
            "how": f"COVID-CT-MD P001 ({built['source_slices']} slices, 512 x 512, 4 mm) in HU, "
            f"linearly interpolated along z to {slices} slices over its own extent, declared "
            f"{SPACING_Z_MM:g} mm apart (anatomy scaled by {stretch:.3f} along z)",
        },
        "one_thread": one,
        "node": node,
        "note": "seconds = lungs.segment + opacity.quantify on a volume already in memory (the "
        "read is not included), median of the runs; steps_s from timers wrapped around the "
        "module functions (replace_padding, _lung_air, _split, _with_dense_opacities, quantify "
        "and, inside quantify, opacity_mask and peripheral_band); peak_rss_mb is the process's "
        "(Python, numpy/scipy/cv2, the volume), peak_above_loaded_volume_mb what the analysis "
        "adds at its peak over the process holding the volume",
        "targets": {
            "seconds_300_slices_node": target(node["seconds"], TARGET_S, at_least=False),
            "seconds_300_slices_one_thread": target(one["seconds"], TARGET_S, at_least=False),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", choices=["1", "node"], default="node")
    parser.add_argument("--volume", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--orientation", type=float, nargs=6)
    parser.add_argument("--spacing", type=float, nargs=3)
    args = parser.parse_args()
    emit(child_time(args) if args.child else run(args.quick))


if __name__ == "__main__":
    main()
