"""Benchmark 3, inference: slices/s and peak RSS per runtime and batch size, agreement, B7 baseline.

The model under test is the shipped model when ``models/`` has one, else a stand-in of the same
architecture (see ``bench.common.model_under_test``; the JSON says which).  Inputs are real slices
of the benchmark series, preprocessed by ``node.preprocess``.  Every (runtime, batch) runs in its
own process through ``node.infer.LoadedModel.predict`` (the node's own call), so each peak RSS is
that of a node-like process: Python + TensorFlow + the Keras model (+ the LiteRT interpreter).  The
thesis's EfficientNetB7 at 512 px (random weights, ``keras.applications``) runs a few slices only.

``python -m bench.inference [--quick]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    TCMALLOC,
    build_series,
    emit,
    median,
    model_under_test,
    peak_rss_mb,
    rounded,
    run_child,
    target,
    time_call,
)

BATCHES = (1, 16, 32)


def prepare_inputs(path: Path, count: int, size: int) -> None:
    """Real slices of the benchmark series, as the node feeds them to the model."""
    from node import preprocess

    with tempfile.TemporaryDirectory(prefix="bench-inf-") as tmp:
        files = build_series(Path(tmp) / "series", count, seed="bench-inference")
        inputs = [preprocess.dicom_to_input(preprocess.read_dicom(p), size) for p in files]
    np.save(path, np.stack(inputs).astype(np.float32))


def child_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """One process: load the model with ``runtime``, time ``predict`` at ``batch``."""
    from node.infer import load_model

    x = np.load(args.inputs)
    model = load_model(Path(args.model), runtime=args.runtime, cache_dir=Path(args.cache))
    if model.runner is not None and args.invoke_batch:
        model.runner.invoke_batch = args.invoke_batch
    batch = args.batch
    model.predict(x[:batch])  # warm-up: tracing, allocation, XNNPACK packing

    def once() -> None:
        for i in range(0, len(x) - batch + 1, batch):
            model.predict(x[i : i + batch])

    slices = (len(x) // batch) * batch
    times = [time_call(once) for _ in range(args.runs)]
    return {
        "runtime": model.runtime,
        "batch": batch,
        "invoke_batch": model.runner.invoke_batch if model.runner is not None else batch,
        "threads": model.runner.threads if model.runner is not None else os.cpu_count(),
        "slices_per_run": slices,
        "slices_per_s": rounded(slices / median(times)),
        "peak_rss_mb": round(peak_rss_mb()),
        "tcmalloc": "tcmalloc" in os.environ.get("LD_PRELOAD", ""),
    }


def child_agreement(args: argparse.Namespace) -> dict[str, Any]:
    """Keras vs the LiteRT runtime on every real input (the shipped model.tflite when verified,
    else the conversion, which this also caches)."""
    from node.infer import load_model

    x = np.load(args.inputs)
    fast = load_model(Path(args.model), runtime="tflite", cache_dir=Path(args.cache))
    keras = load_model(Path(args.model), runtime="keras")
    keras_probs = np.concatenate([keras.predict(x[i : i + 16]) for i in range(0, len(x), 16)])
    fast_probs = np.concatenate([fast.predict(x[i : i + 16]) for i in range(0, len(x), 16)])
    return {
        "slices": len(x),
        "max_abs_prob_diff": float(np.abs(keras_probs - fast_probs).max()),
        "same_argmax": bool((keras_probs.argmax(1) == fast_probs.argmax(1)).all()),
        "litert_from": "shipped model.tflite" if fast.keras_model is None else "conversion at load",
    }


def overlapped(model: Any, refs: list[Any], batch: int) -> list[np.ndarray]:
    """``score_slices``'s work with the next batch preprocessed in a second thread meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    from node.infer import _prepare

    chunks = [refs[i : i + batch] for i in range(0, len(refs), batch)]
    outputs = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(_prepare, model.spec, chunk) for chunk in chunks[:1]]
        for k in range(len(chunks)):
            selected, inputs = pending.pop().result()
            if k + 1 < len(chunks):
                pending.append(pool.submit(_prepare, model.spec, chunks[k + 1]))
            if selected:
                outputs.append(model.predict(np.stack(inputs)))
    return outputs


def child_overlap(args: argparse.Namespace) -> dict[str, Any]:
    """``score_slices`` on a real series (the node: preprocess, then classify) vs the same work
    with preprocessing overlapped in a second thread, alternately in one process."""
    from node.infer import load_model, score_slices
    from node.series_check import order_and_check, read_headers

    model = load_model(Path(args.model), runtime="auto", cache_dir=Path(args.cache))
    with tempfile.TemporaryDirectory(prefix="bench-overlap-") as tmp:
        paths = build_series(Path(tmp) / "series", args.slices, seed="bench-overlap")
        refs = order_and_check(read_headers(paths), require_axial=True, max_gap_factor=1.6)

        score_slices(model, refs, 16)  # warm-up
        node, overlap = [], []
        for _ in range(max(args.runs, 5)):
            node.append(time_call(partial(score_slices, model, refs, 16)))
            overlap.append(time_call(partial(overlapped, model, refs, 16)))
    return {
        "runtime": model.runtime,
        "slices": args.slices,
        "node_sequential_s": rounded(median(node)),
        "overlapped_thread_s": rounded(median(overlap)),
    }


