"""Configuration stage: ``config.yaml`` -> validated, typed settings.

Every setting has its default here, on the model.  Unknown keys are errors (``extra="forbid"``), so
a misspelt key stops start-up with a message naming the key and its value.  No other module reads
the YAML file or the environment.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from node.errors import ConfigError

logger = logging.getLogger(__name__)

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value):
        raise ValueError(
            f"AE title {value!r} must be 1-16 printable ASCII characters, no backslash"
        )
    return stripped


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from exc
    return value


AETitle = Annotated[str, AfterValidator(_check_ae)]
Regex = Annotated[str, AfterValidator(_check_regex)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Strict):
    ae_title: AETitle = "TRIAGE"
    bind_address: str = "127.0.0.1"
    port: Port = 11112
    max_associations: int = Field(10, ge=1)
    max_pdu_size: int = Field(0, ge=0, description="0 = unlimited")
    network_timeout_s: float = Field(60.0, gt=0)
    acse_timeout_s: float = Field(30.0, gt=0, description="wait for association messages")
    dimse_timeout_s: float = Field(30.0, gt=0, description="wait for DIMSE messages")
    require_called_ae: bool = True

    @field_validator("bind_address")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


class AllowedCaller(_Strict):
    ae_title: AETitle
    host: str | None = Field(None, description="IP address the caller must connect from")


class TLSSettings(_Strict):
    """DICOM TLS (PS3.15 B.1) material for the Storage SCP; PEM files."""

    cert_file: Path | None = Field(None, description="our certificate (chain)")
    key_file: Path | None = Field(None, description="private key of cert_file")
    ca_file: Path | None = Field(None, description="CA(s) that sign allowed client certificates")
    require_client_cert: bool = Field(
        True, description="refuse TLS clients without a certificate signed by ca_file"
    )
    handshake_timeout_s: float = Field(10.0, gt=0)


class SecuritySettings(_Strict):
    allow_any_caller: bool = Field(False, description="lab use only: accept every calling AE")
    allowed_callers: list[AllowedCaller] = []
    require_tls: bool = Field(False, description="the SCP speaks DICOM TLS only (security.tls)")
    tls: TLSSettings = TLSSettings()

    @model_validator(mode="after")
    def _tls_complete(self) -> SecuritySettings:
        if self.require_tls:
            if self.tls.cert_file is None or self.tls.key_file is None:
                raise ValueError("require_tls: tls.cert_file and tls.key_file are required")
            if self.tls.require_client_cert and self.tls.ca_file is None:
                raise ValueError("require_tls: tls.ca_file is required with require_client_cert")
        return self


class PeerTLS(_Strict):
    """DICOM TLS towards one peer: verify it against ca_file; optional client certificate."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = Field(True, description="the peer's certificate must name its host")


