"""Network stage: the associations the node opens itself (delivery, pull, echo), opened one way.

``associate`` applies the timeouts, DICOM TLS from ``peers[].tls`` and TCP_NODELAY, says in the
operator's words why an association did not open, and closes the socket of every association it
opened, whether it opened, failed to open or was aborted while in use.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from pynetdicom import AE
from pynetdicom._globals import DEFAULT_MAX_LENGTH
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from node.config import Peer, PeerTLS
from node.errors import NodeError

logger = logging.getLogger(__name__)

CONNECT_PROBE_TIMEOUT_S = 5.0
"""At most this long for the plain TCP connect that explains a failed association."""


@contextmanager
def associate(
    peer: Peer,
    contexts: Sequence[PresentationContext],
    *,
    calling_ae: str,
    timeout_s: float,
    error: Callable[[str], NodeError] = NodeError,
    max_pdu: int = DEFAULT_MAX_LENGTH,
    ext_neg: list[Any] | None = None,
    evt_handlers: list[Any] | None = None,
) -> Iterator[Association]:
    """Open an association with ``peer``, yield it, release it and close its socket.

    Parameters
    ----------
    peer
        The configured peer: host, port, called AE title, and ``tls`` for DICOM TLS.
    contexts
        The presentation contexts to propose (``pynetdicom.build_context``).
    calling_ae
        Our AE title.
    timeout_s
        Connection, ACSE, DIMSE and network timeouts.
    error
        The exception raised when the association does not open (the caller's stage's:
        ``SendFailed``, ``PullFailed``).
    max_pdu
        The largest PDU we accept (0: no limit).
    ext_neg, evt_handlers
        Passed to ``AE.associate`` (C-GET: SCP role selection and the C-STORE handler).

    Raises
    ------
    NodeError
        Of type ``error``, when the association did not open: the message says whether nothing
        listens ("cannot connect to ..."), the peer rejected us ("association rejected ...") or it
        dropped the association ("... aborted: ... (called AE title, TLS?)").
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    try:
        tls_args = None if peer.tls is None else (client_ssl_context(peer.tls), peer.host)
        assoc = ae.associate(
            peer.host,
            peer.port,
            contexts=list(contexts),
            ae_title=peer.ae_title,
            max_pdu=max_pdu,
            ext_neg=ext_neg,
            tls_args=tls_args,
            evt_handlers=evt_handlers,
        )
    except Exception as exc:  # socket and TLS set-up errors surface in several types
        raise error(f"cannot connect to {peer.name} ({peer.host}:{peer.port}): {exc}") from exc
    if not assoc.is_established:
        close_socket(assoc)
        raise error(connection_problem(assoc, peer, timeout_s=timeout_s))
    set_nodelay(assoc)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        close_socket(assoc)  # after an abort in use; a no-op after a normal release


def connection_problem(assoc: Association, peer: Peer, *, timeout_s: float) -> str:
    """Why an association with ``peer`` did not open, as the operator should read it.

    pynetdicom reports a refused TCP connection as an aborted association; only its log says
    "Connection refused".  A rejection is the peer's answer; otherwise one plain TCP connect
    (only after a failure) tells an unreachable peer from one that dropped the association.
    """
    if assoc.is_rejected:
        return (
            f"association rejected by {peer.name} ({peer.ae_title}@{peer.host}:{peer.port}): "
            "does it know our AE title and host?"
        )
    probe_s = min(timeout_s, CONNECT_PROBE_TIMEOUT_S)
    try:
        with socket.create_connection((peer.host, peer.port), timeout=probe_s):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        return f"cannot connect to {peer.name} ({peer.host}:{peer.port}): {why}"
    return (
        f"association with {peer.name} ({peer.ae_title}@{peer.host}:{peer.port}) aborted: "
        "it accepts connections but dropped the association (called AE title, TLS?)"
    )


def client_ssl_context(tls: PeerTLS) -> ssl.SSLContext:
    """TLS context for associations we open: verify the peer against ``ca_file`` (TLS 1.2+)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), None if tls.key_file is None else str(tls.key_file))
    return ctx


def set_nodelay(assoc: Association) -> None:
    """TCP_NODELAY on an SCU association's socket (pynetdicom has no setting; PEERS.md: ~4x)."""
    raw = getattr(assoc.dul.socket, "socket", None)
    if raw is not None:
        with suppress(OSError):  # the peer closed it already: the next read or write says so
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def close_socket(assoc: Association) -> None:
    """Close the socket of an association that failed to open or was aborted.

    pynetdicom 3.0.4 leaves it open after a rejection, an abort or a failed TLS handshake (its
    own close() stops when shutdown() fails on the dead connection): one file descriptor per
    failed association until the garbage collector finds it.
    """
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if raw is not None:
        raw.close()
