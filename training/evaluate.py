"""Evaluation stage: a model directory + labelled slices or DICOM series -> metrics JSON and PNGs.

``python -m training.evaluate --model models/<name>/<version> --manifest data.csv`` (8-bit or
DICOM files listed in a CSV) or ``--dicom <folder>`` (DICOM series; the label comes from
``--label`` or from a folder name such as ``COVID``/``Normal``; a ``manifest.csv`` with
``slice_infection_label`` next to the files adds slice labels).  Scores come from
``training.predict`` -- the node's inference path -- on inputs from ``node.preprocess``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from node.model_spec import MODEL_FILE, ModelSpec, load_spec
from node.preprocess import Window, hounsfield, lung_fraction, read_dicom
from node.stats import auc_ci95, roc_auc
from training.dataset import (
    COVID,
    Row,
    canonical_label,
    class_index,
    labels_array,
    load_inputs,
    read_csv_manifest,
    read_dicom_series,
)
from training.features import NativeCache
from training.predict import predict_proba, series_verdict

logger = logging.getLogger(__name__)


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    return roc_auc(y, s)


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    positive_index: int,
    threshold: float,
    patient_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy, per-class P/R/F1, ROC AUC, confusion matrix, sens/spec at ``threshold``.

    With two classes the prediction is "positive when p(positive) >= threshold"; with more, the
    arg-max class.  Sensitivity/specificity are for the positive class against the rest.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    n = len(classes)
    pos = probs[:, positive_index]
    if n == 2:
        pred = np.where(pos >= threshold, positive_index, 1 - positive_index)
    else:
        pred = probs.argmax(axis=1)
    p, r, f, support = precision_recall_fscore_support(
        y_true, pred, labels=list(range(n)), zero_division=0
    )
    is_pos = (y_true == positive_index).astype(int)
    called = pos >= threshold
    out: dict[str, Any] = {
        "n": len(y_true),
        "accuracy": float((pred == y_true).mean()) if len(y_true) else None,
        "per_class": {
            c: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "roc_auc": _auc(is_pos, pos),
        "confusion_matrix": confusion_matrix(y_true, pred, labels=list(range(n))).tolist(),
        "threshold": threshold,
        "sensitivity": float(called[is_pos == 1].mean()) if is_pos.any() else None,
        "specificity": float((~called)[is_pos == 0].mean()) if (is_pos == 0).any() else None,
    }
    if n > 2:
        from sklearn.metrics import roc_auc_score

        present = np.unique(y_true)
        if len(present) == n:
            out["roc_auc_ovr_macro"] = float(roc_auc_score(y_true, probs, multi_class="ovr"))
    if patient_ids is not None:
        out["roc_auc_ci95"] = auc_ci95(is_pos, pos, patient_ids)
        out["per_patient"] = per_patient(y_true, pos, patient_ids, positive_index, threshold)
    return out


def subgroup_auc(
    is_pos: np.ndarray, pos: np.ndarray, subgroups: Sequence[str | None]
) -> dict[str, dict[str, Any]]:
    """For each subgroup of the positives (e.g. severity CT-1..CT-4): ROC AUC of its positives
    against all negatives, with counts; shows whether the model tracks how much disease shows."""
    negatives = is_pos == 0
    groups = sorted({g for g, p in zip(subgroups, is_pos, strict=True) if p and g})
    out = {}
    for g in groups:
        mine = np.array([s == g for s in subgroups]) & (is_pos == 1)
        keep = mine | negatives
        out[g] = {
            "n_positive": int(mine.sum()),
            "n_negative": int(negatives.sum()),
            "roc_auc_vs_negatives": _auc(mine[keep].astype(int), pos[keep]),
        }
    return out


def per_patient(
    y_true: np.ndarray,
    pos: np.ndarray,
    patient_ids: Sequence[str],
    positive_index: int,
    threshold: float,
) -> dict[str, dict[str, Any]]:
    """Per patient: slices, true positive-class membership, mean and max score, call at max."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, pid in enumerate(patient_ids):
        groups[pid].append(i)
    out = {}
    for pid, idx in sorted(groups.items()):
        s = pos[idx]
        out[pid] = {
            "slices": len(idx),
            "positive": bool((y_true[idx] == positive_index).any()),
            "mean_score": float(s.mean()),
            "max_score": float(s.max()),
            "called_positive": bool(s.max() >= threshold),
        }
    return out


