"""``python -m bench [NAME ...] [--quick] [--out PATH]``: run the benchmarks, print and save JSON.

Each benchmark runs in its own process (``python -m bench.<module>``), so imports, threads and
peak memory of one never colour another.  Without names all five run in issue order.  Results are
merged into ``bench/results.json`` (a full run) or ``bench/out/results-quick.json`` (``--quick``,
a smoke run whose figures mean nothing), one entry per benchmark with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, machine, run_child

BENCHMARKS: dict[str, tuple[str, dict[str, str]]] = {
    "ingest": ("bench.ingest", {}),
    # one BLAS/OpenMP thread: the preprocessing target is per core
    "preprocessing": ("bench.preprocessing", {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}),
    "inference": ("bench.inference", {}),
    "e2e": ("bench.e2e", {}),
    "scale": ("bench.scale", {}),
}
RESULTS = REPO / "bench" / "results.json"
QUICK_RESULTS = REPO / "bench" / "out" / "results-quick.json"


def run_benchmarks(names: list[str], quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in names:
        module, env = BENCHMARKS[name]
        started = time.monotonic()
        facts = machine()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            result = run_child(module, ["--quick"] if quick else [], env=env)
        except Exception as exc:  # report and go on with the other benchmarks
            result = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
        result["machine"] = facts
        result["wall_s"] = round(time.monotonic() - started, 1)
        results[name] = result
        print(f"bench: {name} done in {result['wall_s']} s", file=sys.stderr, flush=True)
    return results


def summarise(benchmarks: dict[str, Any]) -> dict[str, Any]:
    """Every target of every benchmark: ``{"ingest.ratio_node_to_storescp": {...}}``."""
    out = {}
    for name, result in benchmarks.items():
        for key, value in (result.get("targets") or {}).items():
            out[f"{name}.{key}"] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names",
        nargs="*",
        choices=[*BENCHMARKS, []],
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few slices, one run")
    parser.add_argument("--out", type=Path, help="results file to merge into")
    args = parser.parse_args(argv)
    names = args.names or list(BENCHMARKS)
    out_path: Path = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    benchmarks = run_benchmarks(names, args.quick)
    merged: dict[str, Any] = {}
    if out_path.exists():
        try:
            merged = json.loads(out_path.read_text()).get("benchmarks", {})
        except (OSError, ValueError):
            merged = {}
    merged.update(benchmarks)
    document = {
        "quick": args.quick,
        "benchmarks": merged,
        "targets": summarise(merged),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({"benchmarks": benchmarks, "targets": summarise(benchmarks)}, indent=2))
    print(f"bench: results merged into {out_path}", file=sys.stderr)
    return 1 if any("error" in r for r in benchmarks.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
