"""Training stage: ``python -m training.train --config training/configs/<name>.yaml``.

1. Read every source into one manifest and split it by patient (``training.dataset``).
2. Phase 1, frozen backbone: cache features of the exact node inputs plus N augmented renderings
   of every training slice, train the softmax head on them (Adam, exponential decay, early
   stopping, best checkpoint, resumable) and copy it into the full model.
3. Held-out scores for sources marked ``lopo`` (the scarce Hounsfield DICOM patients): refit the
   head without each site (whole source) and score it, and again without each patient, so no
   patient scores itself; ``holdout`` names the protocol the series rule and notice use.
4. Phase 2 (optional, ``finetune.epochs > 0``): fine-tune the top blocks on streamed augmented
   inputs (``tf.data``), resumable through ``BackupAndRestore``.
5. Export ``models/<name>/<version>/`` with evaluation, plots and model card
   (``training.export``).

Interrupted runs resume from ``work_dir``: cached features, the phase state and Keras backups.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import numpy as np

from training.augment import AugmentConfig
from training.config import (
    HOLDOUTS,
    FinetuneConfig,
    OptimiserConfig,
    SourceConfig,
    TrainConfig,
    load_config,
)
from training.dataset import (
    NORMAL,
    Row,
    canonical_label,
    check_patient_disjoint,
    class_index,
    read_covidx,
    read_csv_manifest,
    read_dicom_series,
    read_image_folders,
    sample_weights,
    split_by_patient,
    write_manifest,
)
from training.features import NativeCache, rendering_features

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- data


def read_source(src: SourceConfig) -> list[Row]:
    path = src.resolved(src.path)
    assert path is not None
    if not path.exists():
        raise FileNotFoundError(f"source {src.name}: {path} does not exist")
    if src.kind == "csv":
        rows = read_csv_manifest(path, src.name, src.subgroup_column)
    elif src.kind == "folders":
        rows = read_image_folders(path, src.name)
    elif src.kind == "covidx":
        images = src.resolved(src.images)
        if images is None:
            raise ValueError(f"source {src.name}: covidx needs 'images'")
        rows = read_covidx(path, images, src.resolved(src.metadata), src.name)
    else:
        if not src.label:
            raise ValueError(f"source {src.name}: dicom needs 'label'")
        rows = read_dicom_series(path, canonical_label(src.label), source=src.name)
    return [replace(r, source=src.name) for r in rows]


def collect_rows(cfg: TrainConfig) -> list[Row]:
    """All sources -> rows with a patient-level split, checked disjoint."""
    rows: list[Row] = []
    for i, src in enumerate(cfg.sources):
        part = read_source(src)
        fixed = src.split if src.split in ("train", "test") else None
        part = split_by_patient(
            part,
            cfg.split.val_fraction,
            cfg.split.test_fraction,
            cfg.seed + i,
            use_official=src.split == "official",
            fixed=fixed,
        )
        logger.info(
            "source %s: %d rows, %d patients",
            src.name,
            len(part),
            len({r.patient_id for r in part}),
        )
        rows += part
    check_patient_disjoint(rows)
    return rows


def usable_for_training(rows: Sequence[Row], lung: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """Rows a head may learn from: label fits the classes, DICOM slice shows lung (the node's
    selection), and no slice marked uninfected is taught as its patient's disease."""
    normal_idx = class_index(NORMAL, cfg.classes)
    ok = []
    for row, lf in zip(rows, lung, strict=True):
        idx = class_index(row.label, cfg.classes)
        ok.append(
            idx is not None
            and (row.kind != "dicom" or lf >= cfg.selection.min_lung_fraction)
            and not (row.slice_label == 0 and idx != normal_idx)
        )
    return np.array(ok)


# ---------------------------------------------------------------------------------------- head