def dicom_slice_auc(rows: Sequence[Row], pos: np.ndarray) -> dict[str, Any]:
    """Infected-slice AUC: slices of COVID-19 patients not marked uninfected vs non-COVID slices.

    Also against the slices of the patients labelled Normal only, where there are any.  Each AUC
    comes with its patient-bootstrap 95% interval (``auc_ci95``).
    """
    infected = np.array([r.label == COVID and r.slice_label != 0 for r in rows])
    negative = np.array([r.label != COVID for r in rows])
    normal = np.array([r.label in ("Normal", "non-COVID") for r in rows])
    out: dict[str, Any] = {"n_infected": int(infected.sum()), "n_non_covid": int(negative.sum())}
    keep = infected | negative
    pids = np.array([r.patient_id for r in rows])
    out["infected_vs_non_covid_auc"] = _auc(infected[keep].astype(int), pos[keep])
    out["infected_vs_non_covid_ci95"] = auc_ci95(
        infected[keep].astype(int), pos[keep], pids[keep].tolist()
    )
    keep = infected | normal
    out["infected_vs_normal_auc"] = _auc(infected[keep].astype(int), pos[keep])
    out["infected_vs_normal_ci95"] = auc_ci95(
        infected[keep].astype(int), pos[keep], pids[keep].tolist()
    )
    within = {}
    for pid in sorted({r.patient_id for r in rows if r.slice_label is not None}):
        idx = [i for i, r in enumerate(rows) if r.patient_id == pid and r.slice_label is not None]
        marked = np.array([rows[i].slice_label for i in idx])
        auc = _auc(marked, pos[idx])
        if auc is not None:
            within[pid] = {
                "auc": auc,
                "marked": int(marked.sum()),
                "unmarked": int(len(idx) - marked.sum()),
            }
    out["within_patient_marked_vs_unmarked_auc"] = within
    return out


# ----------------------------------------------------------------------------------------- plots


