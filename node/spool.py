"""Spool stage: every accepted instance as a file, ``spool/<Study>/<Series>/<SOP>.dcm``.

Writes are durable before the sender hears Success: a temp file in the same file system written
``O_DSYNC`` (on disk when the write returns), atomic ``os.replace``, then fsync of the folder.
UIDs are validated before they become path parts, so no UID can escape the spool.

``Spool.begin`` starts the durable temp-file write in a writer thread and returns at once,
so the receiver checks the instance while the disk works; ``PendingWrite.commit`` then renames
it into place and fsyncs the folder.  Only a committed file has a final name, so a crash at any
point leaves either nothing or a temp file, which a later start removes (``STALE_TMP_S``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from node.errors import InvalidInstance

logger = logging.getLogger(__name__)

# Digits and dots, non-empty components, at most 64 characters (PS3.5 9.1).  Leading zeros are
# technically invalid but occur in real exports and are harmless in paths, so they are accepted.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Temp files older than this are leftovers of a crash mid-write (never acknowledged): removed at
#: start.  Younger ones may belong to another process sharing the spool (receiver and workers).
STALE_TMP_S = 600.0
#: Writer threads of one spool: as many temp files as associations store at once, up to this.
WRITER_THREADS = 4


def check_uid(value: object, keyword: str) -> str:
    """Return ``value`` as a UID string or raise ``InvalidInstance`` naming the attribute."""
    text = str(value or "").strip().rstrip("\x00")
    if not text:
        raise InvalidInstance(f"{keyword} is missing")
    if len(text) > 64 or not _UID_RE.match(text):
        raise InvalidInstance(f"{keyword} {text[:80]!r} is not a valid UID")
    return text


class PendingWrite:
    """An instance being written to a temp file by a writer thread (``Spool.begin``)."""

    def __init__(self, spool: Spool, future: Future[Path]) -> None:
        self._spool = spool
        self._future = future

    def commit(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Wait for the temp file to be on disk, move it into place durably, return its path.

        Raises
        ------
        OSError
            The durable write, the rename or the folder's fsync failed (disk full, quota,
            permissions); no temp file is left behind.
        """
        tmp = self._future.result()
        try:
            final = self._spool.path_for(study_uid, series_uid, sop_uid)
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(final.parent)
        return final

    def discard(self) -> None:
        """Remove the temp file (the instance was refused); never raises."""
        with contextlib.suppress(OSError):  # a failed write left nothing behind
            self._future.result().unlink(missing_ok=True)


class Spool:
    """The spool directory.  Thread-safe: every write goes through its own temp file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / ".tmp"
        self.results = root / ".results"
        for path in (root, self.tmp, self.results):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        cutoff = time.time() - STALE_TMP_S
        for stale in self.tmp.iterdir():  # leftovers of a crash mid-write: never acknowledged
            # FileNotFoundError: another process sharing the spool committed it meanwhile
            with contextlib.suppress(FileNotFoundError):
                if stale.stat().st_mtime < cutoff:
                    stale.unlink(missing_ok=True)
        self._writers: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (
            self.root
            / check_uid(study_uid, "StudyInstanceUID")
            / check_uid(series_uid, "SeriesInstanceUID")
            / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm"
        )

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Durably write ``data`` (a complete DICOM file) and return its final path."""
        final = self.path_for(study_uid, series_uid, sop_uid)
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(final, data, self.tmp)
        return final

    def begin(self, data: bytes) -> PendingWrite:
        """Start writing ``data`` durably to a temp file; ``PendingWrite.commit`` names it."""
        with self._lock:
            if self._writers is None:
                self._writers = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="spool")
            writers = self._writers
        writing = threading.Event()
        future = writers.submit(write_temp, data, self.tmp, writing)
        # Wait until the writer is inside its (GIL-free) write: a thread that wants the GIL
        # while this one parses Python would otherwise only start when the parse is done.
        writing.wait()
        return PendingWrite(self, future)

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return (
            self.root
            / check_uid(study_uid, "StudyInstanceUID")
            / check_uid(series_uid, "SeriesInstanceUID")
        )


def write_temp(data: bytes, tmp_dir: Path, writing: threading.Event | None = None) -> Path:
    """Write ``data`` durably to a new temp file in ``tmp_dir``; return its path.

    The file is opened ``O_DSYNC``: the write returns once the data and what is needed to read
    it back (size, blocks) are on disk, as ``fdatasync`` after it, in one system call that runs
    without the GIL.  ``writing`` is set when the write starts (or the open failed).  On any
    error the temp file is removed and the error raised.
    """
    tmp = tmp_dir / f".{uuid.uuid4().hex}.part"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DSYNC, 0o600)
    finally:
        if writing is not None:
            writing.set()
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that a name just created or renamed in it survives a power cut."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomic(final: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to ``final`` so that readers see either nothing or the whole file."""
    tmp = write_temp(data, tmp_dir or final.parent)
    try:
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
