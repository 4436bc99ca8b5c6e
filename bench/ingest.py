"""Benchmark 1, ingest: one association of 300 real 512x512 CT slices from DCMTK ``storescu``.

Targets, each run in turn with the same files (a fresh re-identified series per run, so the node
never sees duplicates): DCMTK ``storescp`` writing to disk (the baseline), a bare pynetdicom SCP
that writes the received bytes (no checks, no fsync, no database: pynetdicom's own ceiling), and
the node (``python -m node serve``: parse + check, durable spool write with fsync, SQLite row).
``TCP_NODELAY=1`` for the DCMTK tools; the node and the bare SCP set it on accepted sockets.
Rates are from the wall time of ``storescu`` (start to release).  A per-instance cost breakdown of
the node's handler steps (no network) says what limits it.

``python -m bench.ingest [--quick]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    build_series,
    emit,
    median,
    rounded,
    run_child,
    series_bytes,
    target,
    time_call,
)

NODE_AE = "TRIAGE"


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@contextlib.contextmanager
def storescp(out_dir: Path) -> Iterator[tuple[int, str]]:
    """DCMTK storescp writing every instance to ``out_dir`` (default, not bit-preserving, mode)."""
    from tests.peers import dcmtk_env, free_port
    from tests.tools import require_tool

    port = free_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [require_tool("storescp"), "-aet", "STORESCP", "-od", str(out_dir), str(port)]
    proc = subprocess.Popen(
        cmd, env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_port(port, proc)
        yield port, "STORESCP"
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def bare_scp(out_dir: Path) -> Iterator[tuple[int, str]]:
    """A bare pynetdicom SCP in its own process: write the received bytes, answer Success."""
    import sys

    from bench.common import REPO
    from tests.peers import free_port

    port = free_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.ingest", "--bare-scp", str(port), str(out_dir)], cwd=REPO
    )
    try:
        _wait_port(port, proc)
        yield port, "BARE"
    finally:
        proc.terminate()
        proc.wait(10)


def serve_bare(port: int, out_dir: Path) -> None:
    """Run the bare SCP until terminated (``--bare-scp``)."""
    from pynetdicom import AE, evt
    from pynetdicom.events import Event

    from node.receive import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, handle_connection

    def handle_store(event: Event) -> int:
        data = event.encoded_dataset(include_meta=True)
        (out_dir / f"{getattr(event.request, 'AffectedSOPInstanceUID', 'x')}.dcm").write_bytes(data)
        return 0

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.start_server(
        ("127.0.0.1", port),
        block=True,
        evt_handlers=[(evt.EVT_C_STORE, handle_store), (evt.EVT_CONN_OPEN, handle_connection)],
    )


# Diagnostic only: the node with os.fsync a no-op, to show what the durable spool write costs.
_NO_FSYNC = (
    "import os, runpy; os.fsync = lambda fd: None; "
    "runpy.run_module('node', run_name='__main__', alter_sys=True)"
)


@contextlib.contextmanager
def node(workdir: Path, fsync: bool = True) -> Iterator[tuple[int, str]]:
    """The node as its own process, with a long quiet time so nothing is analysed meanwhile."""
    import os
    import sys

    from tests.models import make_tiny_model
    from tests.nodeproc import NodeProcess, node_config
    from tests.peers import free_port, wait_for

    model_dir = workdir / "tiny-model"
    model_dir.mkdir(parents=True, exist_ok=True)
    make_tiny_model(model_dir, ["non-COVID", "COVID-19"])
    port = free_port()
    config = node_config(workdir, port=port, model_dir=model_dir, pacs_port=None, quiet_s=3600)
    proc = NodeProcess(config, port)
    if fsync:
        proc.start()
    else:
        from bench.common import REPO

        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
        with open(proc.log, "ab") as log:
            proc.proc = subprocess.Popen(
                [sys.executable, "-c", _NO_FSYNC, "--config", str(config), "serve"],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_for(proc.echo, 120, interval=0.5, what="node (no fsync) to answer C-ECHO")
    try:
        yield port, NODE_AE
    finally:
        proc.stop()


def send(folder: Path, port: int, aec: str) -> float:
    """Seconds ``storescu`` takes to send ``folder`` in one association."""
    from tests.peers import storescu

    return time_call(lambda: storescu(folder, port=port, aec=aec, timeout=600))


def handler_breakdown(paths: list[Path], workdir: Path) -> dict[str, float]:
    """Milliseconds per instance of the node's C-STORE handler steps, without the network."""
    import pydicom

    from node.db import make_engine, make_sessionmaker
    from node.receive import parse_instance
    from node.spool import Spool
    from node.tracking import record_instance

    blobs = [p.read_bytes() for p in paths]
    headers: list[Any] = []
    uids = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    parse = time_call(
        lambda: headers.extend(
            parse_instance(b, c, s) for b, (c, s) in zip(blobs, uids, strict=True)
        )
    )
    spool = Spool(workdir / "spool")
    written: list[Path] = []
    write = time_call(
        lambda: written.extend(
            spool.write(h.study_instance_uid, h.series_instance_uid, h.sop_instance_uid, b)
            for h, b in zip(headers, blobs, strict=True)
        )
    )
    sessions = make_sessionmaker(make_engine(f"sqlite:///{workdir / 'breakdown.sqlite3'}"))
    record = time_call(
        lambda: [
            record_instance(sessions, h, str(p), len(b), "STORESCU", "127.0.0.1")
            for h, p, b in zip(headers, written, blobs, strict=True)
        ]
    )
    n = len(paths)
    return {
        "parse_instance_ms": rounded(parse / n * 1e3),
        "spool_write_fsync_ms": rounded(write / n * 1e3),
        "record_instance_sqlite_ms": rounded(record / n * 1e3),
    }


