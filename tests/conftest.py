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


# --- node fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny deterministic 2-class Keras model with a valid model.json (input 32 px)."""
    from tests.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), ["non-COVID", "COVID-19"])
