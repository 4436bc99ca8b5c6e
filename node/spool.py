"""Spool stage: every accepted instance as a file, ``spool/<Study>/<Series>/<SOP>.dcm``.

Writes are durable before the sender hears Success: temp file in the same file system, fsync,
atomic ``os.replace``, then fsync of the directory.  UIDs are validated before they become path
parts, so no UID can escape the spool.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

from node.errors import InvalidInstance

logger = logging.getLogger(__name__)

# Digits and dots, non-empty components, at most 64 characters (PS3.5 9.1).  Leading zeros are
# technically invalid but occur in real exports and are harmless in paths, so they are accepted.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(value: object, keyword: str) -> str:
    """Return ``value`` as a UID string or raise ``InvalidInstance`` naming the attribute."""
    text = str(value or "").strip().rstrip("\x00")
    if not text:
        raise InvalidInstance(f"{keyword} is missing")
    if len(text) > 64 or not _UID_RE.match(text):
        raise InvalidInstance(f"{keyword} {text[:80]!r} is not a valid UID")
    return text


class Spool:
    """The spool directory.  Thread-safe: every write goes through its own temp file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / ".tmp"
        self.results = root / ".results"
        for path in (root, self.tmp, self.results):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self.tmp.iterdir():  # leftovers of a crash mid-write: never acknowledged
            stale.unlink(missing_ok=True)

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

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return (
            self.root
            / check_uid(study_uid, "StudyInstanceUID")
            / check_uid(series_uid, "SeriesInstanceUID")
        )


def write_atomic(final: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to ``final`` so that readers see either nothing or the whole file."""
    tmp = (tmp_dir or final.parent) / f".{uuid.uuid4().hex}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
