"""Receive stage: the Storage SCP.  ``handle_store`` spools, records, and only then answers.

No analysis happens here.  Every failure becomes a DICOM status so the sender keeps the instance
and retries; a handler never raises.  Callers not on the allow-list are rejected at association
time, before any data is sent.  When the sender releases an association normally,
``handle_released`` asks ``node/series_complete.py`` whether the series it carried are complete
(after the A-RELEASE-RP is sent, so the sender does not wait for it).
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
from io import BytesIO
from typing import Any

import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import sessionmaker

from node import metrics
from node.config import Settings, TLSSettings
from node.errors import ConfigError, InvalidInstance
from node.series_complete import Caller, ReleaseChecks
from node.spool import Spool, check_uid
from node.tracking import InstanceHeader, Recorded, record_instance

logger = logging.getLogger(__name__)

# The node validates what it relies on (UIDs, pixel data) itself and answers with a status; pydicom's
# per-value warnings on read would only add noise (and break a handler under warnings-as-errors).
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# DICOM status codes (PS3.4 B.2.3 / PS3.7 C)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210
PROCESSING_FAILURE = 0x0110

STORAGE_SOP_CLASSES = (CTImageStorage, EnhancedCTImageStorage)

NATIVE_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
)
COMPRESSED_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
TRANSFER_SYNTAXES = NATIVE_TRANSFER_SYNTAXES + COMPRESSED_TRANSFER_SYNTAXES

# Stores of one SOP Instance from two associations at once are serialised (striped locks).
_SOP_LOCKS = tuple(threading.Lock() for _ in range(64))
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def parse_instance(data: bytes, sop_class_uid: str, sop_instance_uid: str) -> InstanceHeader:
    """Parse and check a received instance (file meta + dataset bytes).

    Raises
    ------
    InvalidInstance
        Unreadable or truncated data, malformed UIDs, or UIDs that contradict the request.
    """
    try:
        ds = pydicom.dcmread(BytesIO(data), force=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        header = InstanceHeader(
            study_instance_uid=check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
            series_instance_uid=check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
            sop_instance_uid=check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
            sop_class_uid=check_uid(ds.get("SOPClassUID"), "SOPClassUID"),
            transfer_syntax_uid=ts,
            modality=str(ds.get("Modality", "") or ""),
            study_date=str(ds.get("StudyDate", "") or "")[:8],
            study_description=str(ds.get("StudyDescription", "") or "")[:64],
            series_description=str(ds.get("SeriesDescription", "") or "")[:64],
            body_part=str(ds.get("BodyPartExamined", "") or "")[:16],
            image_type="\\".join(str(v) for v in (ds.get("ImageType") or []))[:128],
        )
        _check_request(header, sop_class_uid, sop_instance_uid)
        _check_encoding(data, UID(header.transfer_syntax_uid))
        _check_pixel_data(ds, data, UID(header.transfer_syntax_uid))
    except InvalidInstance:
        raise
    except Exception as exc:  # pydicom raises many types on malformed data (fuzzing found
        # NotImplementedError and others from lazily converted values)
        raise InvalidInstance(f"dataset cannot be parsed: {_without_values(exc)}") from exc
    return header


def _without_values(exc: Exception) -> str:
    """An exception's message with quoted values removed: they may be patient data."""
    return f"{type(exc).__name__}: " + _QUOTED.sub("'...'", str(exc))[:200]


def _check_request(header: InstanceHeader, sop_class_uid: str, sop_instance_uid: str) -> None:
    if header.sop_instance_uid != sop_instance_uid:
        raise InvalidInstance(
            f"SOPInstanceUID {header.sop_instance_uid} differs from the request's "
            f"AffectedSOPInstanceUID {sop_instance_uid}"
        )
    if header.sop_class_uid != sop_class_uid:
        raise InvalidInstance(
            f"SOPClassUID {header.sop_class_uid} differs from AffectedSOPClassUID {sop_class_uid}"
        )


def _check_encoding(data: bytes, ts: UID) -> None:
    """Refuse a dataset encoded otherwise than its transfer syntax says.

    pydicom silently switches to the VR encoding it finds, so a sender that announces Explicit
    VR but sends Implicit VR (or the reverse) would be spooled as a file other readers reject.
    The first element after the file meta tells: in explicit VR bytes 4-5 are the VR letters.
    """
    if not ts.is_transfer_syntax:
        raise InvalidInstance(f"transfer syntax {ts!r} is not a known transfer syntax")
    if ts.is_deflated or len(data) < 144 or data[128:132] != b"DICM":
        return
    start = 144 + int.from_bytes(data[140:144], "little")  # after (0002,0000) group length
    vr = data[start + 4 : start + 6]
    if len(vr) < 2:
        return
    explicit = vr.isalpha() and vr.isupper()
    if explicit == ts.is_implicit_VR:
        found = "explicit" if explicit else "implicit"
        raise InvalidInstance(
            f"dataset is encoded with {found} VR, not as its transfer syntax {ts.name}"
        )