class Peer(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: str
    port: Port
    retrieve: Literal["get", "move", "none"] = Field(
        "get", description="how to pull studies from this peer: C-GET, C-MOVE to our AE, or never"
    )
    tls: PeerTLS | None = Field(
        None, description="talk to this peer over DICOM TLS: SR delivery, C-FIND, C-GET, C-MOVE"
    )


class RetrySettings(_Strict):
    max_attempts: int = Field(8, ge=1)
    initial_backoff_s: float = Field(10.0, gt=0)
    max_backoff_s: float = Field(1800.0, gt=0)


OutputKind = Literal["sr", "kos", "summary", "text_sr"]
"""Result objects (``node.outputs``): TID 1500 Comprehensive 3D SR, Key Object Selection of the
key slices, Secondary Capture summary image, Basic Text SR."""


class ResultSettings(_Strict):
    send_to: str | None = Field(
        "pacs", description="peer name that receives the results; null = keep them local"
    )
    outputs: dict[str, list[OutputKind]] = Field(
        default_factory=dict,
        description="per peer name: the result objects it gets (sr, kos, summary, text_sr); "
        "a peer not listed gets sr, kos and summary as far as it accepts them, the Basic Text "
        "SR in place of an sr it refuses",
    )
    outbox_dir: Path | None = Field(None, description="also write each result object here")
    mode: Literal["shadow", "live"] = Field(
        "live",
        description="shadow: analyse, record and write the result objects (spool, outbox) but "
        "send nothing to send_to; `triage-node resend --since` sends them after going live",
    )
    series_number: int = Field(
        9901, ge=1, description="Series Number of the SR; kos, summary, text_sr: +1, +2, +3"
    )
    retry: RetrySettings = RetrySettings()

    @field_validator("outputs")
    @classmethod
    def _profiles(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for peer, kinds in value.items():
            if not kinds:
                raise ValueError(f"{peer}: name at least one result object")
            if len(set(kinds)) != len(kinds):
                raise ValueError(f"{peer}: {kinds} names an object twice")
        return value


class StorageSettings(_Strict):
    spool_dir: Path = Path("var/spool")
    database_url: str = "sqlite:///var/triage.sqlite3"
    retention_days: float = Field(7.0, gt=0, description="delete spooled instances after this")
    db_busy_timeout_s: float = Field(
        10.0, gt=0, description="wait this long for a locked SQLite database, then refuse (0xA700)"
    )


class WorkerSettings(_Strict):
    """Workers claiming jobs from the queue (``serve``, or ``triage-node work`` processes)."""

    lease_s: float = Field(
        60.0,
        ge=1,
        description="a claimed job is its worker's for this long, renewed every third of it "
        "while the worker runs it; a job whose worker died is claimed again once it expires",
    )


class SelectionSettings(_Strict):
    """Which complete series are ours to analyse; anything else is recorded as rejected."""

    modalities: list[str] = ["CT"]
    description_pattern: Regex = r"(?i)t[oó]rax|thor|chest|lung|pulm"
    exclude_series_pattern: Regex = r"(?i)scout|topogram|localizer|dose|screen\s*save|mip\b"
    accept_missing_descriptions: bool = True
    exclude_image_types: list[str] = ["LOCALIZER"]
    min_instances: int = Field(10, ge=1)


class AnalysisSettings(_Strict):
    """Checks a selected series must pass to be analysed; a failure gives a 'not analysed' SR."""

    require_axial: bool = True
    max_gap_factor: float = Field(1.6, gt=1, description="largest allowed gap / median spacing")
    batch_size: int = Field(16, ge=1)
    runtime: Literal["auto", "keras", "tflite"] = Field(
        "auto",
        description="auto: the shipped model.tflite in LiteRT without TensorFlow when verified, "
        "else a conversion at load when it matches Keras, else Keras",
    )
    min_lung_extent_mm: float = Field(
        20.0,
        ge=0,
        description="lungs seen over less than this along the body axis: 'not analysed' "
        "(0 = never); under model.json analysis.min_extent_mm the SR only carries a caveat",
    )


class CatchUpSettings(_Strict):
    enabled: bool = False
    peer: str | None = None
    interval_s: float = Field(300.0, gt=0)
    lookback_hours: float = Field(24.0, gt=0)
    max_studies_per_tick: int = Field(20, ge=1)


class WebSettings(_Strict):
    """The web console (dashboard, /classify, /metrics, /model) served by the node process."""

    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: Port = 8080
    password: SecretStr | None = Field(
        None, description="HTTP basic auth password (any user name); required off loopback"
    )
    max_upload_mb: float = Field(300.0, gt=0, description="largest upload /classify accepts")

    @field_validator("bind_address")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value

    @model_validator(mode="after")
    def _password_off_loopback(self) -> WebSettings:
        if (
            self.enabled
            and self.password is None
            and not ipaddress.ip_address(self.bind_address).is_loopback
        ):
            raise ValueError(
                f"web.password: required when web.bind_address is {self.bind_address!r} "
                "(not a loopback address); set a password or bind to 127.0.0.1"
            )
        return self


class DriftSettings(_Strict):
    """Drift monitoring (``node.drift``): the analysed series of the last ``window_days``
    against the model's reference summary (``model.json`` ``reference``)."""

    enabled: bool = True
    interval_hours: float = Field(168.0, gt=0, description="how often to compare (weekly)")
    window_days: float = Field(7.0, gt=0, description="the analysed series compared")
    min_series: int = Field(
        30, ge=5, description="fewer series in the window: reported, never a warning"
    )


class Settings(_Strict):
    node: NodeSettings = NodeSettings()
    security: SecuritySettings = SecuritySettings()
    peers: list[Peer] = []
    results: ResultSettings = ResultSettings()
    storage: StorageSettings = StorageSettings()
    series_quiet_seconds: float = Field(10.0, gt=0)
    selection: SelectionSettings = SelectionSettings()
    analysis: AnalysisSettings = AnalysisSettings()
    model_dir: Path = Path("models/covid-ct/current")
    challenger_model_dir: Path | None = Field(
        None,
        description="a second model analysed in shadow beside model_dir: its verdicts are "
        "recorded, never sent (`triage-node promote` makes it the live model)",
    )
    drift: DriftSettings = DriftSettings()
    catch_up: CatchUpSettings = CatchUpSettings()
    web: WebSettings = WebSettings()
    scheduler_tick_s: float = Field(1.0, gt=0)
    workers: WorkerSettings = WorkerSettings()

    @model_validator(mode="after")
    def _peer_refs(self) -> Settings:
        names = [p.name for p in self.peers]
        if len(set(names)) != len(names):
            raise ValueError(f"peers: duplicate names in {names}")
        if self.results.send_to is not None and self.results.send_to not in names:
            raise ValueError(f"results.send_to: {self.results.send_to!r} is not a peer ({names})")
        unknown = sorted(set(self.results.outputs) - set(names))
        if unknown:
            raise ValueError(f"results.outputs: {unknown} not peer(s) ({names})")
        if self.catch_up.enabled and self.catch_up.peer not in names:
            raise ValueError(f"catch_up.peer: {self.catch_up.peer!r} is not a peer ({names})")
        if self.challenger_model_dir is not None and self.challenger_model_dir == self.model_dir:
            raise ValueError(
                f"challenger_model_dir: {str(self.challenger_model_dir)!r} is model_dir itself "
                "(name a second model directory, or null)"
            )
        return self

    def peer(self, name: str) -> Peer:
        for p in self.peers:
            if p.name == name:
                return p
        raise ConfigError(f"no peer named {name!r} (configured: {[p.name for p in self.peers]})")

    def resolve(self, base: Path) -> Settings:
        """Make relative paths (spool, model, outbox, sqlite file) relative to ``base``."""

        def fix(p: Path) -> Path:
            return p if p.is_absolute() else (base / p)

        storage = self.storage.model_copy(update={"spool_dir": fix(self.storage.spool_dir)})
        url = self.storage.database_url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            rel = url[len("sqlite:///") :]
            if rel and rel != ":memory:":
                storage = storage.model_copy(update={"database_url": f"sqlite:///{fix(Path(rel))}"})
        results = self.results
        if results.outbox_dir is not None:
            results = results.model_copy(update={"outbox_dir": fix(results.outbox_dir)})
        tls = self.security.tls
        tls = tls.model_copy(
            update={k: fix(v) for k, v in tls.model_dump().items() if k.endswith("_file") and v}
        )
        security = self.security.model_copy(update={"tls": tls})
        peers = [
            p
            if p.tls is None
            else p.model_copy(
                update={
                    "tls": p.tls.model_copy(
                        update={
                            k: fix(v)
                            for k, v in p.tls.model_dump().items()
                            if k.endswith("_file") and v
                        }
                    )
                }
            )
            for p in self.peers
        ]
        return self.model_copy(
            update={
                "storage": storage,
                "results": results,
                "model_dir": fix(self.model_dir),
                "challenger_model_dir": None
                if self.challenger_model_dir is None
                else fix(self.challenger_model_dir),
                "security": security,
                "peers": peers,
            }
        )


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per problem, "dotted.key = value: message", without pydantic's web links."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in error["loc"]) or "(top level)"
        value = error.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        lines.append(f"{loc} = {shown}: {error['msg']}")
    return lines


CONFIG_ENV = "TRIAGE_CONFIG"
DEFAULT_CONFIG = Path("config.yaml")


def config_path(given: str | Path | None) -> Path:
    """The config file to read: ``--config`` if given, else ``$TRIAGE_CONFIG``, else
    ``config.yaml`` in the current folder."""
    if given:
        return Path(given)
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_settings(path: Path, overrides: dict[str, object] | None = None) -> Settings:
    """Read and validate ``path``; relative paths in it are relative to the file's folder.

    Raises
    ------
    ConfigError
        With one line per problem, each naming the key (dotted path) and the bad value.
    """
    if not path.exists():
        raise ConfigError(
            f"{path}: no such file (give --config PATH, before or after the command, "
            f"or set {CONFIG_ENV})"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        target = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        lines = describe_errors(exc)
        raise ConfigError(f"{path}: invalid configuration:\n  " + "\n  ".join(lines)) from None
    return settings.resolve(path.resolve().parent)