class EpochLogger(keras.callbacks.Callback):
    """Append one line per epoch to ``log.csv`` and ``log.jsonl`` (files closed every epoch, so an
    interrupted run leaves complete logs that the resumed run continues)."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        self.log_dir = log_dir

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        row = {"epoch": epoch, **{k: float(v) for k, v in sorted((logs or {}).items())}}
        with open(self.log_dir / "log.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        csv_path = self.log_dir / "log.csv"
        new = not csv_path.is_file()
        with open(csv_path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


def optimiser(opt: OptimiserConfig) -> keras.optimizers.Optimizer:
    schedule = keras.optimizers.schedules.ExponentialDecay(
        opt.learning_rate, opt.decay_steps, opt.decay_rate
    )
    return keras.optimizers.Adam(schedule)


def build_head(n_features: int, num_classes: int, dropout: float, l2: float) -> keras.Model:
    """The classifier head alone (on standardised features), layer names as in the full model."""
    inputs = keras.Input((n_features,), name="features")
    x = keras.layers.Dropout(dropout, name="dropout")(inputs)
    out = keras.layers.Dense(
        num_classes,
        activation="softmax",
        name="classifier",
        kernel_regularizer=keras.regularizers.L2(l2) if l2 else None,
    )(x)
    return keras.Model(inputs, out, name="head")


def fold_standardisation(
    head: keras.Model, mu: np.ndarray, sd: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Dense weights on standardised features -> the same layer on raw pooled features."""
    kernel, bias = head.get_layer("classifier").get_weights()
    folded = kernel / sd[:, None]
    return folded.astype(np.float32), (bias - (mu / sd) @ kernel).astype(np.float32)


