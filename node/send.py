"""Send stage: C-STORE the SR to the PACS and check the status it returns.

Only Success or a Warning status counts as delivered; anything else raises ``SendFailed`` so the
job is retried with backoff.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.association import Association

from node.config import Peer, PeerTLS
from node.errors import SendFailed

logger = logging.getLogger(__name__)

WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}
SR_TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


def set_nodelay(assoc: Association) -> None:
    """TCP_NODELAY on an SCU association's socket (pynetdicom has no setting; PEERS.md: ~4x)."""
    raw = getattr(assoc.dul.socket, "socket", None)
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def close_socket(assoc: Association) -> None:
    """Close the socket of an association that failed to open.

    pynetdicom 3.0.4 leaves it open after a rejection, an abort or a failed TLS handshake (its
    own close() stops when shutdown() fails on the dead connection): one file descriptor per
    failed delivery until the garbage collector finds it.
    """
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if raw is not None:
        raw.close()


def client_ssl_context(tls: PeerTLS) -> ssl.SSLContext:
    """TLS context for associations we open: verify the peer against ``ca_file`` (TLS 1.2+)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), None if tls.key_file is None else str(tls.key_file))
    return ctx


def store_files(paths: list[Path], peer: Peer, calling_ae: str, *, timeout_s: float = 30.0) -> None:
    """Send DICOM files to ``peer`` in one association; raise ``SendFailed`` on any failure."""
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, SR_TRANSFER_SYNTAXES)
    try:
        tls_args = None if peer.tls is None else (client_ssl_context(peer.tls), peer.host)
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    except Exception as exc:
        raise SendFailed(f"cannot connect to {peer.name} ({peer.host}:{peer.port}): {exc}") from exc
    if not assoc.is_established:
        state = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        close_socket(assoc)
        raise SendFailed(f"association with {peer.name} ({peer.ae_title}) {state}")
    set_nodelay(assoc)
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status is not None and "Status" in status else None
            if code is None:
                raise SendFailed(f"{peer.name}: no C-STORE response (timeout or abort)")
            if code != 0x0000 and code not in WARNING_STATUSES:
                raise SendFailed(f"{peer.name}: C-STORE status 0x{code:04X}")
            if code != 0x0000:
                logger.warning(
                    "%s answered warning 0x%04X for %s", peer.name, code, ds.SOPInstanceUID
                )
    finally:
        if assoc.is_established:
            assoc.release()
