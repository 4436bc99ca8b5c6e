"""Benchmark, model: Keras predict throughput of the Lite0 slice classifier per input size.

Run ``python -m bench.backbone_speed``; prints one JSON object: slices per second at batch 16
(median of 3 timed runs after a warm-up) for each input size, on whatever CPU/GPU TF sees.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time

import numpy as np

from training.model import build_classifier

logger = logging.getLogger(__name__)

SIZES = (160, 192, 224, 256)
BATCH = 16
SLICES = 64  # per timed run: four batches
RUNS = 3


def measure_throughput(size: int) -> float:
    """Return the median slices/s of ``model.predict`` for ``build_classifier(2, size, None)``."""
    model = build_classifier(2, size, None)
    x = np.random.default_rng(0).random((SLICES, size, size, 1), dtype=np.float32)
    model.predict(x[:BATCH], batch_size=BATCH, verbose=0)  # warm-up: trace and compile
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        model.predict(x, batch_size=BATCH, verbose=0)
        times.append(time.perf_counter() - start)
    return SLICES / statistics.median(times)


def main() -> None:
    """Measure every size and print the results as JSON."""
    results = {str(size): round(measure_throughput(size), 1) for size in SIZES}
    print(
        json.dumps(
            {
                "model": "build_classifier(2, size, None)",
                "batch": BATCH,
                "slices_per_run": SLICES,
                "runs": RUNS,
                "cpu_count": os.cpu_count(),
                "slices_per_s": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
