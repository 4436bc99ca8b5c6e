"""Web console server: uvicorn in a background thread of the node process.

The socket is bound here, in the caller's thread, so a port in use is reported at start-up.  The
console is an aid, not the node's job: when it cannot bind, the node logs why and goes on
receiving and reporting without it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from node.pipeline import Context
from node.web.app import create_app

logger = logging.getLogger(__name__)


@dataclass
class WebServer:
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def bind_socket(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def start_web(ctx: Context, timeout: float = 10.0) -> WebServer:
    """Bind and serve the console; returns when it accepts connections.

    Raises
    ------
    OSError
        When the address cannot be bound (port in use, address not local).
    """
    web = ctx.settings.web
    sock = bind_socket(web.bind_address, web.port)
    config = uvicorn.Config(
        create_app(ctx),
        log_config=None,
        access_log=False,
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="web-console", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise OSError(f"web console did not start on {web.bind_address}:{web.port}")
        time.sleep(0.02)
    host = f"[{web.bind_address}]" if ":" in web.bind_address else web.bind_address
    url = f"http://{host}:{web.port}/"
    logger.info(
        "web console on %s (%s)", url, "basic auth" if web.password is not None else "no password"
    )
    return WebServer(server, thread, url)


def start_console(ctx: Context) -> WebServer | None:
    """Start the console if enabled; None when disabled or when it cannot bind (logged)."""
    web = ctx.settings.web
    if not web.enabled:
        return None
    try:
        return start_web(ctx)
    except OSError as exc:
        logger.error(
            "web console NOT started: cannot serve on %s:%d (web.bind_address/web.port): %s",
            web.bind_address,
            web.port,
            exc,
        )
        return None
