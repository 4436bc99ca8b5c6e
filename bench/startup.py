"""Benchmark, start-up: the node's runtime with and without TensorFlow (issue 14, point 4).

Each configuration runs in fresh processes (median of ``--runs``), timing what a node does before
its first job: importing the node's modules (``node.service``, the entry point's imports), loading
the model (``node.infer.load_model`` with the config's runtime) and scoring one batch of real
slices; plus that process's peak RSS and whether TensorFlow/Keras got imported.

- ``litert``: the shipped model directory as it is (a verified ``model.tflite``): LiteRT alone.
- ``tensorflow_cached``: the same directory without ``model.tflite`` (what the node did before):
  TensorFlow loads ``model.keras`` and reuses the conversion cached under the spool by an earlier
  start (a warm-up process fills the cache first, not timed).
- ``tensorflow_first_start``: the same, with an empty cache: the conversion runs (once).
- ``keras``: ``runtime: keras``.

Install size: the installed files (per each distribution's RECORD) of the node's dependency
closure (``triage-node``'s requirements, recursively), with and without ``tensorflow-cpu`` (the
``tensorflow`` dependency group) and what only it pulls in: what a node-only install
(``scripts/setup.sh node``) saves by leaving TensorFlow out.

``python -m bench.startup [--quick]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import (
    build_series,
    emit,
    median,
    model_under_test,
    peak_rss_mb,
    rounded,
    run_child,
)

HEAVY = ("tensorflow", "keras")
TF_DIST = "tensorflow-cpu"


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One node-like start: imports, model load, first batch."""
    started = time.perf_counter()
    import node.service  # noqa: F401  (what ``triage-node run`` imports before loading)
    from node import preprocess
    from node.infer import load_model

    imported = time.perf_counter()
    model = load_model(Path(args.model), runtime=args.runtime, cache_dir=Path(args.cache))
    loaded = time.perf_counter()
    files = sorted(Path(args.series).glob("*.dcm"))
    batch = [model.spec.hu_to_input(preprocess.hounsfield(preprocess.read_dicom(p))) for p in files]
    import numpy as np

    model.predict(np.stack(batch))
    scored = time.perf_counter()
    return {
        "runtime": model.runtime,
        "import_s": imported - started,
        "load_s": loaded - imported,
        "first_batch_s": scored - loaded,
        "startup_s": loaded - started,
        "peak_rss_mb": peak_rss_mb(),
        "heavy_modules": sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY)),
    }


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: metadata.Distribution) -> list[str]:
    """Names of ``dist``'s unconditional requirements (markers evaluated, extras left out)."""
    from packaging.requirements import Requirement

    names = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        names.append(_canonical(req.name))
    return names


def _closure(roots: list[str], skip: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = [r for r in roots if r not in skip]
    while todo:
        name = todo.pop()
        if name in seen or name in skip:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        todo.extend(_requirements(dist))
    return seen


def _installed_bytes(name: str) -> int:
    dist = metadata.distribution(name)
    total = 0
    for f in dist.files or []:
        path = Path(str(dist.locate_file(f)))
        if path.is_file():
            total += path.stat().st_size
    return total


def install_size() -> dict[str, Any]:
    """MB of installed files of the node's dependency closure, with and without TensorFlow."""
    roots = [*_requirements(metadata.distribution("triage-node")), TF_DIST]
    full = _closure(roots, set())
    light = _closure(roots, {TF_DIST})
    sizes = {name: _installed_bytes(name) for name in full}
    only_tf = sorted(full - light, key=lambda n: -sizes[n])
    return {
        "with_tensorflow_mb": round(sum(sizes.values()) / 1e6),
        "without_tensorflow_mb": round(sum(sizes[n] for n in light) / 1e6),
        "distributions_with": len(full),
        "distributions_without": len(light),
        "largest_only_with_tensorflow_mb": {n: round(sizes[n] / 1e6) for n in only_tf[:6]},
        "how": "sum of each installed distribution's RECORD files, dependency closure of "
        "triage-node's requirements; 'without' drops tensorflow-cpu and what only it pulls in",
    }


def _start(model: Path, runtime: str, cache: Path, series: Path) -> dict[str, Any]:
    args = ["--child", "--model", str(model), "--runtime", runtime]
    return run_child("bench.startup", [*args, "--cache", str(cache), "--series", str(series)])


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runtime": runs[0]["runtime"], "heavy_modules": runs[0]["heavy_modules"]}
    for key in ("import_s", "load_s", "startup_s", "first_batch_s", "peak_rss_mb"):
        out[key] = rounded(median([r[key] for r in runs]))
    out["runs"] = len(runs)
    return out


def run(quick: bool, runs: int) -> dict[str, Any]:
    runs = 1 if quick else runs
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        shipped, description = model_under_test(work)
        series = work / "series"
        build_series(series, 4, seed="bench-startup")
        without = work / "without-tflite"
        without.mkdir()
        for name in ("model.keras", "model.json"):
            shutil.copy(shipped / name, without / name)
        cache = work / "cache"
        results: dict[str, Any] = {}
        results["litert"] = _summary(
            [_start(shipped, "auto", work / "unused", series) for _ in range(runs)]
        )
        first = _start(without, "auto", work / "first-start-cache", series)
        _start(without, "auto", cache, series)  # fills the conversion cache
        results["tensorflow_cached"] = _summary(
            [_start(without, "auto", cache, series) for _ in range(runs)]
        )
        results["tensorflow_first_start"] = _summary([first])
        results["keras"] = _summary(
            [_start(shipped, "keras", cache, series) for _ in range(1 if quick else 2)]
        )
    lite, before = results["litert"], results["tensorflow_cached"]
    return {
        "model": description,
        "configs": results,
        "install": install_size(),
        "startup_s": {"before": before["startup_s"], "after": lite["startup_s"]},
        "peak_rss_mb": {"before": before["peak_rss_mb"], "after": lite["peak_rss_mb"]},
        "litert_without_tensorflow": lite["heavy_modules"] == [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--cache")
    parser.add_argument("--series")
    args = parser.parse_args()
    if args.child:
        emit(child(args))
    else:
        emit(run(args.quick, args.runs))


if __name__ == "__main__":
    main()
