"""Training stage, research aid: compare rendering/data choices quickly on cached Lite0 features.

``python -m training.ablation --config training/configs/shipped.yaml --tag lung_pseudo
--set '{"input_size": 160}' --aug 1 --drop ucsd --dicom-weight 3``

Builds (or reuses, under ``/tmp/ablation/<tag>``) the phase-1 feature cache of the config with
the overrides, then fits a class-balanced logistic regression on standardised features instead of
the Keras head (seconds per fit, so leave-one-patient-out over the DICOM patients is cheap) and
prints one JSON line: UCSD/MosMed held-out ROC AUC, DICOM infected-slice AUC (LOPO), the
within-patient marked-vs-unmarked AUC and the top-5-mean series scores.  It ranks choices; the
shipped numbers come from ``training.train``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from training.config import TrainConfig
from training.dataset import COVID

DICOM_SOURCES = ("covid_ct_md", "midrc_ricord", "tcia_lung_dx")


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(y, s)), 3) if 0 < y.sum() < len(y) else None


def run(
    cfg: TrainConfig, aug: bool, drop: list[str], dicom_weight: float, c: float
) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    from training.backbone import lite0_weights_path
    from training.features import NativeCache
    from training.model import build_classifier, embedding_model
    from training.train import Phase1, collect_rows

    rows = collect_rows(cfg)
    cache = NativeCache(
        rows,
        {
            s.name: s.rendered_window.as_window()
            for s in cfg.sources
            if s.rendered_window is not None
        },
    )
    model = build_classifier(2, cfg.input_size, lite0_weights_path())
    p1 = Phase1(cfg, rows, cache, embedding_model(model), cfg.resolved(cfg.work_dir))
    y = np.array([r.label == COVID for r in rows], int)
    src = np.array([r.source for r in rows])
    split = np.array([r.split for r in rows])
    pid = np.array([r.patient_id for r in rows])
    tidx = np.array(p1.train_idx)
    reps = 1 + len(p1.aug_feats) if aug else 1
    x_all = np.concatenate([p1.base[tidx], *p1.aug_feats]) if aug else p1.base[tidx]
    y_tr, s_tr, p_tr = (np.tile(a[tidx], reps) for a in (y, src, pid))
    use = ~np.isin(s_tr, drop)

    def fit(exclude: str | None) -> Any:
        m = use & (p_tr != exclude)
        mu, sd = x_all[m].mean(0), x_all[m].std(0) + 1e-3
        w = np.where(y_tr[m] == 1, 0.5 / y_tr[m].mean(), 0.5 / (1 - y_tr[m].mean()))
        w = w * np.where(np.isin(s_tr[m], DICOM_SOURCES), dicom_weight, 1.0)
        lr = LogisticRegression(C=c, max_iter=300, tol=1e-3)
        lr.fit((x_all[m] - mu) / sd, y_tr[m], sample_weight=w)
        return lambda f: lr.predict_proba((f - mu) / sd)[:, 1]

    out: dict[str, Any] = {"aug": aug, "drop": drop, "dicom_weight": dicom_weight, "C": c}
    predict = fit(None)
    for name in ("ucsd", "mosmed"):
        te = (src == name) & (split == "test")
        if te.any():
            out[f"{name}_test_auc"] = _auc(y[te], predict(p1.base[te]))
    scores = np.zeros(len(rows))
    dic = np.isin(src, DICOM_SOURCES)
    for patient in sorted(set(pid[dic])):
        scores[pid == patient] = fit(patient)(p1.base[pid == patient])
    lung = cache.lung >= cfg.selection.min_lung_fraction
    infected = np.array([r.label == COVID and r.slice_label != 0 for r in rows])
    keep = dic & lung & (infected | (y == 0))
    out["dicom_lopo_infected_auc"] = _auc(infected[keep].astype(int), scores[keep])
    marked = np.array([-1 if r.slice_label is None else r.slice_label for r in rows])
    for patient in sorted(set(pid[dic & (marked >= 0)])):
        m = (pid == patient) & lung & (marked >= 0)
        out[f"within_{patient}"] = _auc(marked[m], scores[m])
    out["series_top5"] = {
        q: round(float(np.sort(scores[(pid == q) & lung])[::-1][:5].mean()), 3)
        for q in sorted(set(pid[dic]))
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.ablation", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--tag", required=True, help="feature cache name under /tmp/ablation")
    parser.add_argument("--set", default="{}", help="JSON overrides of the config")
    parser.add_argument("--aug", type=int, default=1, help="use the augmented renderings")
    parser.add_argument("--drop", nargs="*", default=[], help="sources left out of training")
    parser.add_argument("--dicom-weight", type=float, default=1.0)
    parser.add_argument("--C", type=float, default=0.1, help="inverse L2 strength")
    args = parser.parse_args(argv)
    data = yaml.safe_load(args.config.read_text())
    data.update(json.loads(args.set))
    data["work_dir"] = f"/tmp/ablation/{args.tag}"
    result = run(
        TrainConfig.model_validate(data), bool(args.aug), args.drop, args.dicom_weight, args.C
    )
    print(json.dumps({"tag": args.tag, "set": json.loads(args.set), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
