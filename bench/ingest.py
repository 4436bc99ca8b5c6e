"""Benchmark 1, ingest: one association of 300 real 512x512 CT slices from DCMTK ``storescu``.

Targets, each run in turn with the same files (a fresh re-identified series per run, so no
receiver sees duplicates): DCMTK ``storescp`` writing to disk (the baseline), Orthanc 1.10 (the
PACS users know: SQLite index, ``SyncStorageArea`` fsync of every file), a bare pynetdicom SCP
that writes the received bytes (no checks, no fsync, no database: pynetdicom's own ceiling), and
the node (``python -m node serve``: check, durable spool write, SQLite row committed with
``synchronous=FULL``, all before Success).  Node and Orthanc go back to back in every run, in
alternating order, so their ratio is paired.  ``TCP_NODELAY=1`` in the environment of the DCMTK
tools and of Orthanc; the node and the bare SCP set it on accepted sockets.

Rates are from the wall time of ``storescu`` (start to release); the CPU time each receiving
process used (all threads) is steadier on a shared machine.  A per-instance cost breakdown of
the node's handler steps (no network) says what limits it.

``python -m bench.ingest [--quick]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
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
#: A receiver under test: (DICOM port, AE title, pid of the receiving process)
Target = tuple[int, str, int]


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
def storescp(out_dir: Path) -> Iterator[Target]:
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
        yield port, "STORESCP", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def bare_scp(out_dir: Path) -> Iterator[Target]:
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
        yield port, "BARE", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def serve_bare(port: int, out_dir: Path) -> None:
    """Run the bare SCP until terminated (``--bare-scp``)."""
    from pynetdicom import AE, evt
    from pynetdicom.events import Event

    from node.receive import (
        STORAGE_SOP_CLASSES,
        TRANSFER_SYNTAXES,
        handle_connection,
        skip_unlogged_pynetdicom_handlers,
    )

    def handle_store(event: Event) -> int:
        data = event.encoded_dataset(include_meta=True)
        (out_dir / f"{getattr(event.request, 'AffectedSOPInstanceUID', 'x')}.dcm").write_bytes(data)
        return 0

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # as the node runs it
    skip_unlogged_pynetdicom_handlers()
    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.start_server(
        ("127.0.0.1", port),
        block=True,
        evt_handlers=[(evt.EVT_C_STORE, handle_store), (evt.EVT_CONN_OPEN, handle_connection)],
    )


@contextlib.contextmanager
def orthanc(workdir: Path) -> Iterator[Target]:
    """Orthanc 1.10 as users run it: SQLite index, files fsynced (``SyncStorageArea``).

    Started with ``TCP_NODELAY=1`` in its environment (Orthanc is built on DCMTK: PEERS.md's
    Nagle trap), storage in its own folder under /tmp (same file system as the node's spool).
    """
    import json

    from tests.peers import Orthanc, _orthanc_user

    root = Path(tempfile.mkdtemp(prefix="orthanc-bench-", dir="/tmp"))
    os.chmod(root, 0o700)
    server = Orthanc(
        root,
        aet="ORTHANC",
        modalities={"storescu": ("STORESCU", "127.0.0.1", 104)},
        forward_to=None,
        stable_age=3600,  # nothing "stable" happens during the run
    )
    config = json.loads(server.config_path.read_text())
    config["SyncStorageArea"] = True  # the 1.10 default, stated: fsync after each file write
    server.config_path.write_text(json.dumps(config, indent=2))
    owner = _orthanc_user()
    if owner is not None:
        os.chown(server.config_path, *owner)
    previous = os.environ.get("TCP_NODELAY")
    os.environ["TCP_NODELAY"] = "1"  # Orthanc inherits this process's environment
    try:
        server.start()
    except BaseException:
        server.cleanup()
        raise
    finally:
        if previous is None:
            del os.environ["TCP_NODELAY"]
        else:
            os.environ["TCP_NODELAY"] = previous
    try:
        assert server.proc is not None  # setpriv execs Orthanc: this pid is Orthanc's
        yield server.dicom_port, server.aet, server.proc.pid
    finally:
        server.cleanup()


# Diagnostic only: the node with os.fsync a no-op, to show what the durable spool write costs.
_NO_FSYNC = (
    "import os, runpy; os.fsync = lambda fd: None; "
    "runpy.run_module('node', run_name='__main__', alter_sys=True)"
)


@contextlib.contextmanager
def node(workdir: Path, fsync: bool = True) -> Iterator[Target]:
    """The node as its own process, with a long quiet time so nothing is analysed meanwhile."""
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
        assert proc.proc is not None
        yield port, NODE_AE, proc.proc.pid
    finally:
        proc.stop()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send(folder: Path, target: Target) -> tuple[float, float]:
    """(seconds ``storescu`` takes to send ``folder`` in one association, CPU seconds the
    receiving process used meanwhile)."""
    from tests.peers import storescu

    port, aec, pid = target
    before = cpu_seconds(pid)
    seconds = time_call(lambda: storescu(folder, port=port, aec=aec, timeout=600))
    return seconds, cpu_seconds(pid) - before


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


TARGETS = ("storescp", "bare_pynetdicom", "node", "orthanc", "node_without_fsync_diagnostic")


def _order(r: int) -> list[str]:
    """The targets of run ``r``: node and Orthanc back to back, which goes first alternating."""
    pair = ["node", "orthanc"] if r % 2 == 0 else ["orthanc", "node"]
    return ["storescp", *pair, "bare_pynetdicom", "node_without_fsync_diagnostic"]


def _paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over runs of rate(a) / rate(b), each pair measured in the same run."""
    return median([tb / ta for ta, tb in zip(times[a], times[b], strict=True)])


def run(quick: bool) -> dict[str, Any]:
    count = 30 if quick else 300
    runs = 1 if quick else 5
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        times: dict[str, list[float]] = {name: [] for name in TARGETS}
        cpu: dict[str, list[float]] = {name: [] for name in TARGETS}
        with (
            storescp(root / "storescp-out") as dcmtk,
            bare_scp(root / "bare-out") as bare,
            node(root / "node") as ours,
            orthanc(root / "orthanc") as pacs,
            node(root / "node-nofsync", fsync=False) as ours_nofsync,
        ):
            peers = {
                "storescp": dcmtk,
                "bare_pynetdicom": bare,
                "node": ours,
                "orthanc": pacs,
                "node_without_fsync_diagnostic": ours_nofsync,
            }
            size = 0
            for r in range(runs):
                folder = root / f"series{r}"
                paths = build_series(folder, count, seed=f"bench-ingest-{r}-{time.time()}")
                size = series_bytes(paths)
                for name in _order(r):
                    seconds, cpu_s = send(folder, peers[name])
                    times[name].append(seconds)
                    cpu[name].append(cpu_s)
                for out in (root / "storescp-out", root / "bare-out"):
                    shutil.rmtree(out)
                    out.mkdir()
                if r < runs - 1:
                    shutil.rmtree(folder)
            breakdown = handler_breakdown(paths, root / "breakdown")
    result: dict[str, Any] = {"instances": count, "runs": runs, "mb": rounded(size / 1e6)}
    for name, values in times.items():
        result[name] = {
            "instances_per_s": rounded(count / median(values)),
            "mb_per_s": rounded(size / 1e6 / median(values)),
            "seconds": [round(v, 3) for v in values],
            # CPU the receiving process used per instance: steadier than wall time on a shared
            # machine, and what the receiver takes from the analysis running beside it
            "cpu_ms_per_instance": rounded(median(cpu[name]) / count * 1e3),
            "cpu_ms_per_instance_runs": [rounded(v / count * 1e3) for v in cpu[name]],
        }
    # Ratios of rates paired within each run (the machine is shared: runs differ more than
    # targets within one run), then the median over the runs.
    for name in ("orthanc", "bare_pynetdicom", "node_without_fsync_diagnostic"):
        result[f"ratio_{name}_to_storescp"] = rounded(_paired(times, name, "storescp"))
    result["ratio_node_to_storescp_paired_median"] = rounded(_paired(times, "node", "storescp"))
    # pynetdicom alone (no checks, no fsync, no database) against Orthanc: the node's ceiling
    result["ratio_bare_pynetdicom_to_orthanc"] = rounded(
        _paired(times, "bare_pynetdicom", "orthanc")
    )
    per_run = [o / n for n, o in zip(times["node"], times["orthanc"], strict=True)]
    result["ratio_node_to_orthanc"] = rounded(median(per_run))
    result["ratio_node_to_orthanc_per_run"] = [rounded(v) for v in per_run]
    result["node_handler_ms_per_instance"] = breakdown
    result["targets"] = {
        "ratio_node_to_orthanc": target(median(per_run), 1.0, at_least=True),
        "ratio_node_to_storescp": target(_paired(times, "node", "storescp"), 0.6, at_least=True),
    }
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
