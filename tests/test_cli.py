"""cli.py as a user runs it (``python -m node``, a real process): where ``--config`` may go,
``TRIAGE_CONFIG``, ``check-config``'s errors and exit codes, what ``echo`` and delivery say when
the PACS is not there, and a second ``serve`` on a port in use."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom import examples

from node.config import Peer
from node.errors import SendFailed
from node.send import store_files
from tests.nodeproc import REPO, node_config
from tests.peers import free_port

INVALID = 2  # configuration or model invalid
FAILED = 1


def triage_node(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "TRIAGE_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "node", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        check=False,
    )


@pytest.fixture
def config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A valid config (AE title MARKER, so the effective settings show which file was read)."""
    path = node_config(tmp_path / "a", port=free_port(), model_dir=tiny_model_dir, pacs_port=None)
    settings = yaml.safe_load(path.read_text())
    settings["node"]["ae_title"] = "MARKER"
    path.write_text(yaml.safe_dump(settings))
    return path


def ae_title_read(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["node"]["ae_title"])


# --- 3. --config before or after the command, TRIAGE_CONFIG ---------------------------------------


def test_config_before_or_after_the_command_and_from_the_environment(
    config: Path, tmp_path: Path
) -> None:
    assert ae_title_read(triage_node("--config", str(config), "check-config")) == "MARKER"
    assert ae_title_read(triage_node("check-config", "--config", str(config))) == "MARKER"
    assert ae_title_read(triage_node("check-config", "--debug", f"--config={config}")) == "MARKER"
    from_env = triage_node("check-config", env={"TRIAGE_CONFIG": str(config)})
    assert ae_title_read(from_env) == "MARKER"
    # --config wins over TRIAGE_CONFIG; after the command it wins over one before it
    other = tmp_path / "missing.yaml"
    assert (
        ae_title_read(
            triage_node("check-config", "--config", str(config), env={"TRIAGE_CONFIG": str(other)})
        )
        == "MARKER"
    )
    assert (
        ae_title_read(triage_node("--config", str(other), "check-config", "--config", str(config)))
        == "MARKER"
    )


def test_missing_config_file_says_how_to_name_one(tmp_path: Path) -> None:
    result = triage_node("status", cwd=tmp_path)  # no ./config.yaml there
    assert result.returncode == INVALID
    assert "config.yaml: no such file" in result.stderr
    assert "--config" in result.stderr and "TRIAGE_CONFIG" in result.stderr
    assert "Traceback" not in result.stderr


# --- 8. check-config: our messages, one exit code for "invalid" -----------------------------------


def with_model_dir(config: Path, model_dir: Path) -> Path:
    """A copy of ``config`` that points at ``model_dir``."""
    settings = yaml.safe_load(config.read_text())
    settings["model_dir"] = str(model_dir)
    path = config.parent / "config-other-model.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_check_config_missing_model_directory(config: Path, tmp_path: Path) -> None:
    missing = tmp_path / "models" / "nope" / "1.0.0"
    result = triage_node("check-config", "--config", str(with_model_dir(config, missing)))
    assert result.returncode == INVALID
    assert f"model_dir: {missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_model_json_not_json(
    config: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    model = copy_model(tiny_model_dir, tmp_path / "model")
    (model / "model.json").write_text('{"name": "x",\n  "version": }\n')
    result = triage_node("check-config", "--config", str(with_model_dir(config, model)))
    assert result.returncode == INVALID
    assert "model.json: not valid JSON: line 2 column" in result.stderr, result.stderr


def test_check_config_model_json_bad_field_is_our_message(
    config: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    model = copy_model(tiny_model_dir, tmp_path / "model")
    spec = json.loads((model / "model.json").read_text())
    spec["input_size"] = 5
    del spec["classes"]
    (model / "model.json").write_text(json.dumps(spec))
    result = triage_node("check-config", "--config", str(with_model_dir(config, model)))
    assert result.returncode == INVALID
    assert "model error:" in result.stderr and "model.json: invalid:" in result.stderr
    assert "input_size = 5: Input should be greater than or equal to 32" in result.stderr
    assert "classes = {...}: Field required" in result.stderr
    assert "pydantic.dev" not in result.stderr and "validation error" not in result.stderr


def test_check_config_invalid_config_same_exit_code(config: Path) -> None:
    config.write_text(config.read_text() + "series_quiet_secs: 3\n")
    result = triage_node("check-config", "--config", str(config))
    assert result.returncode == INVALID
    assert "series_quiet_secs = 3: Extra inputs are not permitted" in result.stderr
    assert "pydantic.dev" not in result.stderr


# --- 4. what a missing PACS looks like ------------------------------------------------------------


def sr_file(tmp_path: Path) -> Path:
    ds = examples.ct  # any DICOM file will do: the association fails before it is sent
    path = tmp_path / "x.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def test_delivery_to_nothing_listening_says_connection_refused(tmp_path: Path) -> None:
    peer = Peer.model_validate(
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": free_port()}
    )
    with pytest.raises(SendFailed) as caught:
        store_files([sr_file(tmp_path)], peer, "TRIAGE", timeout_s=5)
    assert (
        str(caught.value) == f"cannot connect to pacs (127.0.0.1:{peer.port}): Connection refused"
    )


def test_delivery_to_a_peer_that_drops_the_association_says_so(
    tmp_path: Path, dropping_listener: int
) -> None:
    peer = Peer.model_validate(
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dropping_listener}
    )
    with pytest.raises(SendFailed) as caught:
        store_files([sr_file(tmp_path)], peer, "TRIAGE", timeout_s=5)
    assert str(caught.value).startswith(
        f"association with pacs (ORTHANC@127.0.0.1:{dropping_listener}) aborted: it accepts"
    )


def test_echo_to_nothing_listening(tmp_path: Path, tiny_model_dir: Path) -> None:
    pacs_port = free_port()
    config = node_config(tmp_path, port=free_port(), model_dir=tiny_model_dir, pacs_port=pacs_port)
    result = triage_node("echo", "pacs", "--config", str(config))
    assert result.returncode == FAILED
    assert result.stdout.strip() == (
        f"echo pacs (ORTHANC@127.0.0.1:{pacs_port}): "
        f"cannot connect to pacs (127.0.0.1:{pacs_port}): Connection refused"
    )


# --- 4. a second serve on a port in use -----------------------------------------------------------


def test_serve_on_a_port_in_use_names_the_holder_before_loading_the_model(
    tmp_path: Path,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        # a model directory that does not exist: reaching the model would fail differently
        config = node_config(tmp_path, port=port, model_dir=tmp_path / "no-model", pacs_port=None)
        result = triage_node("serve", "--config", str(config), timeout=60)
    assert result.returncode == FAILED, result.stderr
    assert f"node.port 127.0.0.1:{port} is already in use by " in result.stderr
    assert f"(pid {os.getpid()}: " in result.stderr  # this pytest process holds it
    assert "is the node already running?" in result.stderr
    assert "Traceback" not in result.stderr and "does not exist" not in result.stderr
