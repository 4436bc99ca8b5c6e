"""Champion / challenger: a second model analysed in shadow beside the live one, and promotion.

``challenger_model_dir`` (config.yaml) names a second model directory.  After the live model's
result objects have had their first delivery attempt (``shadow_analyse``, called by
``pipeline.run_job``), the challenger analyses the same files of the same job; its verdict is
recorded (:class:`node.db.ChallengerResult`) and never written as an SR nor sent.  The live SR
is therefore never delayed by the challenger, and a failing challenger never fails a job.

``triage-node promote`` (``promote``) swaps ``model_dir`` and ``challenger_model_dir`` in
config.yaml: the challenger becomes the live model at the next start and the former live model
keeps being measured in shadow beside it (promote again to roll back; ``--retire`` sets
``challenger_model_dir: null`` instead).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from node.config import Settings, load_settings
from node.db import ChallengerResult
from node.errors import ConfigError, ModelError
from node.infer import LoadedModel, load_model
from node.model_spec import load_spec

if TYPE_CHECKING:
    from node.jobs import ClaimedJob
    from node.pipeline import Context

logger = logging.getLogger(__name__)

SETTING = "challenger_model_dir"


def load_challenger(settings: Settings) -> LoadedModel | None:
    """The challenger model, or None when ``challenger_model_dir`` is not set.

    Raises
    ------
    ModelError
        Naming ``challenger_model_dir`` and what is wrong with the directory.
    """
    if settings.challenger_model_dir is None:
        return None
    try:
        model = load_model(
            settings.challenger_model_dir,
            runtime=settings.analysis.runtime,
            cache_dir=settings.storage.spool_dir / ".models",
        )
    except ModelError as exc:
        text = str(exc)
        raise ModelError(text if text.startswith(SETTING) else f"{SETTING}: {text}") from None
    logger.info(
        "challenger %s %s analyses every series in shadow (recorded, never sent)",
        model.spec.name,
        model.spec.version,
    )
    return model


def check_challenger(settings: Settings) -> str | None:
    """Validate ``challenger_model_dir`` without loading the network (``check-config``)."""
    if settings.challenger_model_dir is None:
        return None
    try:
        spec = load_spec(settings.challenger_model_dir, SETTING)
    except ModelError as exc:
        text = str(exc)
        raise ModelError(text if text.startswith(SETTING) else f"{SETTING}: {text}") from None
    return f"{spec.name} {spec.version}"


def _already_recorded(ctx: Context, job_id: int, model: LoadedModel) -> bool:
    with ctx.sessions() as session:
        return (
            session.scalars(
                select(ChallengerResult.id).where(
                    ChallengerResult.job_id == job_id,
                    ChallengerResult.model_name == model.spec.name,
                    ChallengerResult.model_version == model.spec.version,
                )
            ).first()
            is not None
        )


def shadow_analyse(job: ClaimedJob, ctx: Context) -> bool:
    """Analyse ``job``'s series with the challenger and record its verdict, once per job and
    challenger version; return whether a verdict was recorded now.  Never raises: the live
    job's outcome does not depend on the challenger."""
    model = ctx.challenger
    if model is None:
        return False
    try:
        if _already_recorded(ctx, job.job_id, model):
            return False
        return _analyse_and_record(job, ctx, model)
    except Exception:  # the challenger must never fail the live job: logged, left out
        logger.exception(
            "job %d series %s: challenger (%s) failed; the live result is not affected",
            job.job_id,
            job.series_instance_uid,
            ctx.settings.challenger_model_dir,
        )
        return False