def plot_confusion(cm: list[list[int]], classes: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(np.asarray(cm), cmap="Blues")
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """``curves``: name -> (is_positive, score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (y, s) in curves.items():
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_training_curves(log_csv: Path, path: Path) -> bool:
    """Loss/accuracy per epoch from a Keras CSV log; False when there is no log."""
    if not log_csv.is_file():
        return False
    with open(log_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        for k in (key, f"val_{key}"):
            if k in rows[0]:
                ax.plot([float(r[k]) for r in rows], label=k)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------- evaluations


def evaluate_rows(
    model: Any,
    spec: ModelSpec,
    rows: Sequence[Row],
    batch_size: int = 32,
    rendered_window: Window | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of ``rows`` (8-bit or DICOM slices) and their positive-class scores.

    ``rendered_window``: the window an 8-bit source was rendered with, as given to training
    (``SourceConfig.rendered_window``); its images are then mapped back to approximate HU and
    rendered like DICOM, exactly as the model saw that source in training.
    """
    if rendered_window is None:
        inputs = load_inputs(
            rows, spec.input_size, spec.window.as_window(), spec.crop, spec.normalise
        )
    else:
        cache = NativeCache(rows, {r.source: rendered_window for r in rows})
        inputs = cache.inputs(
            range(len(rows)),
            spec.input_size,
            spec.window.as_window(),
            crop=spec.crop,
            normalise=spec.normalise,
        )
    probs = predict_proba(model, spec, inputs, batch_size)
    y = labels_array(rows, spec.classes)
    metrics = classification_metrics(
        y, probs, spec.classes, spec.positive_index, spec.threshold, [r.patient_id for r in rows]
    )
    return metrics, probs[:, spec.positive_index]


def evaluate_series(model: Any, spec: ModelSpec, rows: Sequence[Row]) -> dict[str, Any]:
    """Series verdicts (node path: HU -> lung selection -> ``hu_to_input`` -> rule)."""
    by_series: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_series[row.series_uid or row.patient_id].append(row)
    series, sel_rows, sel_scores = {}, [], []
    for uid, srows in sorted(by_series.items()):
        srows = sorted(srows, key=lambda r: r.z or 0.0)
        hus = [hounsfield(read_dicom(r.path)) for r in srows]
        keep = [
            i for i, hu in enumerate(hus) if lung_fraction(hu) >= spec.selection.min_lung_fraction
        ]
        entry: dict[str, Any] = {
            "patient_id": srows[0].patient_id,
            "label": srows[0].label,
            "slices": len(srows),
            "selected": len(keep),
        }
        if len(keep) < spec.selection.min_slices:
            entry["verdict"] = "rejected: too few lung slices"
        else:
            inputs = np.stack([spec.hu_to_input(hus[i]) for i in keep])
            scores = predict_proba(model, spec, inputs)[:, spec.positive_index]
            verdict = series_verdict(scores, spec.series_rule)
            expected = class_index(srows[0].label, spec.classes) == spec.positive_index
            entry.update(
                score=verdict.score, positive=verdict.positive, correct=verdict.positive == expected
            )
            sel_rows += [srows[i] for i in keep]
            sel_scores += scores.tolist()
        series[uid] = entry
    return {"series": series, "selected_slices": dicom_slice_auc(sel_rows, np.asarray(sel_scores))}


def dicom_rows(folder: Path, label: str | None) -> list[Row]:
    """DICOM series under ``folder``: from its ``manifest.csv`` if any, else by folder names."""
    manifest = folder / "manifest.csv"
    if manifest.is_file():
        return read_csv_manifest(manifest, folder.name)
    rows: list[Row] = []
    series_dirs = sorted({p.parent for p in folder.rglob("*") if p.is_file()})
    for d in series_dirs:
        found = label
        for part in reversed(d.relative_to(folder.parent).parts):
            try:
                found = found or canonical_label(part)
            except ValueError:
                continue
        if found is None:
            raise ValueError(f"{d}: no --label given and no label in its folder names")
        rows += read_dicom_series(d, canonical_label(found), source=folder.name)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="models/<name>/<version>")
    parser.add_argument("--manifest", type=Path, help="CSV: path,label[,patient_id]")
    parser.add_argument("--dicom", type=Path, help="folder of DICOM series")
    parser.add_argument("--label", help="label of every series under --dicom")
    parser.add_argument(
        "--rendered-window",
        nargs=2,
        type=float,
        metavar=("LEVEL", "WIDTH"),
        help="8-bit --manifest images were rendered from HU with this window "
        "(as the source's rendered_window in the training config)",
    )
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: no PNGs)")
    args = parser.parse_args(argv)
    if not (args.manifest or args.dicom):
        parser.error("give --manifest and/or --dicom")
    import keras

    spec = load_spec(args.model)
    model = keras.models.load_model(args.model / MODEL_FILE, compile=False)
    report: dict[str, Any] = {"model": f"{spec.name}/{spec.version}"}
    curves = {}
    if args.manifest:
        rows = read_csv_manifest(args.manifest)
        rendered = Window(*args.rendered_window) if args.rendered_window else None
        report["manifest"], scores = evaluate_rows(model, spec, rows, rendered_window=rendered)
        y = labels_array(rows, spec.classes)
        curves["manifest"] = ((y == spec.positive_index).astype(int), scores)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            plot_confusion(
                report["manifest"]["confusion_matrix"],
                spec.classes,
                args.out / "confusion_matrix.png",
                str(args.manifest.name),
            )
    if args.dicom:
        report["dicom"] = evaluate_series(model, spec, dicom_rows(args.dicom, args.label))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        if curves:
            plot_roc(curves, args.out / "roc.png")
        for phase in ("head", "finetune"):
            plot_training_curves(
                args.model / f"training_{phase}_log.csv", args.out / f"training_curves_{phase}.png"
            )
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
