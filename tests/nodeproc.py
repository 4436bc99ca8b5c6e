"""The node as a real separate process (``python -m node serve``), for end-to-end and fault tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.peers import wait_for

REPO = Path(__file__).resolve().parents[1]


def node_config(
    workdir: Path,
    *,
    port: int,
    model_dir: Path,
    pacs_port: int | None,
    quiet_s: float = 2.0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a config.yaml for a test node; returns its path."""
    config: dict[str, Any] = {
        "node": {"ae_title": "TRIAGE", "bind_address": "127.0.0.1", "port": port},
        "security": {
            "allowed_callers": [
                {"ae_title": "ORTHANC", "host": "127.0.0.1"},
                {"ae_title": "STORESCU", "host": "127.0.0.1"},
                {"ae_title": "ECHO", "host": "127.0.0.1"},
            ]
        },
        "peers": []
        if pacs_port is None
        else [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}],
        "results": {
            "send_to": None if pacs_port is None else "pacs",
            "retry": {"max_attempts": 6, "initial_backoff_s": 1, "max_backoff_s": 4},
        },
        "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.sqlite3"},
        "series_quiet_seconds": quiet_s,
        "model_dir": str(model_dir),
        "scheduler_tick_s": 0.5,
        "web": {"enabled": False},  # tests that want the console pass their own web: section
    }
    for key, value in (extra or {}).items():
        config[key] = value
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class NodeProcess:
    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.log = config.parent / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> NodeProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node", "--config", str(self.config), "serve"],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_for(self.echo, timeout, interval=0.5, what=f"node to answer C-ECHO (log: {self.log})")
        return self

    def echo(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log_text()}")
        # Probe the port first: pynetdicom 3.0.4 leaks its socket when a connect is refused.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", self.port)) != 0:
                return False
        ae = AE(ae_title="ECHO")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.connection_timeout = 2
        assoc = ae.associate("127.0.0.1", self.port, ae_title="TRIAGE")
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return status is not None and int(status.Status) == 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run another ``triage-node`` command on the same config."""
        return subprocess.run(
            [sys.executable, "-m", "node", "--config", str(self.config), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=check,
            timeout=300,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", "--json").stdout))
