"""Receive stage: the Storage SCP.  ``handle_store`` spools, records, and only then answers.

No analysis happens here.  Every failure becomes a DICOM status so the sender keeps the instance
and retries; a handler never raises.  Callers not on the allow-list are rejected at association
time, before any data is sent.  When the sender releases an association normally,
``handle_released`` asks ``node/series_complete.py`` whether the series it carried are complete
(after the A-RELEASE-RP is sent, so the sender does not wait for it).
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
import threading
import time
import zlib
from io import BytesIO
from typing import Any, Literal

import pydicom
import pydicom.config
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
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
from node.spool import PendingWrite, Spool, check_uid
from node.tracking import InstanceHeader, Recorded, record_instance

logger = logging.getLogger(__name__)

# The node validates what it relies on (UIDs, pixel data) itself and answers with a status;
# pydicom's per-value warnings on read would only add noise (and break a handler under
# warnings-as-errors).
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
# What parse_dataset reads of the header (other elements are skipped, not decoded)
_HEADER_TAGS: list[BaseTag | int] = [
    tag_for_keyword(keyword) or 0
    for keyword in (
        "SpecificCharacterSet",
        "ImageType",
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyDate",
        "Modality",
        "StudyDescription",
        "SeriesDescription",
        "BodyPartExamined",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SamplesPerPixel",
        "NumberOfFrames",
        "Rows",
        "Columns",
        "BitsAllocated",
    )
]
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)


def parse_instance(data: bytes, sop_class_uid: str, sop_instance_uid: str) -> InstanceHeader:
    """Parse and check a DICOM file's bytes (preamble, file meta, dataset): ``parse_dataset``
    on its dataset, in the transfer syntax its file meta names.

    Raises
    ------
    InvalidInstance
        No readable file meta, or as ``parse_dataset``.
    """
    start, ts = _split_file_meta(data)
    return parse_dataset(data[start:], ts, sop_class_uid, sop_instance_uid)


def _split_file_meta(data: bytes) -> tuple[int, str]:
    """(offset of the dataset, its Transfer Syntax UID) in a DICOM file.

    The file meta group is always Explicit VR Little Endian (PS3.10 7.1).
    """
    if data[128:132] != b"DICM":
        raise InvalidInstance("dataset cannot be parsed: no DICOM file meta information")
    at, ts = 132, ""
    while data[at : at + 2] == b"\x02\x00" and len(data) >= at + 8:
        element = int.from_bytes(data[at + 2 : at + 4], "little")
        if data[at + 4 : at + 6] in _LONG_VRS:
            start, length = at + 12, int.from_bytes(data[at + 8 : at + 12], "little")
        else:
            start, length = at + 8, int.from_bytes(data[at + 6 : at + 8], "little")
        if element == 0x0010:
            ts = data[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
        at = start + length
    if not ts:
        raise InvalidInstance("dataset cannot be parsed: the file meta has no Transfer Syntax UID")
    return at, ts


def parse_dataset(
    stream: bytes, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str
) -> InstanceHeader:
    """Parse and check a received dataset (no file meta), encoded in ``transfer_syntax``.

    Only the header elements the node keeps are read, up to the Pixel Data element, whose
    length is checked from its own element header: the pixel bytes are never copied or decoded.

    Raises
    ------
    InvalidInstance
        Unreadable or truncated data, malformed UIDs, or UIDs that contradict the request.
    """
    try:
        ts = UID(transfer_syntax)
        if not ts.is_transfer_syntax:
            raise InvalidInstance(f"transfer syntax {ts!r} is not a known transfer syntax")
        if ts.is_deflated:  # Deflated Explicit VR Little Endian: read the inflated dataset
            stream = zlib.decompress(stream, -zlib.MAX_WBITS)
        _check_encoding(stream, ts)
        fp = BytesIO(stream)
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
        ds = read_dataset(fp, implicit, little, stop_when=_at_pixels, specific_tags=_HEADER_TAGS)
        header = InstanceHeader(
            study_instance_uid=check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
            series_instance_uid=check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
            sop_instance_uid=check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
            sop_class_uid=check_uid(ds.get("SOPClassUID"), "SOPClassUID"),
            transfer_syntax_uid=str(ts),
            modality=str(ds.get("Modality", "") or ""),
            study_date=str(ds.get("StudyDate", "") or "")[:8],
            study_description=str(ds.get("StudyDescription", "") or "")[:64],
            series_description=str(ds.get("SeriesDescription", "") or "")[:64],
            body_part=str(ds.get("BodyPartExamined", "") or "")[:16],
            image_type="\\".join(str(v) for v in (ds.get("ImageType") or []))[:128],
        )
        _check_request(header, sop_class_uid, sop_instance_uid)
        pixel_bytes, trailing = _pixel_data_length(stream, fp.tell(), ts)
        if trailing:  # elements after Pixel Data (padding, private): read all, as a reader will
            read_dataset(BytesIO(stream), implicit, little)
        _check_pixel_data(ds, stream, ts, pixel_bytes)
    except InvalidInstance:
        raise
    except Exception as exc:  # pydicom raises many types on malformed data (fuzzing found
        # NotImplementedError and others from lazily converted values)
        raise InvalidInstance(f"dataset cannot be parsed: {_without_values(exc)}") from exc
    return header


def _at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    """Stop reading the header at (Float/Double) Pixel Data, as ``stop_before_pixels``."""
    return tag in (0x7FE00010, 0x7FE00008, 0x7FE00009)


def file_meta_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group of a received instance (PS3.10 7.1).

    The same bytes as pynetdicom's ``encode_file_meta(event.file_meta)`` (a test compares
    them), built directly: pydicom's writer took as long as parsing the whole header.
    """
    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _ui(sop_class_uid)),
        _meta_element(0x0003, b"UI", _ui(sop_instance_uid)),
        _meta_element(0x0010, b"UI", _ui(transfer_syntax)),
        _meta_element(0x0012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID)),
        _meta_element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION.encode(), b" ")),
    ]
    body = b"".join(elements)
    group_length = _meta_element(0x0000, b"UL", len(body).to_bytes(4, "little"))
    return b"\0" * 128 + b"DICM" + group_length + body