def run(quick: bool) -> dict[str, Any]:
    count = 30 if quick else 300
    runs = 1 if quick else 5
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        times: dict[str, list[float]] = {
            "storescp": [],
            "bare_pynetdicom": [],
            "node": [],
            "node_without_fsync_diagnostic": [],
        }
        with (
            storescp(root / "storescp-out") as dcmtk,
            bare_scp(root / "bare-out") as bare,
            node(root / "node") as ours,
            node(root / "node-nofsync", fsync=False) as ours_nofsync,
        ):
            size = 0
            for r in range(runs):
                folder = root / f"series{r}"
                paths = build_series(folder, count, seed=f"bench-ingest-{r}-{time.time()}")
                size = series_bytes(paths)
                for name, (port, aec) in (
                    ("storescp", dcmtk),
                    ("bare_pynetdicom", bare),
                    ("node", ours),
                    ("node_without_fsync_diagnostic", ours_nofsync),
                ):
                    times[name].append(send(folder, port, aec))
                for out in (root / "storescp-out", root / "bare-out"):
                    shutil.rmtree(out)
                    out.mkdir()
                if r < runs - 1:
                    shutil.rmtree(folder)
            breakdown = handler_breakdown(paths, root / "breakdown")
    result: dict[str, Any] = {"instances": count, "runs": runs, "mb": rounded(size / 1e6)}
    rates = {}
    for name, values in times.items():
        rates[name] = count / median(values)
        result[name] = {
            "instances_per_s": rounded(rates[name]),
            "mb_per_s": rounded(size / 1e6 / median(values)),
            "seconds": [round(v, 3) for v in values],
        }
    paired = [s / n for s, n in zip(times["storescp"], times["node"], strict=True)]
    result["ratio_node_to_storescp"] = rounded(rates["node"] / rates["storescp"])
    result["ratio_node_to_storescp_paired_median"] = rounded(median(paired))
    result["ratio_bare_pynetdicom_to_storescp"] = rounded(
        rates["bare_pynetdicom"] / rates["storescp"]
    )
    result["ratio_node_without_fsync_to_storescp"] = rounded(
        rates["node_without_fsync_diagnostic"] / rates["storescp"]
    )
    result["node_handler_ms_per_instance"] = breakdown
    result["targets"] = {"ratio_node_to_storescp": target(median(paired), 0.6, at_least=True)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bare-scp", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_scp:
        serve_bare(int(args.bare_scp[0]), Path(args.bare_scp[1]))
        return
    emit(run(args.quick))


__all__ = ["run", "run_child"]

if __name__ == "__main__":
    main()