def child_b7(args: argparse.Namespace) -> dict[str, Any]:
    """The thesis's EfficientNetB7 at 512 px, random weights, batch 1."""
    import keras

    model = keras.applications.EfficientNetB7(weights=None, input_shape=(512, 512, 3), classes=3)
    x = np.random.default_rng(0).random((args.slices + 1, 512, 512, 3), dtype=np.float32) * 255
    model(x[:1], training=False)  # warm-up
    times = [time_call(partial(model, x[i : i + 1], training=False)) for i in range(1, len(x))]
    return {
        "model": "keras.applications.EfficientNetB7(weights=None) @ 512 px, batch 1",
        "slices": args.slices,
        "slices_per_s": rounded(1.0 / median(times)),
        "seconds_per_300_slice_series": round(300 * median(times)),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def run(quick: bool) -> dict[str, Any]:
    count = 32 if quick else 64
    runs = 1 if quick else 3
    batches = (1, 16) if quick else BATCHES
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        model_dir, description = model_under_test(work)
        from node.model_spec import load_spec

        size = load_spec(model_dir).input_size
        inputs = work / "inputs.npy"
        prepare_inputs(inputs, count, size)
        common = [
            "--model",
            str(model_dir),
            "--cache",
            str(work / "cache"),
            "--inputs",
            str(inputs),
        ]
        agreement = run_child("bench.inference", ["--child", "agreement", *common])
        configs: list[dict[str, Any]] = []
        for runtime in ("keras", "tflite"):
            for batch in batches:
                args = ["--child", "throughput", "--runtime", runtime, "--batch", str(batch)]
                args += ["--invoke-batch", str(batch), "--runs", str(runs)]
                configs.append(run_child("bench.inference", [*args, *common]))
        # what the node does: analysis.batch_size 16, the runtime's own invoke batch
        args = ["--child", "throughput", "--runtime", "tflite", "--batch", "16"]
        node_config = run_child("bench.inference", [*args, "--runs", str(runs), *common])
        node_config["node_default"] = True
        configs.append(node_config)
        if not quick and TCMALLOC.exists():
            args = ["--child", "throughput", "--runtime", "keras", "--batch", "16"]
            configs.append(
                run_child(
                    "bench.inference",
                    [*args, "--runs", str(runs), *common],
                    env={"LD_PRELOAD": str(TCMALLOC)},
                )
            )
        overlap = run_child(
            "bench.inference",
            [
                "--child",
                "overlap",
                "--slices",
                str(30 if quick else 300),
                "--runs",
                str(runs),
                *common,
            ],
        )
        b7 = None if quick else run_child("bench.inference", ["--child", "b7", "--slices", "2"])
    fast = [c for c in configs if c["runtime"] == "tflite"]
    best = max(fast or configs, key=lambda c: c["slices_per_s"])
    keras_best = max(
        (c for c in configs if c["runtime"] == "keras"), key=lambda c: c["slices_per_s"]
    )
    return {
        "model": description,
        "input_size": size,
        "threads": os.cpu_count(),
        "configs": configs,
        "agreement": agreement,
        "b7_baseline": b7,
        "score_slices_overlap": overlap,
        "speedup_fastest_vs_best_keras": rounded(best["slices_per_s"] / keras_best["slices_per_s"]),
        "node": {k: node_config[k] for k in ("runtime", "batch", "invoke_batch", "slices_per_s")},
        "targets": {
            "node_slices_per_s": target(node_config["slices_per_s"], 60, at_least=True),
            "max_abs_prob_diff": target(agreement["max_abs_prob_diff"], 1e-3, at_least=False),
            "node_peak_rss_gb": target(node_config["peak_rss_mb"] / 1024, 1.5, at_least=False),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--child", choices=("throughput", "agreement", "overlap", "b7"), help=argparse.SUPPRESS
    )
    parser.add_argument("--runtime", default="keras")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--invoke-batch", type=int, default=0, help="0: the runtime's default")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--model")
    parser.add_argument("--cache")
    parser.add_argument("--inputs")
    args = parser.parse_args()
    if args.child == "throughput":
        emit(child_throughput(args))
    elif args.child == "agreement":
        emit(child_agreement(args))
    elif args.child == "overlap":
        emit(child_overlap(args))
    elif args.child == "b7":
        emit(child_b7(args))
    else:
        emit(run(args.quick))


__all__ = ["json", "run"]

if __name__ == "__main__":
    main()
