"""Service: wire settings, database, spool, model, receiver and scheduler into one process."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler
from pynetdicom.transport import ThreadedAssociationServer

from node import jobs
from node.config import Settings
from node.db import make_engine, make_sessionmaker
from node.infer import load_model
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
    server: ThreadedAssociationServer
    scheduler: BackgroundScheduler
    counters: dict[str, int]
    web: WebServer | None = None  # the web console, when enabled and bound

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()
        self.server.shutdown()
        self.scheduler.shutdown(wait=True)
        logger.info("stopped")


def open_state(settings: Settings) -> tuple[Any, Spool]:
    """Database sessions and spool; creates both if needed."""
    engine = make_engine(
        settings.storage.database_url, busy_timeout_s=settings.storage.db_busy_timeout_s
    )
    return make_sessionmaker(engine), Spool(settings.storage.spool_dir)


def start(settings: Settings) -> Running:
    """Start receiving and working; returns at once (everything runs in background threads)."""
    os.umask(0o077)  # spool, SRs, database, outbox: owner-only, whoever creates them
    sessions, spool = open_state(settings)
    model = load_model(
        settings.model_dir,
        runtime=settings.analysis.runtime,
        cache_dir=settings.storage.spool_dir / ".models",
    )
    ctx = Context(settings=settings, sessions=sessions, spool=spool, model=model)
    jobs.requeue_interrupted(sessions)
    restart_quiet_timers(sessions)
    counters: dict[str, int] = {}
    extra: list[tuple[Callable[[], object], float]] = []
    if settings.catch_up.enabled:
        from node.pull import catch_up

        extra.append((lambda: catch_up(ctx), settings.catch_up.interval_s))
    scheduler = make_scheduler(ctx, extra)
    server = start_receiver(settings, spool, sessions, counters)
    scheduler.start()
    from node.web.server import start_console

    return Running(ctx, server, scheduler, counters, start_console(ctx))


def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM."""
    running = start(settings)
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        logger.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    logger.info("ready")
    stop.wait()
    running.stop()
