"""scripts/*.sh as the README runs them.

setup.sh runs against stand-ins for dpkg, apt-get, systemctl and the venv's python that record
what they were asked (installing packages for real is not a test's business): what each purpose
installs, and that an Orthanc service is only stopped when this run installed the package.
demo-orthanc.sh runs for real: after the node (the README's order), with a real Orthanc that
forwards a real series to the node and gets the SR back; and it fails loudly when it cannot.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from tests.nodeproc import REPO, NodeProcess, node_config
from tests.peers import (
    TCIA_SIEMENS_B40F,
    free_port,
    require_shared_data,
    series_files,
    storescu,
    wait_for,
)
from tests.tools import find_tool, require_tool

# --- setup.sh with recorded system tools ----------------------------------------------------------

STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$CALLS"
"""
DPKG = STUB + 'for p in $INSTALLED; do [ "$2" = "$p" ] && exit 0; done; exit 1\n'


@pytest.fixture
def fake_host(tmp_path: Path) -> Callable[..., tuple[int, list[str]]]:
    """A copy of scripts/ + pyproject.toml with recording stand-ins on PATH.

    Returns ``run(script, *args, installed=[...]) -> (exit code, recorded calls)``.
    """
    root = tmp_path / "repo"
    shutil.copytree(REPO / "scripts", root / "scripts")
    shutil.copy(REPO / "pyproject.toml", root)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {"dpkg": DPKG, "apt-get": STUB, "systemctl": STUB, "service": STUB}
    stubs["sudo"] = STUB + 'exec "$@"\n'
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name in ("python", "triage-node"):
        (venv_bin / name).write_text(STUB.replace('$(basename "$0")', f".venv/bin/{name}"))
        (venv_bin / name).chmod(0o755)
    calls = tmp_path / "calls.txt"

    def run(script: str, *args: str, installed: tuple[str, ...] = ()) -> tuple[int, list[str]]:
        calls.write_text("")
        env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "CALLS": str(calls),
            "INSTALLED": " ".join(installed),
            "HOME": str(tmp_path),
        }
        done = subprocess.run(
            ["bash", str(root / "scripts" / script), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return done.returncode, calls.read_text().splitlines()

    return run


TEST_PKGS = (
    "dcmtk orthanc dicom3tools openssl chromium chromium-driver libtcmalloc-minimal4 postgresql"
)


def installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("apt-get install")]


def test_setup_never_touches_an_orthanc_it_did_not_install(
    fake_host: Callable[..., tuple[int, list[str]]],
) -> None:
    code, calls = fake_host("setup.sh", "test", installed=("orthanc", "postgresql"))
    assert code == 0
    assert installs(calls) == [
        "apt-get install -y -qq dcmtk dicom3tools openssl chromium chromium-driver "
        "libtcmalloc-minimal4"
    ]
    assert not [c for c in calls if c.startswith(("systemctl", "service"))], calls


def test_setup_stops_the_orthanc_service_its_own_install_started(
    fake_host: Callable[..., tuple[int, list[str]]],
) -> None:
    code, calls = fake_host("setup.sh", "demo", installed=("dcmtk",))
    assert code == 0
    assert installs(calls) == ["apt-get install -y -qq orthanc"]
    assert [c for c in calls if c.startswith("systemctl")] == ["systemctl disable --now orthanc"]


def test_node_setup_installs_no_test_stack_and_start_passes_arguments(
    fake_host: Callable[..., tuple[int, list[str]]],
) -> None:
    code, calls = fake_host("start.sh", "--config", "site.yaml", "--port", "11113")
    assert code == 0
    assert installs(calls) == [] and not [c for c in calls if c.startswith("apt-get")]
    pip = [c for c in calls if " pip install " in c]
    assert pip[-1] == ".venv/bin/python -m pip install -q -e ."  # no --group test
    assert calls[-1] == ".venv/bin/triage-node serve --config site.yaml --port 11113"
    # the node's install is remembered; the test purpose adds the test group once
    _, again = fake_host("start.sh")
    assert not [c for c in again if " pip install " in c]
    code, calls = fake_host("test.sh", "-k", "x", installed=tuple(TEST_PKGS.split()))
    assert code == 0 and installs(calls) == []
    assert ".venv/bin/python -m pip install -q -e . --group test" in calls
    assert calls[-1] == ".venv/bin/python -m pytest -k x"
    _, again = fake_host("start.sh")
    assert not [c for c in again if " pip install " in c]  # the test install covers the node


def test_find_tool_skips_the_venvs_pynetdicom_scripts(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the venv's bin/ first on PATH (an activated venv) DCMTK is still what tests run."""
    dcmtk = require_tool("storescu")
    venv_bin = Path(sys.prefix, "bin")
    if not (venv_bin / "storescu").exists() or sys.prefix == sys.base_prefix:
        pytest.skip("not running in a venv with pynetdicom's storescu")
    monkeypatch.setenv("PATH", f"{venv_bin}:{os.environ['PATH']}")
    assert shutil.which("storescu") == str(venv_bin / "storescu")  # the trap
    assert find_tool("storescu") == dcmtk


# --- demo-orthanc.sh for real ---------------------------------------------------------------------


@pytest.fixture
def demo_env() -> Iterator[dict[str, str]]:
    """Free ports and a state folder the `orthanc` user can reach; stops the demo at the end."""
    if not Path("/usr/sbin/Orthanc").exists():
        require_tool("Orthanc")
    parent = Path(tempfile.mkdtemp(prefix="demo-orthanc-test-", dir="/tmp"))
    parent.chmod(0o755)
    env = {
        **os.environ,
        "DEMO_ORTHANC_DIR": str(parent / "orthanc"),
        "DEMO_ORTHANC_DICOM_PORT": str(free_port()),
        "DEMO_ORTHANC_HTTP_PORT": str(free_port()),
        "DEMO_NODE_PORT": str(free_port()),
    }
    yield env
    demo("stop", env)
    shutil.rmtree(parent, ignore_errors=True)


def demo(action: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "demo-orthanc.sh"), action],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_demo_after_the_node_forwards_and_gets_the_sr_back(
    demo_env: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    require_shared_data(TCIA_SIEMENS_B40F)
    node_port = int(demo_env["DEMO_NODE_PORT"])
    pacs_port = int(demo_env["DEMO_ORTHANC_DICOM_PORT"])
    config = node_config(
        tmp_path / "node", port=node_port, model_dir=tiny_model_dir, pacs_port=pacs_port
    )
    node = NodeProcess(config, node_port).start()  # the README's order: the node first
    try:
        started = demo("start", demo_env)
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"DICOM ORTHANC@127.0.0.1:{pacs_port}" in started.stdout
        assert "nothing listens" not in started.stderr  # the node is up
        again = demo("start", demo_env)  # idempotent: reports the running one
        assert again.returncode == 0 and again.stdout == started.stdout
        storescu(TCIA_SIEMENS_B40F, port=pacs_port, aec="ORTHANC", aet="STORESCU")
        study = str(pydicom.dcmread(series_files(TCIA_SIEMENS_B40F)[0]).StudyInstanceUID)
        http = f"http://127.0.0.1:{demo_env['DEMO_ORTHANC_HTTP_PORT']}"

        def sr_in_orthanc() -> bool:
            body = f'{{"Level":"Series","Query":{{"StudyInstanceUID":"{study}","Modality":"SR"}}}}'
            request = urllib.request.Request(f"{http}/tools/find", data=body.encode())
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.read().strip() not in (b"[]", b"")

        wait_for(sr_in_orthanc, 120, interval=1, what=f"the SR in the demo Orthanc ({node.log})")
    finally:
        node.stop()
    stopped = demo("stop", demo_env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert demo("status", demo_env).returncode == 3


def test_demo_fails_loudly_naming_who_holds_its_port(demo_env: dict[str, str]) -> None:
    port = int(demo_env["DEMO_ORTHANC_DICOM_PORT"])
    with socket.create_server(("127.0.0.1", port)):
        result = demo("start", demo_env)
    assert result.returncode == 1
    assert f"port {port} (DICOM) is already in use by python" in result.stderr
    assert f"(pid {os.getpid()})" in result.stderr
    assert demo("status", demo_env).returncode == 3


def test_demo_fails_loudly_when_orthanc_cannot_reach_its_folder(
    demo_env: dict[str, str], tmp_path: Path
) -> None:
    if os.geteuid() != 0 or find_tool("setpriv") is None:
        pytest.skip("Orthanc runs as the `orthanc` user only when started as root")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)  # like the node's var/
    result = demo("start", {**demo_env, "DEMO_ORTHANC_DIR": str(closed / "orthanc")})
    assert result.returncode == 1
    assert f"the orthanc user cannot write {closed / 'orthanc'}" in result.stderr


def test_demo_start_failure_shows_orthancs_log(demo_env: dict[str, str]) -> None:
    """The original failure, an index Orthanc cannot open, now ends the command with the log."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the folder must be closed to the user Orthanc runs as")
    index = Path(demo_env["DEMO_ORTHANC_DIR"]) / "index"
    index.mkdir(parents=True, mode=0o700)  # root's, closed to `orthanc`
    result = demo("start", demo_env)
    assert result.returncode == 1
    assert "Unable to open the database" in result.stderr
    assert "Orthanc exited during start-up" in result.stderr
