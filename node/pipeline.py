"""Pipeline stage: ``run_job`` reads top to bottom, one call per step.

analyse (check -> select lung slices -> preprocess -> infer -> reduce) -> report -> send -> record.
A series that cannot be analysed still gets an SR that says why; only delivery is retried.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from node import challenger, drift, jobs, lungs, metrics, opacity, outputs
from node.assess import assess
from node.config import Settings
from node.db import Instance, Job, JobStage, JobState
from node.errors import InferenceFailed, NodeError, SendFailed, SeriesRejected
from node.figures import KeyImage, draw_key_slices
from node.infer import LoadedModel, reduce_scores, score_slices
from node.report import PredecessorRef
from node.send import store_files
from node.series_check import SliceRef, order_and_check, read_headers
from node.spool import Spool
from node.summary import MIN_SECTION_SHARE, Curves
from node.verdict import SeriesVerdict, SliceScore

logger = logging.getLogger(__name__)


@dataclass
class Context:
    """What a worker needs, built once per process."""

    settings: Settings
    sessions: sessionmaker[Any]
    spool: Spool
    model: LoadedModel
    challenger: LoadedModel | None = None  # analysed in shadow, never sent (node.challenger)


@dataclass(frozen=True)
class Analysis:
    """One series analysed: the verdict, the headers (the evidence of every result object) and,
    when asked for, what the summary image draws."""

    verdict: SeriesVerdict
    evidence: list[pydicom.Dataset]
    key_images: tuple[KeyImage, ...] = ()
    curves: Curves = field(default_factory=Curves)


def analyse_files(
    paths: list[Path], model: LoadedModel, settings: Settings, *, series_version: int = 1
) -> tuple[SeriesVerdict, list[pydicom.Dataset]]:
    """Analyse one series from files; never raises for a bad series (verdict says why).

    Returns the verdict and the headers of the series' slices (the SR's evidence).
    """
    analysis = analyse_series(paths, model, settings, series_version=series_version)
    return analysis.verdict, analysis.evidence


def analyse_series(
    paths: list[Path],
    model: LoadedModel,
    settings: Settings,
    *,
    series_version: int = 1,
    draw: bool = False,
) -> Analysis:
    """Analyse one series from files; never raises for a bad series (the verdict says why).

    Parameters
    ----------
    paths
        The series' files.
    model, settings
        The loaded model and the node's settings.
    series_version
        Version of the series content, carried into the verdict (and the result UIDs).
    draw
        Also draw what the summary image shows: the key slices with the lung outlines and the
        opacity map (``figures.draw_key_slices``, from the masks just measured) and the slice PO
        and CNN score along the body axis.  A drawing that fails is logged and left out; the
        verdict stands.

    Returns
    -------
    Analysis
        The verdict, the headers of the series' slices (the evidence of every result object)
        and, with ``draw``, the drawings.
    """
    headers = read_headers(paths)
    evidence = [ds for _, ds in headers]
    first = evidence[0] if evidence else pydicom.Dataset()
    base: dict[str, Any] = {
        "study_instance_uid": str(first.get("StudyInstanceUID", "")),
        "series_instance_uid": str(first.get("SeriesInstanceUID", "")),
        "series_version": series_version,
        "algorithm": model.algorithm,
        "classes": tuple(model.spec.classes),
        "slices_total": len(paths),
        "analysis_version": analysis_version(model),
    }
    try:
        slices = order_and_check(
            headers,
            require_axial=settings.analysis.require_axial,
            max_gap_factor=settings.analysis.max_gap_factor,
        )
        volume, geometry, padding = lungs.read_volume(slices)
        masks, quantification, scores = _measure(volume, geometry, padding, slices, model, settings)
        reduction = reduce_scores(model.spec, scores)
    except (SeriesRejected, InferenceFailed) as exc:
        return Analysis(SeriesVerdict(analysed=False, reason=str(exc), **base), evidence)
    except (ValueError, ArithmeticError, IndexError, MemoryError, cv2.error) as exc:
        # a series the analysis did not foresee still gets an SR that says so (never silence)
        logger.exception("series %s: analysis failed", base["series_instance_uid"])
        reason = f"analysis failed ({type(exc).__name__}: {exc}); please report this series"
        return Analysis(SeriesVerdict(analysed=False, reason=reason, **base), evidence)
    spec = model.spec.analysis
    verdict = SeriesVerdict(
        analysed=True,
        finding=reduction.finding,
        probabilities=reduction.probabilities,
        series_score=reduction.series_score,
        rule=reduction.rule,
        slices_analysed=len(scores),
        top_slices=reduction.top_slices,
        quantification=quantification,
        assessment=assess(quantification, spec, reduction.series_score),
        key_slices=key_slices(slices, quantification),
        coverage=coverage_caveats(quantification, geometry, spec.min_extent_mm),
        **base,
    )
    if not draw:
        return Analysis(verdict, evidence)
    section = masks.lungs.sum(axis=(1, 2))
    curves = Curves(
        slice_po=tuple(
            (r.z, po)
            for r, po, area in zip(slices, quantification.slice_po, section, strict=True)
            if area >= MIN_SECTION_SHARE * section.max()
        ),
        cnn=tuple((s.z, s.positive_score) for s in scores),
    )
    window = model.spec.window.as_window()
    try:
        drawn = draw_key_slices(volume, masks, slices, verdict.key_slices, window)
    except (ValueError, ArithmeticError, IndexError, MemoryError, cv2.error):
        logger.exception("series %s: key slices not drawn", base["series_instance_uid"])
        drawn = ()
    return Analysis(verdict, evidence, drawn, curves)


def _measure(
    volume: np.ndarray,
    geometry: lungs.Geometry,
    padding: float | None,
    slices: list[SliceRef],
    model: LoadedModel,
    settings: Settings,
) -> tuple[lungs.LungMasks, opacity.Quantification, list[SliceScore]]:
    """The two measurements of a read series, at once: the CNN scores its lung slices in a
    second thread (LiteRT and numpy release the GIL) while this one segments the lungs and
    quantifies opacity.  On 2 cores this took 4.7 s down to 3.1 s for a 300-slice series, the
    numbers identical (``python -m bench.analysis``).  The Hounsfield analysis's refusal comes
    first, as when the two ran one after the other; the CNN's refusal or failure comes next.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnn") as pool:
        cnn = pool.submit(score_slices, model, slices, settings.analysis.batch_size, volume=volume)
        masks = lungs.segment(volume, geometry, padding_hu=padding)
        quantification = opacity.quantify(masks)
        check_coverage(quantification, settings.analysis.min_lung_extent_mm)
        scores, _ = cnn.result()
    return masks, quantification, scores


