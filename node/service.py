"""Service: wire settings, database, spool, model, receiver and scheduler into a process that
receives, works, or both (``serve``)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler
from pynetdicom.transport import ThreadedAssociationServer

from node import jobs
from node.challenger import load_challenger
from node.config import Settings
from node.db import make_engine, make_sessionmaker
from node.drift import run_drift
from node.errors import PortUnavailable
from node.infer import load_model
from node.model_spec import load_spec
from node.pipeline import Context
from node.receive import start_receiver
from node.schedule import make_scheduler
from node.spool import Spool
from node.tracking import restart_quiet_timers

if TYPE_CHECKING:
    from node.web.server import WebServer

logger = logging.getLogger(__name__)


@dataclass
class Running:
    ctx: Context
    server: ThreadedAssociationServer | None  # None in a process that only works
    scheduler: BackgroundScheduler
    counters: dict[str, int]
    web: WebServer | None = None  # the web console, when enabled and bound

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()
        if self.server is not None:
            self.server.shutdown()
        self.scheduler.shutdown(wait=True)  # a job in progress finishes first
        logger.info("stopped")


def open_state(settings: Settings) -> tuple[Any, Spool]:
    """Database sessions and spool; creates both if needed."""
    engine = make_engine(
        settings.storage.database_url, busy_timeout_s=settings.storage.db_busy_timeout_s
    )
    return make_sessionmaker(engine), Spool(settings.storage.spool_dir)


def port_holder(port: int) -> str | None:
    """Which process listens on TCP ``port``, as "name (pid N: command)", from /proc; or None.

    Only processes we may inspect are found (all of them as root); elsewhere None.
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the socket inode
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                name = (proc / "comm").read_text().strip()
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                command = b" ".join(argv).decode(errors="replace").strip()
                return f"{name} (pid {proc.name}: {command[:100]})"
        except OSError:  # gone, or not ours to inspect
            continue
    return None


def check_port_free(host: str, port: int, setting: str) -> None:
    """Raise ``PortUnavailable`` naming the holder when ``host:port`` cannot be listened on.

    Done before the model loads (seconds to minutes), so that a second ``serve`` stops at once.
    """
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise PortUnavailable(
                    f"{setting} {host}:{port}: cannot listen: {exc.strerror}"
                ) from exc
            holder = port_holder(port)
            who = f"by {holder}" if holder else "by another process (`ss -ltnp` as root names it)"
            raise PortUnavailable(
                f"{setting} {host}:{port} is already in use {who}: is the node already "
                f"running? Stop that process or choose another {setting}"
            ) from exc


def start(settings: Settings, *, receive: bool = True, work: bool = True) -> Running:
    """Start receiving and/or working; returns at once (everything runs in background threads).

    ``receive``: the DICOM listener, series completion (quiet timers, release), spool purge,
    catch-up and the web console.  ``work``: claim jobs from the queue and run them (analyse,
    report, deliver).  ``serve`` is both; ``triage-node receive`` and any number of
    ``triage-node work`` processes, on one or several machines sharing the spool path and the
    database, split them.  The model is loaded by workers, and by a receiver only for its web
    console (``/classify``, the model card).
    """
    if not (receive or work):
        raise ValueError("start: nothing to do (neither receive nor work)")
    if receive:
        check_port_free(settings.node.bind_address, settings.node.port, "node.port")
    os.umask(0o077)  # spool, SRs, database, outbox: owner-only, whoever creates them
    sessions, spool = open_state(settings)
    model = None
    if work or settings.web.enabled:
        model = load_model(
            settings.model_dir,
            runtime=settings.analysis.runtime,
            cache_dir=settings.storage.spool_dir / ".models",
        )
    challenger = load_challenger(settings) if work else None
    ctx = Context(
        settings=settings,
        sessions=sessions,
        spool=spool,
        model=model,  # type: ignore[arg-type]  # None only in a receiver without console
        challenger=challenger,
    )
    if work:
        jobs.requeue_orphans(sessions)
    if receive:
        restart_quiet_timers(sessions)
    counters: dict[str, int] = {}
    extra: list[tuple[Callable[[], object], float]] = []
    if receive and settings.catch_up.enabled:
        from node.pull import catch_up

        extra.append((lambda: catch_up(ctx), settings.catch_up.interval_s))
    if receive and settings.drift.enabled:
        spec = model.spec if model is not None else load_spec(settings.model_dir)
        extra.append(
            (
                lambda: run_drift(sessions, spec, settings.drift),
                settings.drift.interval_hours * 3600,
            )
        )
    scheduler = make_scheduler(ctx, extra, receive=receive, work=work)
    server = start_receiver(settings, spool, sessions, counters) if receive else None
    scheduler.start()
    web = None
    if receive:
        from node.web.server import start_console

        web = start_console(ctx)
    return Running(ctx, server, scheduler, counters, web)


def serve(settings: Settings, *, receive: bool = True, work: bool = True) -> None:
    """Run until SIGINT/SIGTERM: ``serve`` (both), ``receive`` or ``work`` (``start``)."""
    running = start(settings, receive=receive, work=work)
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        logger.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    role = "receiving and working" if receive and work else "receiving" if receive else "working"
    logger.info("ready (%s)", role)
    stop.wait()
    running.stop()
