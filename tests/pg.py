"""A throwaway PostgreSQL cluster for tests: Debian's ``postgresql`` binaries, started in a temp
folder, reached only through a unix socket in that folder (no TCP listener), stopped and removed
at the end.

As root, ``initdb``/``pg_ctl`` run as the unprivileged ``postgres`` user the package creates (the
server refuses to run as root), with the data folder owned by that user; otherwise they run as
the current user.  A missing PostgreSQL fails the test under ``CI=true`` (``.ci/run`` installs
it through ``scripts/setup.sh test``) and skips it elsewhere.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.peers import free_port

PG_ROOT = Path("/usr/lib/postgresql")


def pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding ``initdb``, or None."""
    if not PG_ROOT.is_dir():
        return None
    found = sorted(
        (p for p in PG_ROOT.iterdir() if p.name.isdigit() and (p / "bin" / "initdb").exists()),
        key=lambda p: int(p.name),
    )
    return found[-1] / "bin" if found else None


def require_postgres() -> Path:
    """PostgreSQL's bin folder; fail under ``CI=true`` when it is missing, else skip."""
    found = pg_bin()
    if found is None:
        reason = f"PostgreSQL not found under {PG_ROOT} (apt-get install postgresql; .ci/run does)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    assert found is not None
    return found


def _as_owner() -> tuple[list[str], int | None, int | None]:
    """(command prefix, uid, gid): ``runuser -u postgres --`` as root, nothing otherwise."""
    if os.geteuid() != 0:
        return [], None, None
    pw = pwd.getpwnam("postgres")
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", "postgres", "--"], pw.pw_uid, pw.pw_gid


class PostgresCluster:
    """One ``postgres`` server; ``create_database()`` gives each test a fresh database."""

    _names = itertools.count()

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="pg-test-", dir="/tmp"))
        self.data = self.root / "data"
        self.port = free_port()  # names the socket file (.s.PGSQL.<port>); no TCP listener
        self.log = self.root / "server.log"
        self.prefix, uid, gid = _as_owner()
        if uid is not None and gid is not None:
            os.chown(self.root, uid, gid)
        os.chmod(self.root, 0o700)

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self.prefix, *args], capture_output=True, text=True, timeout=120, cwd=self.root
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise AssertionError(
                f"{args[0]} failed ({result.returncode}): {result.stderr or result.stdout}\n{log}"
            )

    def start(self) -> PostgresCluster:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",  # only the owner (and root) can reach the socket folder
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses='' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                [*self.prefix, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                 "-w", "stop"],
                capture_output=True, timeout=60, check=False, cwd=self.root,
            )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3) of ``database`` over the cluster's unix socket."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.root}&port={self.port}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(
            host=str(self.root), port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)


def start_cluster() -> PostgresCluster:
    cluster = PostgresCluster(require_postgres())
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise
