"""Helpers for tests that talk DICOM over loopback to real peers (Orthanc as PACS, DCMTK clients).

Facts behind the choices are in ../shared/PEERS.md (Orthanc 1.10 / DCMTK 3.6.7 as measured here):
Orthanc runs as the unprivileged ``orthanc`` user in a dedicated folder under /tmp, only registered
modalities on 127.0.0.1 may talk to it, and every DCMTK tool gets ``TCP_NODELAY=1`` (Nagle trap).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.tools import require_tool

# --------------------------------------------------------------------------------------------------
# Real data (never copied into the repository)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_TCIA = SHARED_DATA / "ct_dicom" / "tcia_lung_pet_ct_dx"
_CTMD = SHARED_DATA / "ct_dicom" / "covid_ct_md"

#: SIEMENS Sensation 10, Explicit VR Little Endian, 30 slices, kernel B70f (same study as B40F).
TCIA_SIEMENS_B70F = (
    _TCIA
    / "Lung_Dx-A0002"
    / "04-25-2007-NA-ThoraxAThoraxRoutine Adult-34834"
    / "2.000000-ThoraxRoutine  8.0.0  B70f-62919"
)
#: SIEMENS Sensation 10, Explicit VR Little Endian, 30 slices, kernel B40f.
TCIA_SIEMENS_B40F = (
    _TCIA
    / "Lung_Dx-A0002"
    / "04-25-2007-NA-ThoraxAThoraxRoutine Adult-34834"
    / "3.000000-ThoraxRoutine  8.0.0  B40f-10983"
)
#: Philips Brilliance16, Implicit VR Little Endian, 32 slices.
TCIA_PHILIPS = _TCIA / "Lung_Dx-A0001" / "04-04-2007-NA-Chest-07990" / "2.000000-5mm-40805"
#: COVID-CT-MD, JPEG Lossless (1.2.840.10008.1.2.4.70): COVID 74, CAP 84, Normal 77 slices.
CTMD_COVID = _CTMD / "COVID" / "P001"
CTMD_CAP = _CTMD / "CAP" / "cap001"
CTMD_NORMAL = _CTMD / "Normal" / "normal001"

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_shared_data(*paths: Path) -> Path:
    """Return SHARED_DATA; skip (fail under CI=true) if it or any of `paths` is absent."""
    for p in (SHARED_DATA, *paths):
        if not p.exists():
            reason = f"real data not available: {p} is missing (see ../shared/data/README.md)"
            if _in_ci():
                pytest.fail(reason)
            pytest.skip(reason)
    return SHARED_DATA


def series_files(folder: Path) -> list[Path]:
    """The .dcm files of one series folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm")