def analysis_version(model: LoadedModel) -> str:
    """Versions of every stage that made the verdict: part of every SR and the database row."""
    return (
        f"lungs {lungs.SEGMENTATION_VERSION}, opacity {opacity.QUANTIFICATION_VERSION}, "
        f"assessment {model.spec.analysis.version}"
    )


KEY_SLICES = 3
KEY_SLICE_SEPARATION_MM = 20.0
SPARSE_SPACING_MM = 5.0


def key_slices(slices: list[SliceRef], q: opacity.Quantification) -> tuple[SliceScore, ...]:
    """The slices with the most opacity by volume, at most ``KEY_SLICES``, at least
    ``KEY_SLICE_SEPARATION_MM`` apart so that they show different parts of the disease; the
    score each carries is that slice's PO (%).  By volume, not PO: a sliver of lung at the apex
    with one blob in it has a large PO and nothing to show."""
    order = sorted(range(len(slices)), key=lambda i: q.slice_opacity_ml[i], reverse=True)
    picked: list[int] = []
    for i in order:
        if len(picked) == KEY_SLICES or q.slice_opacity_ml[i] <= 0:
            break
        if all(abs(slices[i].z - slices[j].z) >= KEY_SLICE_SEPARATION_MM for j in picked):
            picked.append(i)
    return tuple(
        SliceScore(
            sop_instance_uid=slices[i].sop_instance_uid,
            sop_class_uid=slices[i].sop_class_uid,
            z=slices[i].z,
            probabilities=(),
            positive_score=q.slice_po[i],
        )
        for i in picked
    )


