"""``python -m bench [NAME ...] [--quick] [--out PATH]``: run the benchmarks, print and save JSON.

Each benchmark runs in its own process (``python -m bench.<module>``), so imports, threads and
peak memory of one never colour another.  Without names all eight run in issue order.  Results are
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
    # runs its one-thread and node-default configurations in children of its own
    "lungs": ("bench.lungs", {}),
    # node start-up (import + model load), peak RSS and install size: LiteRT alone vs TensorFlow
    "startup": ("bench.startup", {}),
    # analyse_series on 300 slices, the CNN beside the lung analysis vs one after the other
    "analysis": ("bench.analysis", {}),
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


def _get(result: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def table(document: dict[str, Any]) -> str:
    """The headline figures of a results file as a Markdown table (for the README)."""
    b = document.get("benchmarks", {})
    rows: list[tuple[str, Any, str]] = []

    def add(label: str, value: Any, goal: str = "") -> None:
        rows.append((label, "-" if value is None else value, goal))

    ing = b.get("ingest", {})
    add(
        "ingest: storescp instances/s (MB/s)",
        f"{_get(ing, 'storescp', 'instances_per_s')} ({_get(ing, 'storescp', 'mb_per_s')})",
    )
    add("ingest: bare pynetdicom instances/s", _get(ing, "bare_pynetdicom", "instances_per_s"))
    add(
        "ingest: node instances/s (MB/s)",
        f"{_get(ing, 'node', 'instances_per_s')} ({_get(ing, 'node', 'mb_per_s')})",
    )
    add("ingest: Orthanc instances/s (same run)", _get(ing, "orthanc", "instances_per_s"))
    add(
        "ingest: ratio node / storescp", _get(ing, "ratio_node_to_storescp_paired_median"), ">= 0.6"
    )
    add("ingest: ratio node / Orthanc", _get(ing, "ratio_node_to_orthanc"), ">= 1")
    pre = b.get("preprocessing", {})
    add("preprocessing: slices/s, 1 core", _get(pre, "vectorised_slices_per_s"), ">= 300")
    add("preprocessing: thesis loop slices/s", _get(pre, "thesis_loop_slices_per_s"))
    add("preprocessing: ratio to loop", _get(pre, "ratio_vectorised_to_loop"), ">= 200")
    inf = b.get("inference", {})
    for c in _get(inf, "configs") or []:
        name = f"{c['runtime']}{' +tcmalloc' if c.get('tcmalloc') else ''} batch {c['batch']}"
        if c.get("node_default"):
            name = f"{c['runtime']} as the node runs it (batch {c['batch']}, "
            name += f"invoke {c['invoke_batch']})"
        add(
            f"inference: {name}: slices/s, peak RSS MB",
            f"{c['slices_per_s']}, {c['peak_rss_mb']}",
            ">= 60, <= 1536" if c.get("node_default") else "",
        )
    diff = _get(inf, "agreement", "max_abs_prob_diff")
    add("inference: max abs probability diff LiteRT vs Keras", diff and f"{diff:.1e}", "<= 1e-3")
    add(
        "inference: EfficientNetB7 @512 slices/s, peak RSS MB",
        f"{_get(inf, 'b7_baseline', 'slices_per_s')}, {_get(inf, 'b7_baseline', 'peak_rss_mb')}",
    )
    e2e = b.get("e2e", {})
    add("e2e: last instance -> SR acknowledged, s", _get(e2e, "median", "total_s"))
    add("e2e: of which quiet timer, s", _get(e2e, "median", "quiet_timer_s"))
    add("e2e: after the quiet timer, s", _get(e2e, "median", "after_quiet_s"), "<= 10")
    sc = b.get("scale", {})
    for p in _get(sc, "points") or []:
        add(
            f"scale: {p['instance_rows']} rows: ingest/s, status ms",
            f"{p['ingest_instances_per_s']}, {p['status_ms']}",
        )
    add(
        "scale: ingest / status at largest vs empty",
        f"{_get(sc, 'ingest_ratio_largest_to_empty')}, {_get(sc, 'status_ratio_largest_to_empty')}",
        ">= 0.8, <= 1.2",
    )
    lu = b.get("lungs", {})
    for key, label in (("node", "as the node runs it"), ("one_thread", "1 thread")):
        add(
            f"lungs: 300 slices, segment + quantify, {label}: s (segment share), peak RSS MB",
            f"{_get(lu, key, 'seconds')} ({_get(lu, key, 'segment_share')}), "
            f"{_get(lu, key, 'peak_rss_mb')}",
            "<= 1.5 s",
        )
    st = b.get("startup", {})
    add(
        "startup: import + model load s, before (TensorFlow) -> after (LiteRT alone)",
        f"{_get(st, 'startup_s', 'before')} -> {_get(st, 'startup_s', 'after')}",
    )
    add(
        "startup: peak RSS MB, before -> after",
        f"{_get(st, 'peak_rss_mb', 'before')} -> {_get(st, 'peak_rss_mb', 'after')}",
    )
    add(
        "startup: install MB with -> without TensorFlow",
        f"{_get(st, 'install', 'with_tensorflow_mb')} -> "
        f"{_get(st, 'install', 'without_tensorflow_mb')}",
    )
    lines = ["| figure | value | target |", "| --- | --- | --- |"]
    lines += [f"| {label} | {value} | {goal} |" for label, value, goal in rows]
    return "\n".join(lines)


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
    parser.add_argument(
        "--table",
        action="store_true",
        help="print the results file as a Markdown table, run nothing",
    )
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads((args.out or RESULTS).read_text())))
        return 0
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