# --------------------------------------------------------------------------------------------------
# Generic helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    cond: Callable[[], bool], timeout: float, interval: float = 0.1, what: str = ""
) -> None:
    """Poll `cond` until it is true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what or cond!r}")
        time.sleep(interval)


def dcmtk_env() -> dict[str, str]:
    """os.environ plus TCP_NODELAY=1: DCMTK on loopback is ~10x slower without it."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def set_nodelay(assoc: Any) -> None:
    """Set TCP_NODELAY on a pynetdicom (3.0) association's socket (it has no setting for it)."""
    # Association -> DULServiceProvider -> AssociationSocket -> socket.socket
    sock = assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def storescu(
    files_or_dir: Path | list[Path],
    *,
    port: int,
    aec: str,
    aet: str = "STORESCU",
    host: str = "127.0.0.1",
    extra: Iterable[str] = (),
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Send files (or a folder, recursively) with DCMTK storescu.

    ``-xs`` proposes JPEG Lossless SV1 (1.2.840.10008.1.2.4.70) plus all uncompressed transfer
    syntaxes, and ``-R`` proposes only the SOP classes actually in the files, so the JPEG Lossless
    COVID-CT-MD files go as they are (storescu cannot transcode) and uncompressed ones as usual.
    """
    exe = require_tool("storescu")
    args = [exe, "-xs", "-R", "-aet", aet, "-aec", aec, "-to", "20", "-ta", "20", "-td", "60"]
    args += list(extra)
    args += [host, str(port)]
    if isinstance(files_or_dir, Path) and files_or_dir.is_dir():
        args += ["--scan-directories", "--recurse", str(files_or_dir)]
    else:
        items = [files_or_dir] if isinstance(files_or_dir, Path) else list(files_or_dir)
        args += [str(p) for p in items]
    return subprocess.run(
        args, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout, check=check
    )


def reidentify_copy(
    src_files: Iterable[Path],
    dst_dir: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: str | int,
) -> list[Path]:
    """Copy real slices into `dst_dir` with new deterministic Study/Series/SOP Instance UIDs.

    UIDs are derived from `seed` and the original UID (same seed -> same UIDs), unless `study_uid`
    or `series_uid` are given. Everything else, pixel data and transfer syntax included, is kept.
    """
    dst_dir.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for src in src_files:
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID = study_uid or generate_uid(
            entropy_srcs=[str(seed), "study", ds.StudyInstanceUID]
        )
        ds.SeriesInstanceUID = series_uid or generate_uid(
            entropy_srcs=[str(seed), "series", ds.SeriesInstanceUID]
        )
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(seed), "sop", ds.SOPInstanceUID])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        dst = dst_dir / src.name
        ds.save_as(dst, enforce_file_format=False)
        out.append(dst)
    return out


# --------------------------------------------------------------------------------------------------
# Orthanc


LUA_FORWARD = Path(__file__).resolve().parents[1] / "deploy" / "orthanc" / "forward-to-triage.lua"


def _lua_forward_script(target_name: str, target_aet: str) -> str:
    """The shipped Lua (deploy/orthanc/forward-to-triage.lua) with this test's target filled in."""
    script = LUA_FORWARD.read_text()
    script = script.replace('local TARGET = "triage"', f"local TARGET = {json.dumps(target_name)}")
    script = script.replace(
        'local TARGET_AET = "TRIAGE"', f"local TARGET_AET = {json.dumps(target_aet)}"
    )
    assert target_name in script and target_aet in script
    return script


def _orthanc_user() -> tuple[int, int] | None:
    """(uid, gid) of the `orthanc` user when we are root (then Orthanc runs as that user)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam("orthanc")
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


class Orthanc:
    """One Orthanc process with its own storage; start()/stop() may be repeated (PACS restart)."""

    def __init__(
        self,
        root: Path,
        *,
        aet: str,
        modalities: dict[str, tuple[str, str, int]],
        forward_to: str | None,
        stable_age: int,
    ) -> None:
        self.root = root
        self.aet = aet
        self.modalities = dict(modalities)
        self.forward_to = forward_to
        self.stable_age = stable_age
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.config_path = root / "orthanc.json"
        self.log_path = root / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    # -- setup ---------------------------------------------------------------------------------
    def _write_config(self) -> None:
        lua_scripts: list[str] = []
        if self.forward_to is not None:
            if self.forward_to not in self.modalities:
                raise ValueError(f"forward_to={self.forward_to!r} is not a registered modality")
            lua = self.root / "forward.lua"
            target_aet = self.modalities[self.forward_to][0]
            lua.write_text(_lua_forward_script(self.forward_to, target_aet))
            lua_scripts.append(str(lua))
        allow = {f"Allow{op}": True for op in ("Echo", "Find", "Get", "Move", "Store")}
        config = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomAlwaysAllowStore": False,
            "DicomModalitiesInDatabase": False,
            "DicomModalities": {
                name: {"AET": a, "Host": h, "Port": p, **allow}
                for name, (a, h, p) in self.modalities.items()
            },
            "DicomAssociationCloseDelay": 0,
            "StableAge": self.stable_age,
            "LuaScripts": lua_scripts,
            "Plugins": [],
            "SaveJobs": False,
            "HttpDescribeErrors": True,
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        owner = _orthanc_user()
        if owner is not None:
            for p in [self.root, *self.root.rglob("*")]:
                os.chown(p, *owner)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 30) -> Orthanc:
        if self.proc is not None and self.proc.poll() is None:
            return self
        exe = "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else require_tool("Orthanc")
        cmd = [exe, f"--logfile={self.log_path}", str(self.config_path)]
        if _orthanc_user() is not None:
            setpriv = require_tool("setpriv")
            cmd = [setpriv, "--reuid=orthanc", "--regid=orthanc", "--init-groups", *cmd]
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"Orthanc exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
                )
            try:
                self.get("/system")
            except (OSError, urllib.error.URLError):
                return False
            return True

        wait_for(up, timeout, interval=0.1, what=f"Orthanc up on {self.url}")
        return self

    def stop(self, timeout: float = 15) -> None:
        """Graceful stop (SIGTERM, about 3 s for Orthanc 1.10); SIGKILL after `timeout`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """Hard stop (SIGKILL): a crashed PACS, or a fast teardown when the storage is discarded."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        """Kill Orthanc and delete its storage folder."""
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Orthanc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- REST ----------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def get_text(self, path: str) -> str:
        """GET a plain-text resource (e.g. ``/instances/<id>/metadata/TransferSyntax``)."""
        req = urllib.request.Request(self.url + path, method="GET")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return str(resp.read().decode())

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body)

    def series_instance_uids(self) -> list[str]:
        """SeriesInstanceUIDs of every series stored."""
        out = []
        for sid in self.get("/series"):
            out.append(self.get(f"/series/{sid}")["MainDicomTags"]["SeriesInstanceUID"])
        return out

    def find_series(self, series_uid: str) -> str | None:
        ids = self.post(
            "/tools/find", {"Level": "Series", "Query": {"SeriesInstanceUID": series_uid}}
        )
        return ids[0] if ids else None

    def instances_in_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Simplified tags of every instance of the study (empty if Orthanc lacks it)."""
        ids = self.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        out: list[dict[str, Any]] = []
        for study in ids:
            for inst in self.get(f"/studies/{study}/instances"):
                tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
                tags["_OrthancID"] = inst["ID"]
                out.append(tags)
        return out

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def start_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    modalities: dict[str, tuple[str, str, int]] | None = None,
    forward_to: str | None = None,
    stable_age: int = 3,
) -> Orthanc:
    """Start an Orthanc with its storage in a dedicated /tmp folder the `orthanc` user owns.

    pytest's tmp_path parents may be root-only (0700), which the unprivileged user cannot traverse,
    so the storage lives in ``/tmp/orthanc-test-*``; ``workdir/orthanc`` is a symlink to it for
    post-mortem reading. Call ``cleanup()`` (or use the ``orthanc_factory`` fixture) to remove it.
    """
    root = Path(tempfile.mkdtemp(prefix="orthanc-test-", dir="/tmp"))
    os.chmod(root, 0o700)
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        (workdir / "orthanc").symlink_to(root, target_is_directory=True)
    orthanc = Orthanc(
        root, aet=aet, modalities=modalities or {}, forward_to=forward_to, stable_age=stable_age
    )
    try:
        return orthanc.start()
    except BaseException:
        orthanc.cleanup()
        raise


@contextlib.contextmanager
def orthanc_running(workdir: Path, **kwargs: Any) -> Iterator[Orthanc]:
    """Context manager around start_orthanc that stops Orthanc and removes its storage."""
    orthanc = start_orthanc(workdir, **kwargs)
    try:
        yield orthanc
    finally:
        orthanc.cleanup()