def check_coverage(q: opacity.Quantification, min_lung_extent_mm: float) -> None:
    """Refuse a series whose lungs are seen over less than ``min_lung_extent_mm`` along z.

    Two thresholds: below this one (``analysis.min_lung_extent_mm`` in config.yaml, 20 mm by
    default: a few thin slices, or one slice of a series every 10 mm) PO describes a sliver, not
    a patient, and the SR says "not analysed"; below the model's ``analysis.min_extent_mm``
    (100 mm) the series is analysed and ``coverage_caveats`` says the figures describe that slab
    only (the 10 x 3 mm RICORD slabs, whose flags were right).  Sparse slices are never refused,
    only caveated (TCIA A0001, 5 mm every 10 mm, read right).

    Raises
    ------
    SeriesRejected
        With the extent found and the minimum.
    """
    if q.extent_mm < min_lung_extent_mm:
        raise SeriesRejected(
            f"partial coverage: lungs seen over {q.extent_mm:.0f} mm along the body axis, "
            f"under the minimum of {min_lung_extent_mm:.0f} mm (analysis.min_lung_extent_mm)"
        )


def coverage_caveats(
    q: opacity.Quantification, geometry: lungs.Geometry, min_extent_mm: float
) -> tuple[str, ...]:
    """What the series does not cover well enough for a whole-chest reading, in words."""
    caveats = []
    if q.extent_mm < min_extent_mm:
        caveats.append(
            f"partial coverage: lungs seen over {q.extent_mm:.0f} mm along the body axis "
            f"(a whole chest is about 250 mm; under {min_extent_mm:.0f} mm the figures describe "
            "this slab only)"
        )
    if geometry.spacing[0] > SPARSE_SPACING_MM:
        caveats.append(
            f"sparse slices every {geometry.spacing[0]:.1f} mm: small opacities between "
            "slices are missed and partial volume raises PO"
        )
    return tuple(caveats)


def run_job(job: jobs.ClaimedJob, ctx: Context) -> str:
    """Run the claimed stage of one job; return the job's new state.  Never raises.

    One stage per claim: an analysis ends with the job queued for delivery (``jobs.analysed``),
    which the next claim runs as its own attempt.
    """
    try:
        if job.stage == JobStage.ANALYSE:
            analyse_and_report(job, ctx)
            return JobState.QUEUED
        state = deliver(job, Path(_job_row(ctx, job.job_id).sr_path), ctx)
        if ctx.challenger is not None:  # after the live results' first delivery attempt
            challenger.shadow_analyse(job, ctx)
        return state
    except OSError as exc:  # disk full, spool unreadable: transient, retry with backoff
        state = jobs.attempt_failed(ctx.sessions, job, str(exc), ctx.settings.results.retry)
        logger.warning(
            "job %d series %s: %s failed (attempt %d of %d, now %s): %s",
            job.job_id,
            job.series_instance_uid,
            job.stage,
            job.attempts,
            ctx.settings.results.retry.max_attempts,
            state,
            exc,
        )
        return state
    except Exception as exc:  # the one place that catches everything: record it, never crash
        logger.exception("job %d series %s failed", job.job_id, job.series_instance_uid)
        jobs.failed(ctx.sessions, job.job_id, f"{type(exc).__name__}: {exc}")
        return JobState.FAILED


def analyse_and_report(job: jobs.ClaimedJob, ctx: Context) -> Path:
    """Analyse the series version of ``job``, write its result objects (``node.outputs``: the
    SR, and the key images, summary image and text SR its destination gets), record the
    verdict; return the SR's path (the others lie beside it)."""
    started = time.perf_counter()
    results = ctx.settings.results
    paths = series_paths(ctx, job.series_id)
    analysis = analyse_series(
        paths,
        ctx.model,
        ctx.settings,
        series_version=job.series_version,
        draw="summary" in outputs.kinds_to_build(results),
    )
    verdict = analysis.verdict
    objects = outputs.build_outputs(analysis, results, predecessor=_predecessor(ctx, job))
    sr = objects["sr"]
    sr_path = outputs.write_outputs(objects, ctx.spool.results)
    if results.outbox_dir is not None:
        results.outbox_dir.mkdir(parents=True, exist_ok=True)
        for obj in outputs.stored_objects(sr_path):
            shutil.copyfile(obj.path, results.outbox_dir / obj.path.name)
    elapsed = time.perf_counter() - started
    metrics.ANALYSIS_SECONDS.observe(elapsed)
    jobs.analysed(
        ctx.sessions,
        job.job_id,
        analysed=int(verdict.analysed),
        finding=verdict.category,
        series_score=verdict.series_score,
        verdict_json=json.dumps(verdict.as_json()),
        model_name=ctx.model.spec.name,
        model_version=ctx.model.spec.version,
        sr_series_uid=str(sr.SeriesInstanceUID),
        sr_sop_instance_uid=str(sr.SOPInstanceUID),
        sr_path=str(sr_path),
        analysis_s=elapsed,
    )
    drift.record_inputs(ctx.sessions, job.job_id, analysis.evidence)
    logger.info(
        "job %d series %s v%d: %s (%s) in %.1f s, %d/%d slices, SR %s (with %s)",
        job.job_id,
        job.series_instance_uid,
        job.series_version,
        verdict.category,
        f"PO {verdict.quantification.total.po:.2f}%, CNN score {verdict.series_score:.3f}"
        if verdict.analysed and verdict.quantification and verdict.series_score is not None
        else verdict.reason,
        elapsed,
        verdict.slices_analysed,
        verdict.slices_total,
        sr.SOPInstanceUID,
        ", ".join(k for k in objects if k != "sr") or "nothing else",
    )
    return sr_path