def _analyse_and_record(job: ClaimedJob, ctx: Context, model: LoadedModel) -> bool:
    from node.pipeline import analyse_series, series_paths  # pipeline imports this module

    started = time.perf_counter()
    analysis = analyse_series(
        series_paths(ctx, job.series_id), model, ctx.settings, series_version=job.series_version
    )
    verdict = analysis.verdict
    elapsed = time.perf_counter() - started
    try:
        with ctx.sessions.begin() as session:
            session.add(
                ChallengerResult(
                    job_id=job.job_id,
                    model_name=model.spec.name,
                    model_version=model.spec.version,
                    analysed=int(verdict.analysed),
                    finding=verdict.category,
                    series_score=verdict.series_score,
                    verdict_json=json.dumps(verdict.as_json()),
                    error="" if verdict.analysed else verdict.reason,
                    analysis_s=elapsed,
                )
            )
    except IntegrityError:  # another worker recorded it meanwhile
        return False
    logger.info(
        "job %d series %s: challenger %s %s says %s in %.1f s (recorded, not sent)",
        job.job_id,
        job.series_instance_uid,
        model.spec.name,
        model.spec.version,
        verdict.category,
        elapsed,
    )
    return True


# --- promotion ------------------------------------------------------------------------------


def _line_re(key: str) -> re.Pattern[str]:
    # a top-level key: value line; group 2 the value, group 3 a trailing comment
    return re.compile(rf"^({key}:[ \t]*)([^#\n]*?)([ \t]+#[^\n]*)?$", re.MULTILINE)


@dataclass(frozen=True)
class Promotion:
    config: Path
    backup: Path
    live_before: str
    live_after: str
    challenger_after: str | None


def _value(text: str, key: str, config: Path) -> str | None:
    matches = list(_line_re(key).finditer(text))
    if len(matches) > 1:
        raise ConfigError(f"{config}: {key} appears {len(matches)} times at the top level")
    if not matches:
        return None
    value = matches[0].group(2).strip().strip("\"'")
    return None if value in ("", "null", "~") else value


def _set(text: str, key: str, value: str) -> str:
    pattern = _line_re(key)
    if pattern.search(text):
        return pattern.sub(lambda m: f"{m.group(1)}{value}{m.group(3) or ''}", text, count=1)
    return text.rstrip("\n") + f"\n{key}: {value}\n"


def promote(config: Path, *, retire: bool = False) -> Promotion:
    """Make the challenger the live model in ``config`` (see the module docstring).

    Only the ``model_dir:`` and ``challenger_model_dir:`` lines change (comments and everything
    else kept); the result is validated (settings and both model directories) before it
    replaces the file atomically, the old file kept as ``<config>.bak``.

    Raises
    ------
    ConfigError
        No challenger configured, or the new file would not be valid.
    ModelError
        The challenger's model directory is not a valid model.
    """
    try:
        text = config.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{config}: cannot read: {exc}") from exc
    live = _value(text, "model_dir", config)
    challenger = _value(text, SETTING, config)
    if challenger is None:
        raise ConfigError(f"{config}: {SETTING} is not set: there is no challenger to promote")
    if live is None:
        raise ConfigError(f"{config}: model_dir is not set at the top level: cannot swap it")
    check_challenger(load_settings(config))  # the model to be promoted, named as configured
    new = _set(text, "model_dir", challenger)
    new = _set(new, SETTING, "null" if retire else live)
    fd, tmp_name = tempfile.mkstemp(prefix=".promote-", suffix=".yaml", dir=config.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(new)
            fh.flush()
            os.fsync(fh.fileno())
        settings = load_settings(tmp)
        load_spec(settings.model_dir)
        check_challenger(settings)
        os.chmod(tmp, config.stat().st_mode & 0o777)
        backup = config.with_name(config.name + ".bak")
        shutil.copy2(config, backup)
        os.replace(tmp, config)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("promoted %s to model_dir in %s (was %s)", challenger, config, live)
    return Promotion(config, backup, live, challenger, None if retire else live)


def describe(promotion: Promotion) -> str:
    after = promotion.challenger_after
    return (
        f"{promotion.config}: model_dir {promotion.live_before} -> {promotion.live_after}; "
        f"challenger_model_dir -> {after or 'null'}"
        + (" (the former live model stays in shadow: promote again to roll back)" if after else "")
        + f"\nprevious file kept as {promotion.backup}\n"
        "restart the node (e.g. `systemctl restart triage-node`) for the change to take effect;"
        " results already sent are not sent again"
    )
