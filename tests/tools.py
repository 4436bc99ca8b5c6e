"""Finding the external tools (DCMTK, dicom3tools, Orthanc) that tests run for real."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """Path of ``name`` on PATH; a missing tool fails the test under ``CI=true``, else skips it."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} not found on PATH (install DCMTK / dicom3tools / Orthanc; .ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path