def deliver(job: jobs.ClaimedJob, sr_path: Path, ctx: Context) -> str:
    """Send the result objects written with the SR at ``sr_path`` to the configured peer, as
    its profile says and it accepts (``outputs.chooser``), in one association: one attempt of
    the claimed ``deliver`` stage, retried with backoff on failure (``jobs.attempt_failed``).
    Every attempt sends the whole set: the PACS keeps one copy of each.  In shadow mode
    (``results.mode: shadow``) nothing is sent: the job ends done, marked (``jobs.shadowed``)."""
    target = ctx.settings.results.send_to
    if target is None:
        jobs.finished_without_delivery(ctx.sessions, job.job_id)
        return JobState.DONE
    if ctx.settings.results.mode == "shadow":
        jobs.shadowed(ctx.sessions, job.job_id, target)
        logger.info(
            "job %d series %s: shadow mode, nothing sent to %s (result objects kept in %s)",
            job.job_id,
            job.series_instance_uid,
            target,
            sr_path.parent,
        )
        return JobState.DONE
    try:
        peer = ctx.settings.peer(target)
        stored = outputs.stored_objects(sr_path)
        choose = outputs.chooser(stored, outputs.profile_for(ctx.settings.results, target), peer)
        sent = store_files(
            [o.path for o in stored], peer, ctx.settings.node.ae_title, choose=choose
        )
    except (SendFailed, NodeError, OSError) as exc:
        metrics.DELIVERY_FAILURES.inc()
        state = jobs.attempt_failed(ctx.sessions, job, str(exc), ctx.settings.results.retry)
        logger.warning(
            "job %d series %s: delivery to %s failed (attempt %d of %d, now %s): %s",
            job.job_id,
            job.series_instance_uid,
            target,
            job.attempts,
            ctx.settings.results.retry.max_attempts,
            state,
            exc,
        )
        return state
    jobs.delivered(ctx.sessions, job.job_id)
    kinds = {o.path: o.kind for o in stored}
    logger.info(
        "job %d series %s: %s delivered to %s",
        job.job_id,
        job.series_instance_uid,
        ", ".join(kinds[p] for p in sent),
        target,
    )
    return JobState.DONE


def _job_row(ctx: Context, job_id: int) -> Job:
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def series_paths(ctx: Context, series_id: int) -> list[Path]:
    """The spooled (not purged) files of a series."""
    with ctx.sessions() as session:
        rows = session.scalars(
            select(Instance.path).where(Instance.series_id == series_id, Instance.purged == 0)
        ).all()
    return [Path(p) for p in rows]


def _predecessor(ctx: Context, job: jobs.ClaimedJob) -> PredecessorRef | None:
    """The SR of the latest earlier version of this series, if one was made."""
    with ctx.sessions() as session:
        previous = session.scalars(
            select(Job)
            .where(
                Job.series_id == job.series_id,
                Job.series_version < job.series_version,
                Job.sr_sop_instance_uid != "",
            )
            .order_by(Job.series_version.desc())
        ).first()
    if previous is None:
        return None
    return PredecessorRef(
        sop_instance_uid=previous.sr_sop_instance_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
        series_instance_uid=previous.sr_series_uid,
        study_instance_uid=job.study_instance_uid,
    )
