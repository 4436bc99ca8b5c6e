"""Benchmark 2, preprocessing: the node's vectorised slice transform vs the thesis's per-pixel loop.

Both read the same real slices from disk.  The node path is what ``node.infer.score_slices`` does
per slice (read, Hounsfield units, lung fraction for slice selection, window, resize to the model
input); the thesis path is a faithful re-implementation of its per-pixel Python loop (rescale,
clip, window to an 8-bit image, then a Pillow bilinear resize), which lives only here.  Run on one
thread (``python -m bench`` starts this with one BLAS/OpenMP thread), so the rate is per core.

``python -m bench.preprocessing [--quick]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from bench.common import build_series, emit, median, rounded, target, time_call
from node import preprocess

SIZE = 224


def transform_slice(path: Path, size: int = SIZE) -> np.ndarray:
    """Read + HU rescale + window + resize: the work both paths do (``dicom_to_input``)."""
    return preprocess.dicom_to_input(preprocess.read_dicom(path), size, preprocess.LUNG_WINDOW)


def node_slice(path: Path, size: int = SIZE) -> np.ndarray:
    """The node's per-slice work (``score_slices``): the transform plus the lung fraction."""
    hu = preprocess.hounsfield(preprocess.read_dicom(path))
    preprocess.lung_fraction(hu)
    return preprocess.hu_to_input(hu, size, preprocess.LUNG_WINDOW)


def thesis_slice(path: Path, size: int = SIZE) -> np.ndarray:
    """The thesis's transform: a Python loop over every pixel, then an 8-bit bilinear resize."""
    from PIL import Image

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    slope = float(ds.RescaleSlope)
    intercept = float(ds.RescaleIntercept)
    window = preprocess.LUNG_WINDOW
    low, high, width = window.low, window.high, window.width
    rows, cols = pixels.shape
    image = np.zeros((rows, cols), dtype=np.uint8)
    for i in range(rows):
        for j in range(cols):
            hu = pixels[i][j] * slope + intercept
            if hu < -1024:
                hu = -1024
            if hu <= low:
                value = 0.0
            elif hu >= high:
                value = 255.0
            else:
                value = (hu - low) / width * 255.0
            image[i][j] = int(value + 0.5)
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / np.float32(255.0)


def _each(fn: Callable[..., np.ndarray], items: list[Any]) -> list[np.ndarray]:
    """``fn`` on every item, keeping the results as ``score_slices`` keeps its inputs."""
    return [fn(item, SIZE) for item in items]


def dense_resize(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """The node's resize before the Pillow change: two dense triangle-weight matrix products."""
    mats = []
    for n_in in image.shape:
        scale = n_in / size
        centres = (np.arange(size) + 0.5) * scale
        src = np.arange(n_in) + 0.5
        w = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centres[:, None]) / max(scale, 1.0))
        mats.append((w / w.sum(axis=1, keepdims=True)).astype(np.float32))
    return (mats[0] @ image @ mats[1].T).astype(np.float32, copy=False)


def resize_comparison(paths: list[Path], runs: int) -> dict[str, float]:
    """Milliseconds per slice for the resize alone: Pillow (now) vs dense matrices (before)."""
    images = [
        preprocess.apply_window(preprocess.hounsfield(preprocess.read_dicom(p))) for p in paths
    ]
    variants = {"pillow_ms": preprocess.resize, "dense_matrix_before_ms": dense_resize}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn(images[0], SIZE)
    for _ in range(max(runs, 5)):  # interleaved
        for name, fn in variants.items():
            times[name].append(time_call(partial(_each, fn, images)))
    return {name: rounded(median(t) / len(images) * 1e3) for name, t in times.items()}


def pixel_read_comparison(paths: list[Path], runs: int) -> dict[str, float]:
    """Milliseconds per slice to get the pixel array of a freshly read dataset:
    ``native_pixels`` (now) vs pydicom's ``pixel_array`` (before)."""

    def fresh_then(fn: Callable[[Any], Any]) -> float:
        datasets = [preprocess.read_dicom(p) for p in paths]
        return time_call(partial(_apply, fn, datasets))

    variants: dict[str, Callable[[Any], Any]] = {
        "frombuffer_ms": preprocess.native_pixels,
        "pydicom_pixel_array_before_ms": lambda ds: ds.pixel_array,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(max(runs, 5)):  # interleaved
        for name, fn in variants.items():
            times[name].append(fresh_then(fn))
    return {name: rounded(median(t) / len(paths) * 1e3) for name, t in times.items()}


def _apply(fn: Callable[[Any], Any], items: list[Any]) -> None:
    for item in items:
        fn(item)


def run(quick: bool) -> dict[str, Any]:
    slices = 30 if quick else 300
    loop_slices = 1 if quick else 3
    runs = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-pre-") as tmp:
        paths = build_series(Path(tmp) / "series", slices, seed="bench-preprocessing")
        # warm-up: page cache, lazy imports, the allocator's heap (a fresh heap page-faults
        # every new array: this first pass is reported apart)
        first_pass = time_call(partial(_each, node_slice, paths))
        vec_times, node_times, loop_times = [], [], []
        for r in range(runs):  # interleaved, so a noisy neighbour hits all three alike
            vec_times.append(time_call(partial(_each, transform_slice, paths)))
            node_times.append(time_call(partial(_each, node_slice, paths)))
            subset = paths[r * loop_slices : (r + 1) * loop_slices]
            loop_times.append(time_call(partial(_each, thesis_slice, subset)))
        resize_ms = resize_comparison(paths[:30], runs)
        pixel_ms = pixel_read_comparison(paths[:30], runs)
        agreement = max(float(np.abs(thesis_slice(p) - node_slice(p)).max()) for p in paths[:1])
    vec_rate = slices / median(vec_times)
    node_rate = slices / median(node_times)
    loop_rate = loop_slices / median(loop_times)
    return {
        "slices": slices,
        "runs": runs,
        "threads": 1,
        "vectorised_slices_per_s": rounded(vec_rate),
        "node_per_slice_with_lung_selection_slices_per_s": rounded(node_rate),
        "node_first_pass_fresh_heap_slices_per_s": rounded(slices / first_pass),
        "thesis_loop_slices": loop_slices,
        "thesis_loop_slices_per_s": rounded(loop_rate),
        "ratio_vectorised_to_loop": rounded(vec_rate / loop_rate),
        "max_abs_diff_loop_vs_node": rounded(agreement),
        "resize_ms_per_slice": resize_ms,
        "pixel_read_ms_per_slice": pixel_ms,
        "note": "vectorised = read + HU + window + resize (node.preprocess.dicom_to_input), the "
        "work the loop does; the node also computes each slice's lung fraction (reported apart); "
        "the loop quantises to 8 bit as the thesis did",
        "targets": {
            "slices_per_s_per_core": target(vec_rate, 300, at_least=True),
            "ratio_to_loop": target(vec_rate / loop_rate, 200, at_least=True),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    emit(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
