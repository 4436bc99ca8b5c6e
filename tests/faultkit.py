"""Helpers for the fault, bad-input and security tests: read the node's state from outside, send
with per-instance statuses, and stand between the node and the PACS.

The node under test is always a separate process (tests/nodeproc.py); these helpers only observe
it through its files, its DICOM port, and its peers.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node import outputs
from node.scu import close_socket
from tests.nodeproc import NodeProcess, node_config
from tests.peers import Orthanc, free_port, set_nodelay

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


# --------------------------------------------------------------------------------------------------
# The node's state, read from its files (read-only: the node process owns them)


def db_query(db: Path, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one read-only query on the node's SQLite file (WAL readers never block the node)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return list(con.execute(sql, tuple(args)).fetchall())
    finally:
        con.close()


def recorded_sops(db: Path) -> set[str]:
    return {r[0] for r in db_query(db, "SELECT sop_instance_uid FROM instances")}


def spooled_sops(spool: Path) -> set[str]:
    """SOP Instance UIDs with a complete file in the spool (SR results excluded)."""
    return {
        p.stem for p in spool.rglob("*.dcm") if ".results" not in p.parts and ".tmp" not in p.parts
    }


def leftovers(spool: Path) -> list[Path]:
    """Half-written files: temp files in .tmp or anywhere else."""
    return [p for p in spool.rglob("*") if p.is_file() and (p.suffix in (".part", ".tmp"))]


def jobs(db: Path) -> list[tuple[Any, ...]]:
    """(id, series_uid, version, state, stage, attempts, last_error) of every job."""
    return db_query(
        db,
        "SELECT j.id, s.series_instance_uid, j.series_version, j.state, j.stage, j.attempts, "
        "j.last_error FROM jobs j JOIN series s ON s.id = j.series_id ORDER BY j.id",
    )


def series_rows(db: Path) -> list[tuple[Any, ...]]:
    """(series_uid, state, instance_count, version, reject_reason) of every series."""
    return db_query(
        db,
        "SELECT series_instance_uid, state, instance_count, version, reject_reason FROM series",
    )


def sr_in_study(orthanc: Orthanc, study_uid: str) -> list[dict[str, Any]]:
    return [t for t in orthanc.instances_in_study(study_uid) if t.get("SOPClassUID") == SR_CLASS]


def results_in_study(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """The node's result objects in the PACS's study, by kind (``node.outputs.KINDS``)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for tags in orthanc.instances_in_study(study_uid):
        kind = outputs.kind_of_sop_class(str(tags.get("SOPClassUID", "")))
        if kind is not None:
            found.setdefault(kind, []).append(tags)
    return found


def built_results(spool: Path) -> dict[str, int]:
    """How many result objects of each kind the node wrote into its spool (all series)."""
    counts: dict[str, int] = {}
    for path in (spool / ".results").rglob("*.dcm"):
        kind = outputs.kind_of_sop_class(
            str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID)
        )
        assert kind is not None, path
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def assert_each_result_once(orthanc: Orthanc, study_uid: str, spool: Path) -> None:
    """One series version analysed: every object the node built for Orthanc (all but the Basic
    Text SR, which replaces an SR only where it is refused) is in the study exactly once, each
    in its own series, and the SR is among them."""
    expected = {kind: 1 for kind in built_results(spool) if kind != "text_sr"}
    assert built_results(spool).get("sr") == 1 and "summary" in expected, built_results(spool)
    found = results_in_study(orthanc, study_uid)
    assert {kind: len(tags) for kind, tags in found.items()} == expected
    series = [tags[0]["SeriesInstanceUID"] for tags in found.values()]
    assert len(set(series)) == len(series), "each object in its own series"


# --------------------------------------------------------------------------------------------------
# A node process with an Orthanc behind it


@dataclass
class Rig:
    """One node process (``node``) in ``workdir`` and, optionally, an Orthanc as its PACS."""

    workdir: Path
    node: NodeProcess
    orthanc: Orthanc | None

    @property
    def db(self) -> Path:
        return self.workdir / "node.sqlite3"

    @property
    def spool(self) -> Path:
        return self.workdir / "spool"

    @property
    def port(self) -> int:
        return self.node.port


