"""Finding the external tools (DCMTK, dicom3tools, Orthanc) that tests run for real."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def find_tool(name: str, path: str | None = None) -> str | None:
    """``shutil.which(name)``, but never from the ``bin/`` of the venv this Python runs in.

    pynetdicom installs console scripts named like DCMTK's (``storescu``, ``findscu``,
    ``echoscu``, ...) into the venv; with an activated venv they shadow DCMTK and DCMTK options
    fail ("unrecognized arguments: -xs", ../shared/PEERS.md).
    """
    dirs = (os.environ.get("PATH", os.defpath) if path is None else path).split(os.pathsep)
    if sys.prefix != sys.base_prefix:  # in a venv
        venv_bin = Path(sys.prefix, "bin").resolve()
        dirs = [d for d in dirs if d and Path(d).resolve() != venv_bin]
    return shutil.which(name, path=os.pathsep.join(dirs))


def require_tool(name: str) -> str:
    """Path of ``name`` on PATH; a missing tool fails the test under ``CI=true``, else skips it."""
    path = find_tool(name)
    if path is None:
        reason = f"{name} not found on PATH (install DCMTK / dicom3tools / Orthanc; .ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path
