"""Statistics shared by local performance (``node.performance``) and training evaluation.

numpy only, so the node can report its local performance without the training dependencies:
the ROC AUC as the Mann-Whitney statistic (ties count one half, as scikit-learn computes it) and
its patient-clustered bootstrap interval.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def roc_auc(y: np.ndarray, s: np.ndarray) -> float | None:
    """ROC AUC of scores ``s`` for binary labels ``y``; None when a class is absent."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # average 1-based rank of each score among all: ties share the mean of their positions
    sorted_s = np.sort(s)
    ranks = (
        np.searchsorted(sorted_s, s, "left") + np.searchsorted(sorted_s, s, "right") + 1
    ) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_ci95(
    y: np.ndarray, s: np.ndarray, patient_ids: Sequence[str], n_boot: int = 2000, seed: int = 0
) -> list[float] | None:
    """95% interval of the ROC AUC by a patient-clustered, class-stratified bootstrap.

    Slices of one patient are not independent, so patients (not slices) are resampled with
    replacement, separately among patients with and without positive slices; ``None`` when
    either group has fewer than two patients.  With few patients the interval is wide, which is
    the point: it says how much a held-out AUC on this data can be trusted.
    """
    y = np.asarray(y)
    s = np.asarray(s)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, pid in enumerate(patient_ids):
        groups[pid].append(i)
    pos_p = [np.array(ix) for ix in groups.values() if y[ix].any()]
    neg_p = [np.array(ix) for ix in groups.values() if not y[ix].any()]
    if len(pos_p) < 2 or len(neg_p) < 2:
        return None
    rng = np.random.default_rng(seed)
    aucs = []
    single = all(len(ix) == 1 for ix in pos_p + neg_p)  # one case per patient (series)
    pos_flat, neg_flat = np.concatenate(pos_p), np.concatenate(neg_p)
    for _ in range(n_boot):
        pos_pick = rng.integers(len(pos_p), size=len(pos_p))
        neg_pick = rng.integers(len(neg_p), size=len(neg_p))
        if single:  # the same draw without building a list of one-element arrays
            ix = np.concatenate([pos_flat[pos_pick], neg_flat[neg_pick]])
        else:
            ix = np.concatenate([pos_p[j] for j in pos_pick] + [neg_p[j] for j in neg_pick])
        auc = roc_auc(y[ix], s[ix])
        if auc is not None:
            aucs.append(auc)
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]
