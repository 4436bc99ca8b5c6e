"""Shared pytest fixtures (each helper appends its own)."""

from __future__ import annotations

import socket
import threading
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


@pytest.fixture
def dropping_listener() -> Iterator[int]:
    """A TCP port that accepts connections and closes them at once (not a DICOM peer)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = int(server.getsockname()[1])

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
    server.close()
    thread.join(5)


# --- node fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny deterministic 2-class Keras model with a valid model.json (input 32 px)."""
    from tests.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), ["non-COVID", "COVID-19"])


# --- databases: SQLite and a throwaway PostgreSQL cluster (tests/pg.py) ------------------------


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Any]:
    """One PostgreSQL server for the session (fails under CI=true when PostgreSQL is missing)."""
    from tests.pg import start_cluster

    cluster = start_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: Any) -> str:
    """URL of a new, empty PostgreSQL database for this test."""
    return str(postgres_cluster.create_database())


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The test runs twice: on a SQLite file in ``tmp_path`` and on a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))
