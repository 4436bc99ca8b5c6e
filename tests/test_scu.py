"""node/scu.py, the one way the node opens associations (delivery, pull, echo): what each caller
says when the peer is not there, rejects us or drops the association, and that no socket is left
open afterwards (pynetdicom 3.0.4 leaves the socket of a failed association open)."""

from __future__ import annotations

import argparse
import gc
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from node.cli import cmd_echo
from node.config import Peer, Settings
from node.errors import NodeError, SendFailed
from node.pull import PullFailed, find_studies
from node.scu import associate
from node.send import store_files
from tests.nodeproc import node_config
from tests.peers import free_port, wait_for
from tests.test_jobs import write_sr

LO = "127.0.0.1"


def socket_fds() -> int:
    """Sockets this process holds open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            continue  # closed while listing (the listing's own descriptor)
    return count


@pytest.fixture
def no_gc() -> Iterator[None]:
    """The garbage collector closes leaked sockets at random moments: not during the count."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def rejecting_peer() -> Iterator[int]:
    """A pynetdicom SCP (AE PACS) that rejects every caller but AE title SOMEONE."""
    ae = AE(ae_title="PACS")
    for sop_class in (
        Verification,
        Comprehensive3DSRStorage,
        StudyRootQueryRetrieveInformationModelFind,
    ):
        ae.add_supported_context(sop_class)
    ae.require_calling_aet = ["SOMEONE"]
    port = free_port()
    server = ae.start_server((LO, port), block=False)
    assert server is not None
    yield port
    server.shutdown()


@pytest.fixture
def echo_peer() -> Iterator[int]:
    """A pynetdicom Verification SCP (AE PACS) that answers C-ECHO."""
    ae = AE(ae_title="PACS")
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    port = free_port()
    server = ae.start_server((LO, port), block=False, evt_handlers=[(evt.EVT_C_ECHO, echo_ok)])
    assert server is not None
    yield port
    server.shutdown()


def echo_ok(event: evt.Event) -> int:
    return 0x0000


def peer_at(port: int, ae_title: str = "PACS") -> Peer:
    return Peer.model_validate({"name": "pacs", "ae_title": ae_title, "host": LO, "port": port})


def settings_for(tmp_path: Path, port: int) -> Settings:
    peer = {"name": "pacs", "ae_title": "PACS", "host": LO, "port": port}
    raw = {
        "node": {"ae_title": "TRIAGE", "network_timeout_s": 5},
        "peers": [peer],
        "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.sqlite3"},
    }
    return Settings.model_validate(raw).resolve(tmp_path)


def send(tmp_path: Path, port: int) -> str:
    with pytest.raises(SendFailed) as caught:
        store_files([write_sr(tmp_path)], peer_at(port), "TRIAGE", timeout_s=5)
    return str(caught.value)


def pull(tmp_path: Path, port: int) -> str:
    with pytest.raises(PullFailed) as caught:
        find_studies(settings_for(tmp_path, port), peer_at(port))
    return str(caught.value)


def echo(tmp_path: Path, port: int, capsys: pytest.CaptureFixture[str]) -> str:
    """``triage-node echo pacs`` in this process; what it printed after the peer's name."""
    config = node_config(tmp_path / "echo", port=free_port(), model_dir=tmp_path, pacs_port=port)
    text = config.read_text().replace("ae_title: ORTHANC", "ae_title: PACS")
    config.write_text(text)
    code = cmd_echo(argparse.Namespace(config=str(config), peer="pacs"))
    out = capsys.readouterr().out.strip()
    prefix = f"echo pacs (PACS@{LO}:{port}): "
    assert out.startswith(prefix), out
    assert code == (0 if out.endswith("status 0x0000") else 1), out
    return out.removeprefix(prefix)


CALLERS = ("echo", "pull", "send")


def call(caller: str, tmp_path: Path, port: int, capsys: pytest.CaptureFixture[str]) -> str:
    """What ``caller`` reports when the association with the peer at ``port`` fails."""
    if caller == "echo":
        return echo(tmp_path, port, capsys)
    return (pull if caller == "pull" else send)(tmp_path, port)


def assert_sockets_back_to(baseline: int) -> None:
    wait_for(lambda: socket_fds() <= baseline, 5, interval=0.05, what="sockets closed")


def why(problem: str, port: int) -> str:
    """What every caller says for each way an association fails to open."""
    return {
        "refused": f"cannot connect to pacs ({LO}:{port}): Connection refused",
        "rejected": f"association rejected by pacs (PACS@{LO}:{port}): "
        "does it know our AE title and host?",
        "dropped": f"association with pacs (PACS@{LO}:{port}) aborted: it accepts connections "
        "but dropped the association (called AE title, TLS?)",
    }[problem]


@pytest.mark.parametrize("problem", ["refused", "rejected", "dropped"])
@pytest.mark.parametrize("caller", CALLERS)
def test_a_failed_association_says_why_and_leaves_no_socket_open(
    caller: str,
    problem: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_gc: None,
) -> None:
    """Nothing listening, the peer rejects us, or it drops the association (before the fix, pull
    left the socket open after the last two)."""
    peers = {"rejected": "rejecting_peer", "dropped": "dropping_listener"}
    port = int(request.getfixturevalue(peers[problem])) if problem in peers else free_port()
    baseline = socket_fds()
    assert call(caller, tmp_path, port, capsys) == why(problem, port)
    assert_sockets_back_to(baseline)


def test_echo_answered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], echo_peer: int, no_gc: None
) -> None:
    baseline = socket_fds()
    assert echo(tmp_path, echo_peer, capsys) == "status 0x0000"
    assert_sockets_back_to(baseline)


def test_an_association_in_use_is_released_with_nodelay_and_the_error_is_the_callers(
    echo_peer: int, no_gc: None
) -> None:
    baseline = socket_fds()
    peer = peer_at(echo_peer)
    contexts = [build_context(Verification)]
    with associate(peer, contexts, calling_ae="TRIAGE", timeout_s=5) as assoc:
        raw = getattr(assoc.dul.socket, "socket", None)
        assert raw is not None and raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert assoc.send_c_echo().Status == 0
    assert assoc.is_released
    assert_sockets_back_to(baseline)

    class Mine(NodeError):
        pass

    with (
        pytest.raises(Mine, match="rejected"),
        associate(
            peer_at(echo_peer, ae_title="NOT_PACS"),
            contexts,
            calling_ae="TRIAGE",
            timeout_s=5,
            error=Mine,
        ),
    ):
        pass
