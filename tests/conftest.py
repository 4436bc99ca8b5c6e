"""Shared pytest fixtures (each helper appends its own)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import Orthanc, start_orthanc

# --- real peers (tests/peers.py) ------------------------------------------------------------------


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """`orthanc_factory(**start_orthanc kwargs) -> Orthanc`; stops and removes all at teardown."""
    started: list[Orthanc] = []

    def factory(**kwargs: Any) -> Orthanc:
        workdir = tmp_path / f"orthanc{len(started)}"
        orthanc = start_orthanc(workdir, **kwargs)
        started.append(orthanc)
        return orthanc

    yield factory
    for orthanc in reversed(started):
        orthanc.cleanup()
