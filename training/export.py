"""Training stage, export: trained model -> ``models/<name>/<version>/`` with its evaluation.

Writes ``model.keras``, ``model.tflite`` (the same network for LiteRT, which the node runs
without TensorFlow; its measured agreement with Keras goes into ``model.json``'s ``tflite``),
``model.json`` (``node.model_spec.write_spec``), ``evaluation.json``, PNGs (confusion matrices,
ROC, training curves), the epoch logs and ``MODEL_CARD.md``.  Every
number comes from data the scored model did not train on: the held-out (test) patients of each
source, and held-out scores (leave-one-site-out and leave-one-patient-out) for the ``lopo``
sources.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from node import runtime
from node.model_spec import (
    MODEL_FILE,
    SPEC_FILE,
    TFLITE_FILE,
    ModelSpec,
    SeriesRule,
    TFLiteExport,
    file_sha256,
    load_spec,
    write_spec,
)
from node.preprocess import PREPROCESSING_VERSION
from node.spool import write_atomic
from training.config import TrainConfig
from training.dataset import Row, class_index
from training.evaluate import (
    classification_metrics,
    dicom_slice_auc,
    plot_confusion,
    plot_roc,
    plot_training_curves,
    subgroup_auc,
)
from training.features import NativeCache
from training.model_card import notice_for, write_model_card
from training.predict import predict_proba, series_score

logger = logging.getLogger(__name__)


EXPORT_PROBES = 8  # probe inputs (node.runtime.probe_inputs) measured at export, re-checked at load


def export_tflite(model: keras.Model, out_dir: Path, max_mb: float | None = None) -> TFLiteExport:
    """Write ``model.tflite`` (float32, the node's LiteRT runtime) beside ``model.keras``.

    Measures its agreement with Keras on ``EXPORT_PROBES`` probe inputs in the LiteRT
    interpreter the node uses; returns the record for ``model.json``'s ``tflite``.

    Raises
    ------
    ValueError
        If the conversion differs from Keras by more than ``node.runtime.TOLERANCE`` or the file
        is larger than ``max_mb`` (the file is then removed).
    """
    path = out_dir / TFLITE_FILE
    flatbuffer = runtime.convert_to_tflite(model)
    shape = tuple(model.input_shape[1:])
    probes = runtime.probe_inputs(shape, EXPORT_PROBES)
    expected = np.asarray(model(probes, training=False), dtype=np.float32)
    actual = runtime.TFLiteRunner(flatbuffer).predict(probes)
    diff = float(np.max(np.abs(actual - expected)))
    size_mb = len(flatbuffer) / 1e6
    if not diff <= runtime.TOLERANCE or (max_mb is not None and size_mb > max_mb):
        path.unlink(missing_ok=True)
        raise ValueError(
            f"{path}: not written: LiteRT differs from Keras by {diff:.2e} (at most "
            f"{runtime.TOLERANCE:g}), {size_mb:.1f} MB (at most {max_mb} MB)"
        )
    write_atomic(path, flatbuffer)
    path.chmod(0o644)  # shipped in the repository like model.keras
    found = runtime.versions()
    converter = next((f"{d} {v}" for d, v in found.items() if d.startswith("tensorflow")), "")
    record = TFLiteExport(
        sha256=file_sha256(path),
        keras_sha256=file_sha256(out_dir / MODEL_FILE),
        size_bytes=len(flatbuffer),
        max_abs_prob_diff=diff,
        probe_probabilities=expected.tolist(),
        converter=converter or f"tensorflow {keras.version()} (keras)",
        runtime=f"ai-edge-litert {found.get('ai-edge-litert', 'unknown')}",
    )
    logger.info("%s written (%.1f MB, max |p - p_keras| %.1e)", path, size_mb, diff)
    return record


def youden_threshold(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_curve

    if not 0 < y.sum() < len(y):
        return 0.5
    fpr, tpr, thr = roc_curve(y, s)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thr[best], 0.0, 1.0))


def held_out_series(
    rows: Sequence[Row], lung: np.ndarray, scores: dict[str, float], cfg: TrainConfig
) -> dict[str, dict[str, Any]]:
    """Series of the LOPO sources: label, selected slices' held-out scores, in z order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r.path in scores:
            groups[r.series_uid or r.patient_id].append(i)
    out = {}
    for uid, idx in sorted(groups.items()):
        idx = sorted(idx, key=lambda i: rows[i].z or 0.0)
        keep = [i for i in idx if lung[i] >= cfg.selection.min_lung_fraction]
        first = rows[idx[0]]
        positive = class_index(first.label, cfg.classes) == cfg.classes.index(cfg.positive_class)
        out[uid] = {
            "patient_id": first.patient_id,
            "source": first.source,
            "label": first.label,
            "positive": positive,
            "slices": len(idx),
            "selected": len(keep),
            "scores": [scores[rows[i].path] for i in keep],
        }
    return out


def choose_series_rule(
    series: dict[str, dict[str, Any]], candidates: Sequence[SeriesRule], min_slices: int
) -> tuple[SeriesRule, list[dict[str, Any]]]:
    """The candidate with the best LOPO balanced accuracy over series (mean of sensitivity and
    specificity, so calling every series negative cannot win just because most are negative),
    then the higher sensitivity (a triage aid should not miss), then the widest margin."""
    results = []
    for rule in candidates:
        verdicts: dict[str, dict[str, Any]] = {}
        margins: list[float] = []
        hits: dict[bool, list[bool]] = {True: [], False: []}
        for uid, s in series.items():
            if s["selected"] < min_slices:
                verdicts[uid] = {"patient_id": s["patient_id"], "rejected": True}
                continue
            score = series_score(np.asarray(s["scores"]), rule)
            called = score >= rule.series_threshold
            margins.append((score - rule.series_threshold) * (1 if s["positive"] else -1))
            hits[s["positive"]].append(called == s["positive"])
            verdicts[uid] = {
                "patient_id": s["patient_id"],
                "label": s["label"],
                "score": round(score, 4),
                "positive": bool(called),
                "correct": bool(called == s["positive"]),
            }
        sens = float(np.mean(hits[True])) if hits[True] else None
        spec = float(np.mean(hits[False])) if hits[False] else None
        balanced = float(np.mean([v for v in (sens, spec) if v is not None])) if margins else 0.0
        results.append(
            {
                "rule": rule.model_dump(exclude={"justification"}),
                "correct": sum(v.get("correct", False) for v in verdicts.values()),
                "scored": len(margins),
                "sensitivity": sens,
                "specificity": spec,
                "balanced_accuracy": balanced,
                "min_margin": min(margins) if margins else None,
                "verdicts": verdicts,
            }
        )
    if not results:
        raise ValueError("no series rule candidates")
    best = max(
        range(len(results)),
        key=lambda j: (
            results[j]["balanced_accuracy"],
            results[j]["sensitivity"] or 0.0,
            results[j]["min_margin"] if results[j]["min_margin"] is not None else -1.0,
        ),
    )
    return candidates[best], results


def _binary(
    y_pos: np.ndarray, s: np.ndarray, thr: float, pids: Sequence[str], positive: str
) -> dict[str, Any]:
    probs = np.c_[1.0 - s, s]
    return classification_metrics(
        y_pos.astype(int), probs, [f"not {positive}", positive], 1, thr, pids
    )


def evaluate_all(
    cfg: TrainConfig,
    model: keras.Model,
    rows: Sequence[Row],
    cache: NativeCache,
    usable: np.ndarray,
    held_out: dict[str, dict[str, float]],
    spec: ModelSpec,
    out_dir: Path,
) -> tuple[dict[str, Any], float, SeriesRule]:
    """Held-out metrics per source, the threshold and the chosen series rule.

    ``held_out``: protocol (``site``/``patient``) -> row path -> held-out positive score for the
    ``lopo`` sources; the series rule is chosen on ``cfg.holdout``'s scores."""
    pos_idx = spec.positive_index
    window = cfg.window.as_window()
    inputs = cache.inputs(
        range(len(rows)), cfg.input_size, window, crop=cfg.crop, normalise=cfg.normalise
    )
    probs = predict_proba(model, spec, inputs)
    labels = np.array(
        [class_index(r.label, cfg.classes) if u else -1 for r, u in zip(rows, usable, strict=True)]
    )
    val = [i for i, r in enumerate(rows) if r.split == "val" and usable[i]]
    thr = cfg.threshold.value
    if cfg.threshold.strategy == "youden_val" and val:
        thr = youden_threshold((labels[val] == pos_idx).astype(int), probs[val, pos_idx])
    report: dict[str, Any] = {
        "threshold": thr,
        "threshold_strategy": cfg.threshold.strategy,
        "sources": {},
    }
    curves = {}
    for src in cfg.sources:
        test = [
            i
            for i, r in enumerate(rows)
            if r.source == src.name and r.split == "test" and usable[i]
        ]
        entry: dict[str, Any] = {}
        if test:
            m = classification_metrics(
                labels[test],
                probs[test],
                cfg.classes,
                pos_idx,
                thr,
                [rows[i].patient_id for i in test],
            )
            if any(rows[i].subgroup for i in test):
                m["by_subgroup"] = subgroup_auc(
                    (labels[test] == pos_idx).astype(int),
                    probs[test, pos_idx],
                    [rows[i].subgroup for i in test],
                )
            entry["held_out_test"] = m
            curves[f"{src.name} test"] = (
                (labels[test] == pos_idx).astype(int),
                probs[test, pos_idx],
            )
            plot_confusion(
                m["confusion_matrix"],
                cfg.classes,
                out_dir / f"confusion_{src.name}.png",
                f"{src.name}: held-out test",
            )
            lung = [
                i
                for i in test
                if rows[i].kind == "dicom" and cache.lung[i] >= cfg.selection.min_lung_fraction
            ]
            if lung:
                entry["held_out_test_dicom_slices"] = dicom_slice_auc(
                    [rows[i] for i in lung], probs[lung, pos_idx]
                )
        for by, scores in held_out.items():
            held = [
                i
                for i, r in enumerate(rows)
                if r.source == src.name
                and r.path in scores
                and r.kind == "dicom"
                and cache.lung[i] >= cfg.selection.min_lung_fraction
            ]
            if held:
                s = np.array([scores[rows[i].path] for i in held])
                entry.setdefault("held_out_selected_slices", {})[by] = dicom_slice_auc(
                    [rows[i] for i in held], s
                )
                use = [j for j, i in enumerate(held) if usable[i]]
                y = np.array([labels[held[j]] == pos_idx for j in use])
                entry.setdefault("held_out_usable_slices", {})[by] = _binary(
                    y, s[use], thr, [rows[held[j]].patient_id for j in use], cfg.positive_class
                )
        if entry:
            report["sources"][src.name] = entry
    rule = cfg.series_rules[0]
    if held_out:
        report["held_out_protocol"] = cfg.holdout
        report["dicom_held_out"], report["series_verdicts_held_out"] = {}, {}
    for by, scores in held_out.items():
        held = [
            i
            for i, r in enumerate(rows)
            if r.path in scores
            and r.kind == "dicom"
            and cache.lung[i] >= cfg.selection.min_lung_fraction
        ]
        if not held:
            continue
        s = np.array([scores[rows[i].path] for i in held])
        sub = [rows[i] for i in held]
        report["dicom_held_out"][by] = dicom_slice_auc(sub, s)
        infected = np.array([r.label == "COVID-19" and r.slice_label != 0 for r in sub])
        negative = np.array([r.label != "COVID-19" for r in sub])
        keep = infected | negative
        curves[f"DICOM held out by {by}: infected vs non-COVID"] = (
            infected[keep].astype(int),
            s[keep],
        )
        series = held_out_series(rows, cache.lung, scores, cfg)
        if not series:
            continue
        chosen_rule, results = choose_series_rule(
            series, cfg.series_rules, cfg.selection.min_slices
        )
        chosen = next(
            r for r in results if r["rule"] == chosen_rule.model_dump(exclude={"justification"})
        )
        report["series_verdicts_held_out"][by] = chosen["verdicts"]
        if by != cfg.holdout:
            continue
        report["series_rule_candidates"] = results
        names = ", ".join(
            f"{v['patient_id']}={'pos' if v.get('positive') else 'neg'}"
            f"({v.get('score', 'rejected')})"
            for v in chosen["verdicts"].values()
        )
        rule = chosen_rule.model_copy(
            update={
                "justification": (
                    f"Chosen among {len(results)} candidate rules by held-out (by {by}) series "
                    f"verdicts on the Hounsfield DICOM series: balanced accuracy "
                    f"{chosen['balanced_accuracy']:.2f} (sensitivity {chosen['sensitivity']}, "
                    f"specificity {chosen['specificity']}; {chosen['correct']}/{chosen['scored']} "
                    f"correct): {names}. Selected on only {chosen['scored']} series, so it is "
                    "tuned "
                    "to them; see evaluation.json 'series_rule_candidates'."
                )
            }
        )
    if curves:
        plot_roc(curves, out_dir / "roc.png")
    return report, thr, rule


def export(
    cfg: TrainConfig,
    model: keras.Model,
    rows: Sequence[Row],
    cache: NativeCache,
    usable: np.ndarray,
    held_out: dict[str, dict[str, float]],
    work: Path,
) -> Path:
    out_dir = cfg.resolved(cfg.output_root) / cfg.name / cfg.version
    out_dir.mkdir(parents=True, exist_ok=True)
    # Rebuilt from its config, uncompiled: no optimizer state in the file.  (``clone_model``
    # carries a fine-tuned model's compiled optimizer over, which more than doubled the file.)
    clean = keras.Model.from_config(model.get_config())
    clean.set_weights(model.get_weights())
    clean.save(out_dir / MODEL_FILE)
    size_mb = (out_dir / MODEL_FILE).stat().st_size / 1e6
    if size_mb > cfg.max_model_mb:
        raise ValueError(f"{out_dir / MODEL_FILE}: {size_mb:.1f} MB > {cfg.max_model_mb} MB")
    spec = ModelSpec(
        name=cfg.name,
        version=cfg.version,
        classes=cfg.classes,
        positive_class=cfg.positive_class,
        input_size=cfg.input_size,
        window=cfg.window,
        crop=cfg.crop,
        normalise=cfg.normalise,
        preprocessing_version=PREPROCESSING_VERSION,
        selection=cfg.selection,
    )
    try:
        tflite: TFLiteExport | None = export_tflite(clean, out_dir, cfg.max_model_mb)
    except ValueError as exc:  # the node then converts at load, or runs Keras
        logger.warning("%s", exc)
        tflite = None
    report, thr, rule = evaluate_all(cfg, model, rows, cache, usable, held_out, spec, out_dir)
    for phase in ("head", "finetune"):
        for name in ("log.csv", "log.jsonl"):
            if (work / phase / name).is_file():
                shutil.copy(work / phase / name, out_dir / f"training_{phase}_{name}")
    plot_training_curves(out_dir / "training_head_log.csv", out_dir / "training_curves_head.png")
    plot_training_curves(
        out_dir / "training_finetune_log.csv", out_dir / "training_curves_finetune.png"
    )
    sources = []
    for src in cfg.sources:
        srows = [(r, u) for r, u in zip(rows, usable, strict=True) if r.source == src.name]
        sources.append(
            {
                "name": src.name,
                "path": str(src.path),
                "licence": src.licence,
                "citation": src.citation,
                "split": src.split,
                "lopo": src.lopo,
                "patients": len({r.patient_id for r, _ in srows}),
                "slices_trained_on": sum(1 for r, u in srows if u and r.split == "train"),
                "slices_validation": sum(1 for r, u in srows if u and r.split == "val"),
                "slices_held_out_test": sum(1 for r, u in srows if u and r.split == "test"),
            }
        )
    report["held_out_note"] = (
        "Held-out DICOM scores come from the phase-1 recipe (frozen backbone, head refitted "
        "without the site or the patient)"
        + (
            " ; the shipped model was fine-tuned further"
            if cfg.finetune.epochs
            else "; identical to the shipped model's recipe"
        )
    )
    (out_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    final = spec.model_copy(
        update={
            "threshold": thr,
            "series_rule": rule,
            "training_data": sources,
            "metrics": summarise(report),
            "backbone": "EfficientNet-Lite0 (ImageNet, Apache-2.0)"
            if cfg.backbone_weights
            else "EfficientNet-Lite0 (random init)",
            "training_config": cfg.model_dump(mode="json"),
            "notice": notice_for(report),
            "tflite": tflite,
        }
    )
    final = write_spec(out_dir, final)
    write_model_card(out_dir, final, report, sources)
    logger.info("model written to %s (%.1f MB)", out_dir, size_mb)
    return out_dir


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers for model.json."""
    out: dict[str, Any] = {}
    for name, entry in report.get("sources", {}).items():
        if "held_out_test" in entry:
            m = entry["held_out_test"]
            out[f"{name}_test"] = {
                k: m[k] for k in ("n", "accuracy", "roc_auc", "sensitivity", "specificity")
            }
    for by, d in report.get("dicom_held_out", {}).items():
        out[f"dicom_held_out_by_{by}"] = {
            k: d[k]
            for k in ("infected_vs_non_covid_auc", "infected_vs_non_covid_ci95", "n_infected")
        }
    for by, verdicts in report.get("series_verdicts_held_out", {}).items():
        out[f"series_verdicts_held_out_by_{by}"] = {
            v["patient_id"]: v.get("positive") for v in verdicts.values()
        }
    return out


def export_existing(model_dir: Path) -> TFLiteExport:
    """(Re-)export ``model.tflite`` for a model directory already written; in ``model.json``
    only the ``tflite`` key changes (every other key and their order kept)."""
    spec = load_spec(model_dir)
    model = keras.models.load_model(model_dir / MODEL_FILE, compile=False)
    if spec.sha256 and file_sha256(model_dir / MODEL_FILE) != spec.sha256:
        raise ValueError(f"{model_dir / MODEL_FILE}: sha256 differs from {SPEC_FILE}")
    record = export_tflite(model, model_dir)
    raw = json.loads((model_dir / SPEC_FILE).read_text())
    raw["tflite"] = record.model_dump(mode="json")
    (model_dir / SPEC_FILE).write_text(json.dumps(raw, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Export model.tflite for an existing model directory and record its agreement "
        "with Keras in model.json (key 'tflite')."
    )
    parser.add_argument("model_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    record = export_existing(args.model_dir)
    summary = record.model_dump(exclude={"probe_probabilities"})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