def _padded(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _ui(uid: str) -> bytes:
    return _padded(uid.encode("ascii", "replace"), b"\0")


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element of group 0002."""
    tag = b"\x02\x00" + element.to_bytes(2, "little")
    if vr in _LONG_VRS:
        return tag + vr + b"\0\0" + len(value).to_bytes(4, "little") + value
    return tag + vr + len(value).to_bytes(2, "little") + value


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


def _check_encoding(stream: bytes, ts: UID) -> None:
    """Refuse a dataset encoded otherwise than its transfer syntax says.

    pydicom silently switches to the VR encoding it finds, so a sender that announces Explicit
    VR but sends Implicit VR (or the reverse) would be spooled as a file other readers reject.
    The first element tells: in explicit VR its bytes 4-5 are the VR letters.
    """
    vr = stream[4:6]
    if len(vr) < 2:
        return
    explicit = vr.isalpha() and vr.isupper()
    if explicit == ts.is_implicit_VR:
        found = "explicit" if explicit else "implicit"
        raise InvalidInstance(
            f"dataset is encoded with {found} VR, not as its transfer syntax {ts.name}"
        )


def _pixel_data_length(data: bytes, at: int, ts: UID) -> tuple[int | None, bool]:
    """(bytes of Pixel Data present, whether elements follow it) for the element at ``at``.

    The length is None when the element there is not (7FE0,0010) (the header ended without
    Pixel Data), -1 for an undefined length (encapsulated), else the declared length or what
    ``data`` holds if it ends sooner (truncated).
    """
    order: Literal["little", "big"] = "little" if ts.is_little_endian else "big"
    tag = data[at : at + 4]
    if tag != (_PIXEL_DATA_TAG if order == "little" else b"\x7f\xe0\x00\x10"):
        return None, False
    if ts.is_implicit_VR:
        start, length = at + 8, int.from_bytes(data[at + 4 : at + 8], order)
    elif data[at + 4 : at + 6] in _LONG_VRS:
        start, length = at + 12, int.from_bytes(data[at + 8 : at + 12], order)
    else:
        start, length = at + 8, int.from_bytes(data[at + 6 : at + 8], order)
    if length == 0xFFFFFFFF:
        return -1, False
    return max(0, min(length, len(data) - start)), start + length < len(data)


def _check_pixel_data(ds: Dataset, data: bytes, ts: UID, actual: int | None) -> None:
    """Refuse missing or truncated pixel data, which pydicom reads without complaint.

    ``actual``: the bytes of Pixel Data present (``_pixel_data_length``), None if it is missing.
    """
    if actual is None:
        raise InvalidInstance("no Pixel Data")
    if ts.is_encapsulated:
        if data.rfind(_SEQUENCE_DELIMITER) < data.rfind(_PIXEL_DATA_TAG):
            raise InvalidInstance("encapsulated Pixel Data has no sequence delimiter (truncated)")
        return
    if actual < 0:
        raise InvalidInstance(f"Pixel Data has an undefined length in {ts.name}")
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
    if actual < expected:
        raise InvalidInstance(f"Pixel Data has {actual} bytes, expected {expected} (truncated)")


class PollPacer:
    """Short polls for pynetdicom's DUL thread while its association transfers data.

    pynetdicom 3 polls its socket and queues in a loop that sleeps ``dul._run_loop_delay``
    (1 ms) whenever nothing was there, so every C-STORE waits about a millisecond twice (for the
    request's data, and before the response goes out).  While an association stores, its DUL
    polls every ``FAST_POLL_S``; once it has been idle for ``idle_after_s`` it is back to the
    default, so a sender that holds an idle association open does not cost a spinning thread.
    Measured in bench/ingest.py: about a quarter more instances per second, the same CPU per
    instance.
    """

    FAST_POLL_S = 0.0002
    DEFAULT_POLL_S = 0.001  # pynetdicom 3.0's own

    def __init__(self, idle_after_s: float = 0.5) -> None:
        self.idle_after_s = idle_after_s
        self._busy: dict[Association, float] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def busy(self, assoc: Association) -> None:
        """``assoc`` is transferring: poll fast until it has been idle for a while."""
        assoc.dul._run_loop_delay = self.FAST_POLL_S
        with self._lock:
            self._busy[assoc] = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="poll-pacer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.idle_after_s / 2)
            cutoff = time.monotonic() - self.idle_after_s
            with self._lock:
                idle = [a for a, last in self._busy.items() if last < cutoff]
                for assoc in idle:
                    del self._busy[assoc]
            for assoc in idle:
                assoc.dul._run_loop_delay = self.DEFAULT_POLL_S


_PACER = PollPacer()


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
    _PACER.busy(event.assoc)
    request = event.request
    # The sender is the remote end: the requestor of a pushed C-STORE, the acceptor of a C-GET.
    remote = event.assoc.acceptor if event.assoc.is_requestor else event.assoc.requestor
    calling_ae = remote.ae_title.strip()
    calling_host = str(remote.address)
    sop_uid = str(request.AffectedSOPInstanceUID or "")
    sop_class = str(request.AffectedSOPClassUID or "")
    try:
        ts = str(event.context.transfer_syntax)  # the presentation context's: what was sent
        stream = event.encoded_dataset(include_meta=False)
        data = file_meta_prefix(sop_class, sop_uid, ts) + stream
        pending = spool.begin(data)  # the disk writes and fsyncs while the instance is checked
    except Exception:  # a C-STORE always has a dataset; a stopping spool refuses new writes
        logger.exception("cannot spool instance %s", sop_uid[:64])
        counters["out_of_resources"] = counters.get("out_of_resources", 0) + 1
        return OUT_OF_RESOURCES
    try:
        header = parse_dataset(stream, ts, sop_class, sop_uid)
    except InvalidInstance as exc:
        pending.discard()
        logger.warning("refused instance %s from %s: %s", sop_uid[:64], calling_ae, exc)
        counters["refused"] = counters.get("refused", 0) + 1
        metrics.INSTANCES_RECEIVED.labels("refused").inc()
        return CANNOT_UNDERSTAND
    except Exception:
        pending.discard()
        logger.exception("unexpected error parsing instance %s", sop_uid[:64])
        return CANNOT_UNDERSTAND
    with _SOP_LOCKS[hash(header.sop_instance_uid) % len(_SOP_LOCKS)]:
        recorded = _spool_and_record(
            spool, pending, sessions, header, len(data), calling_ae, calling_host
        )
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
    pending: PendingWrite,
    sessions: sessionmaker[Any],
    header: InstanceHeader,
    size: int,
    calling_ae: str,
    calling_host: str,
) -> Recorded | None:
    """Put the file in place durably, then commit its row; None (and no unrecorded new file)
    when either fails.  The order is what makes an acknowledged instance survive a crash or a
    power cut: a row is committed (synchronous=FULL) only for a file already on disk.

    Callers hold the lock of this SOP Instance UID, so "the file existed before" stays true
    while we decide whether a failed record may delete it.
    """
    uids = (header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
    existed = spool.path_for(*uids).exists()  # a resent instance: its file may be recorded
    try:
        path = pending.commit(*uids)
    except OSError as exc:  # disk full, quota, permissions: nothing half-written stays
        logger.error("spool write failed for %s: %s", header.sop_instance_uid, exc)
        return None
    try:
        return record_instance(sessions, header, str(path), size, calling_ae, calling_host)
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
    """Disable Nagle on accepted sockets (see PEERS.md: 10x on loopback); poll fast while the
    association is set up and its first data arrives (``PollPacer``)."""
    _PACER.busy(event.assoc)
    sock = event.assoc.dul.socket
    raw = getattr(sock, "socket", None)
    if raw is not None:
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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


def skip_unlogged_pynetdicom_handlers() -> None:
    """Unbind pynetdicom's logging handlers when the "pynetdicom" logger would drop their INFO.

    pynetdicom formats a summary of every PDU and DIMSE message for its log whatever the level
    (for a C-STORE it also copies the dataset to see whether it is empty): about 3% of the
    receiver's CPU, for lines the default WARNING level discards.  ``--debug`` keeps them.
    """
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        _config.LOG_HANDLER_LEVEL = "none"


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
    skip_unlogged_pynetdicom_handlers()
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