def _check_pixel_data(ds: Dataset, data: bytes, ts: UID) -> None:
    """Refuse truncated pixel data, which pydicom reads without complaint."""
    if "PixelData" not in ds:
        raise InvalidInstance("no Pixel Data")
    if ts.is_encapsulated:
        if data.rfind(_SEQUENCE_DELIMITER) < data.rfind(_PIXEL_DATA_TAG):
            raise InvalidInstance("encapsulated Pixel Data has no sequence delimiter (truncated)")
        return
    try:
        expected = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1))
            * int(ds.get("NumberOfFrames", 1) or 1)
            * ((int(ds.BitsAllocated) + 7) // 8)
        )
    except (AttributeError, ValueError, TypeError) as exc:
        raise InvalidInstance(f"image pixel module incomplete: {exc}") from exc
    actual = len(ds.PixelData)
    if actual < expected:
        raise InvalidInstance(f"Pixel Data has {actual} bytes, expected {expected} (truncated)")


class Carried:
    """The series each open association has stored instances of (thread-safe).

    ``handle_released`` or ``handle_aborted`` takes an association's entry; one left by an
    association that ended otherwise (its thread is gone) is dropped when the next one starts.
    """

    def __init__(self) -> None:
        self._series: dict[Association, set[str]] = {}
        self._lock = threading.Lock()

    def add(self, assoc: Association, series_instance_uid: str) -> None:
        with self._lock:
            if assoc not in self._series:
                for ended in [a for a in self._series if not a.is_alive()]:
                    del self._series[ended]
                self._series[assoc] = set()
            self._series[assoc].add(series_instance_uid)

    def pop(self, assoc: Association) -> set[str]:
        with self._lock:
            return self._series.pop(assoc, set())


def handle_store(
    event: Event,
    spool: Spool,
    sessions: sessionmaker[Any],
    counters: dict[str, int],
    carried: Carried | None = None,
) -> int:
    """Write the instance to the spool, record it, and answer.  Never raises.

    ``carried`` (the Storage SCP's, not a C-GET's) notes the series for ``handle_released``.
    """
    request = event.request
    # The sender is the remote end: the requestor of a pushed C-STORE, the acceptor of a C-GET.
    remote = event.assoc.acceptor if event.assoc.is_requestor else event.assoc.requestor
    calling_ae = remote.ae_title.strip()
    calling_host = str(remote.address)
    sop_uid = str(request.AffectedSOPInstanceUID or "")
    try:
        data = event.encoded_dataset(include_meta=True)
        header = parse_instance(data, str(request.AffectedSOPClassUID or ""), sop_uid)
    except InvalidInstance as exc:
        logger.warning("refused instance %s from %s: %s", sop_uid[:64], calling_ae, exc)
        counters["refused"] = counters.get("refused", 0) + 1
        metrics.INSTANCES_RECEIVED.labels("refused").inc()
        return CANNOT_UNDERSTAND
    except Exception:
        logger.exception("unexpected error parsing instance %s", sop_uid[:64])
        return CANNOT_UNDERSTAND
    with _SOP_LOCKS[hash(header.sop_instance_uid) % len(_SOP_LOCKS)]:
        recorded = _spool_and_record(spool, sessions, header, data, calling_ae, calling_host)
    if recorded is None:
        counters["out_of_resources"] = counters.get("out_of_resources", 0) + 1
        return OUT_OF_RESOURCES
    if carried is not None:
        carried.add(event.assoc, header.series_instance_uid)
    metrics.INSTANCES_RECEIVED.labels("duplicate" if recorded.duplicate else "stored").inc()
    counters["stored"] = counters.get("stored", 0) + (0 if recorded.duplicate else 1)
    counters["duplicates"] = counters.get("duplicates", 0) + (1 if recorded.duplicate else 0)
    logger.debug(
        "stored %s series %s v%d%s",
        sop_uid,
        header.series_instance_uid,
        recorded.version,
        " (duplicate)" if recorded.duplicate else "",
    )
    return SUCCESS


