"""Benchmark, analysis: where ``node.pipeline.analyse_series`` spends its time on 300 slices.

One process, the shipped model (LiteRT), the 300-slice benchmark series (``bench.common``):

- ``stages_s``: each step alone, one after the other (headers, series check, reading the HU
  volume, lung segmentation, opacity quantification, CNN scoring with the node's interpreter);
- ``measure_s``: the two measurements of a read series (segmentation + quantification, and the
  CNN) run one after the other with an interpreter on all cores (the node before), one after the
  other with a 1-thread one, and at once (the node now: ``node.pipeline._measure``) with an
  interpreter on all cores and with a 1-thread one; each variant's numbers are checked equal to
  the first's;
- ``analyse_series_s``: the whole ``analyse_series`` as the node runs it.

Medians of ``--runs`` alternating runs.  Other processes on the machine change these figures:
``load_avg_1m`` says how busy it was.

``python -m bench.analysis [--quick]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import build_series, emit, median, model_under_test, rounded, time_call

SLICES = 300


def run(quick: bool, runs: int) -> dict[str, Any]:
    from node import lungs, opacity, pipeline
    from node.config import Settings
    from node.infer import load_model, score_slices
    from node.runtime import TFLiteRunner
    from node.series_check import order_and_check, read_headers

    runs = 1 if quick else runs
    count = 60 if quick else SLICES
    settings = Settings.model_validate({"results": {"send_to": None}})
    batch = settings.analysis.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-analysis-") as tmp:
        work = Path(tmp)
        model_dir, description = model_under_test(work)
        node_model = load_model(model_dir, runtime="auto", cache_dir=work / "cache")
        if node_model.runner is None:
            raise RuntimeError("the LiteRT runtime is not in use: nothing to compare")
        flatbuffer = _flatbuffer(model_dir, work / "cache")
        cores = os.cpu_count() or 1
        models = {
            n: dataclasses.replace(node_model, runner=TFLiteRunner(flatbuffer, n))
            for n in {1, cores}
        }
        paths = build_series(work / "series", count, seed="bench-analysis")

        headers = read_headers(paths)
        slices = order_and_check(headers, require_axial=True, max_gap_factor=1.6)
        volume, geometry, padding = lungs.read_volume(slices)

        def hounsfield() -> Any:
            masks = lungs.segment(volume, geometry, padding_hu=padding)
            return opacity.quantify(masks)

        def sequential(threads: int) -> Callable[[], Any]:
            def call() -> Any:
                q = hounsfield()
                return q, score_slices(models[threads], slices, batch, volume=volume)[0]

            return call

        def concurrent(threads: int) -> Callable[[], Any]:
            def call() -> Any:
                _, q, scores = pipeline._measure(
                    volume, geometry, padding, slices, models[threads], settings
                )
                return q, scores

            return call

        variants = {
            f"sequential_{cores}_threads (before)": sequential(cores),
            "sequential_1_thread": sequential(1),
            f"concurrent_{cores}_threads (node)": concurrent(cores),
            "concurrent_1_thread": concurrent(1),
        }
        reference = None
        for name, fn in variants.items():  # warm-up, and the numbers must not depend on it
            result = fn()
            reference = reference or result
            if result != reference:
                raise AssertionError(f"{name}: different quantification or scores")
        measure: dict[str, list[float]] = {name: [] for name in variants}
        stages: dict[str, list[float]] = {}
        whole: list[float] = []
        steps: dict[str, Callable[[], object]] = {
            "read_headers": lambda: read_headers(paths),
            "order_and_check": lambda: order_and_check(
                headers, require_axial=True, max_gap_factor=1.6
            ),
            "read_volume": lambda: lungs.read_volume(slices),
            "segment_and_quantify": hounsfield,
            "cnn_node_interpreter": lambda: score_slices(node_model, slices, batch, volume=volume),
        }
        for _ in range(runs):
            for name, fn in variants.items():
                measure[name].append(time_call(fn))
            for name, step in steps.items():
                stages.setdefault(name, []).append(time_call(step))
            whole.append(time_call(lambda: pipeline.analyse_series(paths, node_model, settings)))
    return {
        "model": description,
        "slices": count,
        "runs": runs,
        "cpus": os.cpu_count(),
        "node_interpreter_threads": node_model.runner.threads,
        "stages_s": {k: rounded(median(v)) for k, v in stages.items()},
        "measure_s": {k: rounded(median(v)) for k, v in measure.items()},
        "same_numbers_in_every_variant": True,
        "analyse_series_s": rounded(median(whole)),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _flatbuffer(model_dir: Path, cache: Path) -> bytes:
    """The flatbuffer the node runs: the shipped model.tflite, else the cached conversion."""
    shipped = model_dir / "model.tflite"
    if shipped.is_file():
        return shipped.read_bytes()
    return next(cache.glob("*.tflite")).read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    emit(run(args.quick, args.runs))


if __name__ == "__main__":
    main()