def make_rig(
    tmp_path: Path,
    model_dir: Path,
    orthanc_factory: Callable[..., Orthanc] | None,
    *,
    pacs_port: int | None = None,
    quiet_s: float = 2.0,
    extra: dict[str, Any] | None = None,
) -> Rig:
    """Write the node's config (and start Orthanc if a factory is given); the node is not started.

    ``pacs_port`` overrides where the node sends its SRs (e.g. a proxy in front of Orthanc).
    """
    port = free_port()
    orthanc = None
    if orthanc_factory is not None:
        orthanc = orthanc_factory(modalities={"NODE": ("TRIAGE", "127.0.0.1", port)})
    target = pacs_port if pacs_port is not None else (orthanc.dicom_port if orthanc else None)
    workdir = tmp_path / "node"
    config = node_config(
        workdir, port=port, model_dir=model_dir, pacs_port=target, quiet_s=quiet_s, extra=extra
    )
    return Rig(workdir, NodeProcess(config, port), orthanc)


# --------------------------------------------------------------------------------------------------
# Sending with a status per instance


@dataclass
class SendLog:
    """What the sender heard: SOP Instance UID -> status (None: no answer, association gone)."""

    statuses: dict[str, int | None] = field(default_factory=dict)
    established: bool = False

    @property
    def succeeded(self) -> set[str]:
        return {uid for uid, st in self.statuses.items() if st == 0}

    @property
    def failed(self) -> set[str]:
        return {uid for uid, st in self.statuses.items() if st != 0}


def send_files(
    port: int,
    files: list[Path],
    *,
    aet: str = "STORESCU",
    delay_s: float = 0.0,
    log: SendLog | None = None,
    raw: bool = False,
    contexts: Iterable[tuple[str, str]] | None = None,
    bind_address: tuple[str, int] | None = None,
    tls_args: Any = None,
    timeout_s: float = 30,
) -> SendLog:
    """C-STORE ``files`` one by one in one association, recording each instance's status.

    ``raw=True`` sends each file's bytes as they are (pynetdicom's chunked mode), so broken
    datasets reach the node unchanged; ``contexts`` are (SOP class, transfer syntax) to propose.
    """
    log = log if log is not None else SendLog()
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    if contexts is None:
        wanted = set()
        for f in files:
            meta = pydicom.filereader.read_file_meta_info(f)
            wanted.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        contexts = wanted or {(CTImageStorage, "1.2.840.10008.1.2.1")}
    for sop_class, ts in sorted(set(contexts)):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="TRIAGE", bind_address=bind_address, tls_args=tls_args
    )
    if not assoc.is_established:
        close_socket(assoc)
        return log
    log.established = True
    set_nodelay(assoc)
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = raw
    try:
        for f in files:
            uid = str(pydicom.filereader.read_file_meta_info(f).MediaStorageSOPInstanceUID)
            if not assoc.is_established:
                log.statuses[uid] = None
                continue
            try:
                rsp = assoc.send_c_store(f if raw else pydicom.dcmread(f))
            except (RuntimeError, ValueError, AttributeError) as exc:
                # pynetdicom raises when the association died between the check and the send
                log.statuses[uid] = None
                del exc
                continue
            log.statuses[uid] = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            if delay_s:
                time.sleep(delay_s)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc.is_established:
            assoc.release()
    return log


@contextlib.contextmanager
def sending_in_background(port: int, files: list[Path], **kwargs: Any) -> Iterator[SendLog]:
    """Send in a thread while the body runs (e.g. kills the node); joins at exit."""
    log = SendLog()
    thread = threading.Thread(
        target=send_files, args=(port, files), kwargs={**kwargs, "log": log}, daemon=True
    )
    thread.start()
    try:
        yield log
    finally:
        thread.join(120)
        assert not thread.is_alive(), "sender thread did not finish"


# --------------------------------------------------------------------------------------------------
# A TCP proxy between the node and the PACS that can swallow the PACS's answers


class HoldingProxy:
    """Forwards DICOM PDUs both ways; while ``hold_answers`` is set, the PACS's P-DATA PDUs (its
    C-STORE responses) are not passed on: the PACS has stored the SR, the node never hears so.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.hold_answers = threading.Event()
        self.held = threading.Event()  # set once an answer was swallowed
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    @staticmethod
    def _read_exact(sock: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def _pump(self, src: socket.socket, dst: socket.socket, from_pacs: bool) -> None:
        try:
            while True:
                header = self._read_exact(src, 6)
                body = self._read_exact(src, int.from_bytes(header[2:6], "big"))
                if from_pacs and header[0] == 0x04 and self.hold_answers.is_set():
                    self.held.set()
                    continue
                dst.sendall(header + body)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


def node_pid_alive(node: NodeProcess) -> bool:
    return node.proc is not None and node.proc.poll() is None


def assert_no_tracebacks_of_crash(node: NodeProcess) -> None:
    """The node's log shows no uncaught exception that ended a thread or the process."""
    text = node.log_text()
    assert "Exception in thread" not in text, text[-4000:]
    assert "Traceback" not in text or "Error running job" not in text, text[-4000:]