def _spool_and_record(
    spool: Spool,
    sessions: sessionmaker[Any],
    header: InstanceHeader,
    data: bytes,
    calling_ae: str,
    calling_host: str,
) -> Recorded | None:
    """Write the file, then its row; None (and no unrecorded new file) when either fails.

    Callers hold the lock of this SOP Instance UID, so "the file existed before" stays true
    while we decide whether a failed record may delete it.
    """
    uids = (header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
    existed = spool.path_for(*uids).exists()  # a resent instance: its file may be recorded
    try:
        path = spool.write(*uids, data)
    except OSError as exc:  # disk full, quota, permissions: nothing half-written stays
        logger.error("spool write failed for %s: %s", header.sop_instance_uid, exc)
        return None
    try:
        return record_instance(sessions, header, str(path), len(data), calling_ae, calling_host)
    except Exception as exc:  # database busy/locked/full: the sender must retry
        logger.error("database write failed for %s: %s", header.sop_instance_uid, exc)
        if not existed:  # never keep a file the database does not know of
            path.unlink(missing_ok=True)
        return None


def handle_echo(event: Event) -> int:
    return SUCCESS


def handle_released(event: Event, carried: Carried, checks: ReleaseChecks) -> None:
    """The sender released the association normally: check what it carried for completion.

    The check (a C-FIND to the sender, the geometry of the series) runs in ``checks``' thread,
    not in this association's, which pynetdicom counts towards ``max_associations`` while it
    lives.  Never raises.
    """
    series_uids = carried.pop(event.assoc)
    if not series_uids or not event.assoc.is_acceptor:  # we only release on our own timeout
        return
    remote = event.assoc.requestor
    checks.submit(series_uids, Caller(ae_title=remote.ae_title.strip(), host=str(remote.address)))


def handle_aborted(event: Event, carried: Carried) -> None:
    """An abort (by either side, or a dropped connection) completes nothing: the timer decides."""
    series_uids = carried.pop(event.assoc)
    if series_uids:
        logger.info(
            "association from %s aborted: %d series left to the quiet timer",
            event.assoc.requestor.ae_title.strip(),
            len(series_uids),
        )


def handle_requested(event: Event, settings: Settings) -> None:
    """Reject callers not on the allow-list (AE title and, where configured, host)."""
    if settings.security.allow_any_caller:
        return
    assoc = event.assoc
    calling = assoc.requestor.primitive.calling_ae_title.strip()
    host = str(assoc.requestor.address)
    for allowed in settings.security.allowed_callers:
        if allowed.ae_title == calling and (allowed.host is None or allowed.host == host):
            return
    logger.warning("rejected association from AE %r at %s: not on the allow-list", calling, host)
    # rejected-permanent, service-user, calling-AE-title-not-recognised.  As pynetdicom's own
    # checks do: queue the A-ASSOCIATE-RJ, then kill(), which waits until the DUL has sent it.
    assoc.acse.send_reject(0x01, 0x01, 0x03)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def handle_connection(event: Event) -> None:
    """Disable Nagle on accepted sockets (see PEERS.md: 10x on loopback)."""
    sock = event.assoc.dul.socket
    raw = getattr(sock, "socket", None)
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class _LazyHandshakeContext(ssl.SSLContext):
    """An SSLContext whose server sockets do the TLS handshake in the association's thread.

    pynetdicom wraps each accepted socket in the server's accept loop; with the default eager
    handshake a client that connects and stays silent (or speaks plain DICOM) blocks every other
    caller until it goes away.  Deferring the handshake to the first read moves it into the
    association's own thread, under a timeout.
    """

    handshake_timeout_s: float = 10.0

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if kwargs.get("server_side"):
            sock.settimeout(self.handshake_timeout_s)
            kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """TLS context of the Storage SCP: TLS 1.2+, our certificate, CA-verified client certs."""
    ctx = _LazyHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.handshake_timeout_s = tls.handshake_timeout_s
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is None or tls.key_file is None:
        raise ConfigError("security.tls: cert_file and key_file are required for the TLS SCP")
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if tls.ca_file is None:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def make_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.node.ae_title)
    ae.maximum_associations = settings.node.max_associations
    ae.maximum_pdu_size = settings.node.max_pdu_size
    ae.network_timeout = settings.node.network_timeout_s
    ae.acse_timeout = settings.node.acse_timeout_s
    ae.dimse_timeout = settings.node.dimse_timeout_s
    ae.require_called_aet = settings.node.require_called_ae
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)
    return ae


def start_receiver(
    settings: Settings, spool: Spool, sessions: sessionmaker[Any], counters: dict[str, int]
) -> ThreadedAssociationServer:
    """Start the Storage SCP in background threads and return the server."""
    ae = make_ae(settings)
    carried = Carried()
    checks = ReleaseChecks(settings, sessions, counters)
    handlers = [
        (evt.EVT_C_STORE, handle_store, [spool, sessions, counters, carried]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_REQUESTED, handle_requested, [settings]),
        (evt.EVT_CONN_OPEN, handle_connection),
        (evt.EVT_RELEASED, handle_released, [carried, checks]),
        # Not EVT_CONN_CLOSE: a sender may close its socket right after the A-RELEASE-RP, and
        # the close can be seen before EVT_RELEASED.  A dropped connection ends as an abort.
        (evt.EVT_ABORTED, handle_aborted, [carried]),
    ]
    ssl_context = None
    if settings.security.require_tls:
        ssl_context = server_ssl_context(settings.security.tls)
    server = ae.start_server(
        (settings.node.bind_address, settings.node.port),
        block=False,
        evt_handlers=handlers,
        ssl_context=ssl_context,
    )
    logger.info(
        "listening as %s on %s:%d%s",
        settings.node.ae_title,
        settings.node.bind_address,
        settings.node.port,
        " (DICOM TLS only)" if ssl_context is not None else "",
    )
    return server  # type: ignore[return-value]