def head_predict(features: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Softmax of the folded head, as the full model computes it (dropout is inert)."""
    z = features @ kernel + bias
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit(
    model: keras.Model,
    train: tuple[Any, ...],
    val: tuple[Any, ...] | None,
    opt: OptimiserConfig,
    log_dir: Path | None,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    dataset: bool = False,
) -> keras.Model:
    """Compile and fit with early stopping and the best weights kept; resumable via log_dir."""
    model.compile(
        optimizer=optimiser(opt), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    monitor = opt.monitor if val is not None else opt.monitor.removeprefix("val_")
    mode = "max" if "acc" in monitor else "min"
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(
            monitor, patience=opt.patience, mode=mode, restore_best_weights=True
        ),
    ]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        callbacks += [
            keras.callbacks.BackupAndRestore(str(log_dir / "backup")),
            keras.callbacks.ModelCheckpoint(
                str(log_dir / "best.weights.h5"),
                monitor,
                mode=mode,
                save_best_only=True,
                save_weights_only=True,
            ),
            EpochLogger(log_dir),
        ]
    callbacks += list(extra_callbacks)
    verbose = (1 if sys.stdout.isatty() else 2) if log_dir is not None else 0
    if dataset:
        model.fit(
            train[0],
            validation_data=val,
            epochs=opt.epochs,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,
        )  # the tf.data pipeline shuffles
    else:
        x, y, w = train
        model.fit(
            x,
            y,
            sample_weight=w,
            batch_size=opt.batch_size,
            epochs=opt.epochs,
            validation_data=val,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=True,
        )
    return model


class Phase1:
    """Cached features + labels for head training and leave-one-patient-out refits."""

    def __init__(
        self, cfg: TrainConfig, rows: list[Row], cache: NativeCache, emb: keras.Model, work: Path
    ) -> None:
        self.cfg, self.rows = cfg, rows
        aug = AugmentConfig(**cfg.augment.model_dump())
        window = cfg.window.as_window()
        usable = usable_for_training(rows, cache.lung, cfg)
        self.usable = usable
        self.all_idx = list(range(len(rows)))

        def features(idx: list[int], rendering: int) -> np.ndarray:
            return rendering_features(
                emb,
                cache,
                idx,
                rendering,
                cfg.input_size,
                window,
                aug,
                cfg.seed,
                work / "features",
                cfg.crop,
                cfg.normalise,
            )

        self.base = features(self.all_idx, 0)
        self.train_idx = [i for i in self.all_idx if usable[i] and rows[i].split == "train"]
        self.val_idx = [i for i in self.all_idx if usable[i] and rows[i].split == "val"]
        self.aug_feats = [features(self.train_idx, r) for r in range(1, cfg.head.renderings + 1)]
        self.labels = np.array(
            [
                class_index(r.label, cfg.classes) if u else -1
                for r, u in zip(rows, usable, strict=True)
            ]
        )

        self.source_weight = {s.name: s.weight for s in cfg.sources}

    def train_set(
        self, exclude: str | None = None, exclude_by: tuple[Any, str] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training features/labels/weights without patient ``exclude`` or, with ``exclude_by``
        ``(key, value)``, without the rows whose ``key(row) == value``."""
        key, value = exclude_by or ((lambda r: r.patient_id), exclude)
        keep = [j for j, i in enumerate(self.train_idx) if key(self.rows[i]) != value]
        idx = [self.train_idx[j] for j in keep]
        x = np.concatenate([self.base[idx]] + [f[keep] for f in self.aug_feats])
        y = np.tile(self.labels[idx], 1 + len(self.aug_feats))
        src = [self.rows[i].source for i in idx] * (1 + len(self.aug_feats))
        return x, y, sample_weights(y, src, self.source_weight)

    def val_set(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if not self.val_idx:
            return None
        y = self.labels[self.val_idx]
        src = [self.rows[i].source for i in self.val_idx]
        return self.base[self.val_idx], y, sample_weights(y, src, self.source_weight)

    def fit_head(
        self,
        exclude: str | None,
        log_dir: Path | None,
        extra: Sequence[keras.callbacks.Callback] = (),
        exclude_by: tuple[Any, str] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Train the head without patient ``exclude`` (or the ``exclude_by`` group); returns the
        folded (kernel, bias)."""
        keras.utils.set_random_seed(self.cfg.seed)
        x, y, w = self.train_set(exclude, exclude_by)
        mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-3
        val = self.val_set()
        if val is not None:
            val = ((val[0] - mu) / sd, val[1], val[2])
        head = build_head(x.shape[1], len(self.cfg.classes), self.cfg.dropout, self.cfg.head.l2)
        fit(head, ((x - mu) / sd, y, w), val, self.cfg.head, log_dir, extra)
        return fold_standardisation(head, mu, sd)

    def held_out_scores(self, positive_index: int, by: str) -> dict[int, float]:
        """Row index -> positive score from a head trained without that row's group.

        ``by="patient"``: leave one patient out.  ``by="site"``: leave the whole source out (each
        ``lopo`` source is one site's cohort), which is what a new hospital looks like to the
        model; with sites whose patients are mostly one class, leaving out one patient teaches
        the site's look as the other class and biases the patient-level scores low.
        """
        lopo_sources = {s.name for s in self.cfg.sources if s.lopo}
        key = (lambda r: r.source) if by == "site" else (lambda r: r.patient_id)
        groups = sorted({key(r) for r in self.rows if r.source in lopo_sources})
        scores: dict[int, float] = {}
        for n, group in enumerate(groups, 1):
            logger.info("held out by %s %d/%d: %s", by, n, len(groups), group)
            kernel, bias = self.fit_head(None, None, exclude_by=(key, group))
            idx = [i for i, r in enumerate(self.rows) if key(r) == group]
            probs = head_predict(self.base[idx], kernel, bias)
            scores.update({i: float(p) for i, p in zip(idx, probs[:, positive_index], strict=True)})
        return scores


# ------------------------------------------------------------------------------------ fine-tune


def streamed(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, batch: int, aug: AugmentConfig | None, seed: int
) -> Any:
    """``tf.data`` over in-memory inputs; augmentation (intensity + geometry) on the fly."""
    import tensorflow as tf

    from training.augment import geometric_layers, tf_intensity

    ds = tf.data.Dataset.from_tensor_slices((x[..., None], y, w))
    if aug is not None:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch)
    if aug is not None:
        geo = geometric_layers(aug, seed)
        ds = ds.map(
            lambda a, b, c: (
                tf.clip_by_value(geo(tf_intensity(a, aug), training=True), 0.0, 1.0),
                b,
                c,
            )
        )
    return ds.prefetch(2)


def finetune(
    model: keras.Model,
    cfg: TrainConfig,
    ft: FinetuneConfig,
    data: dict[str, Any],
    log_dir: Path,
    extra: Sequence[keras.callbacks.Callback] = (),
) -> keras.Model:
    from training.model import set_backbone_trainable

    set_backbone_trainable(model, ft.top_blocks)
    aug = AugmentConfig(**cfg.augment.model_dump())
    train = streamed(*data["train"], ft.batch_size, aug, cfg.seed)
    val = streamed(*data["val"], ft.batch_size, None, cfg.seed) if data.get("val") else None
    return fit(model, (train,), val, ft, log_dir, extra, dataset=True)


# ----------------------------------------------------------------------------------------- run


def run(cfg: TrainConfig, extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> Path:
    """Train, evaluate and export; returns the model directory."""
    from training.backbone import lite0_weights_path
    from training.export import export
    from training.model import build_classifier, embedding_model

    keras.utils.set_random_seed(cfg.seed)
    work = cfg.resolved(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.is_file() else {}

    rows = collect_rows(cfg)
    write_manifest(rows, work / "manifest.csv")
    weights = lite0_weights_path() if cfg.backbone_weights == "imagenet" else None
    model = build_classifier(len(cfg.classes), cfg.input_size, weights, cfg.dropout)
    cache = NativeCache(
        rows,
        {
            s.name: s.rendered_window.as_window()
            for s in cfg.sources
            if s.rendered_window is not None
        },
    )
    phase1 = Phase1(cfg, rows, cache, embedding_model(model), work)
    positive_index = cfg.classes.index(cfg.positive_class)

    head_weights = work / "head.npz"
    if not state.get("head_done"):
        kernel, bias = phase1.fit_head(None, work / "head", extra_callbacks)
        np.savez(head_weights, kernel=kernel, bias=bias)
        state["head_done"] = True
        state_path.write_text(json.dumps(state))
    with np.load(head_weights) as saved:
        model.get_layer("classifier").set_weights([saved["kernel"], saved["bias"]])

    held_out: dict[str, dict[str, float]] = {}
    if any(s.lopo for s in cfg.sources):
        for by in HOLDOUTS:
            path = work / f"held_out_{by}.json"
            if not path.is_file():
                scores = phase1.held_out_scores(positive_index, by)
                path.write_text(json.dumps({rows[i].path: s for i, s in scores.items()}))
            held_out[by] = json.loads(path.read_text())

    if cfg.finetune.epochs > 0:
        ft_weights = work / "finetuned.weights.h5"
        if not state.get("finetune_done"):
            window = cfg.window.as_window()
            data = {}
            for split, idx in (("train", phase1.train_idx), ("val", phase1.val_idx)):
                if idx:
                    y = phase1.labels[idx]
                    data[split] = (
                        cache.inputs(
                            idx, cfg.input_size, window, crop=cfg.crop, normalise=cfg.normalise
                        ),
                        y,
                        sample_weights(y, [rows[i].source for i in idx], phase1.source_weight),
                    )
            finetune(model, cfg, cfg.finetune, data, work / "finetune", extra_callbacks)
            model.save_weights(ft_weights)
            state["finetune_done"] = True
            state_path.write_text(json.dumps(state))
        model.load_weights(ft_weights)
    return export(cfg, model, rows, cache, phase1.usable, held_out, work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    model_dir = run(load_config(args.config))
    print(model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
