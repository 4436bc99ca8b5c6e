"""Training stage, phase-1 data: rows -> native slices -> (augmented) inputs -> cached features.

With the backbone frozen (BatchNorm in inference mode) a slice's pooled features depend only on
its input, so phase 1 (head training) runs on features computed once per rendering and cached
under the work directory: rendering 0 is the exact node input (``hu_to_input`` / the 8-bit
path), renderings 1..N are augmented (window/intensity jitter, then rotation/zoom/shift/flip).
A rendering file written once is reused by a resumed or repeated run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np
from tqdm import tqdm

from node.preprocess import AIR_HU, Window, lung_fraction
from training.augment import AugmentConfig, geometric_layers, render
from training.dataset import Row, load_native

logger = logging.getLogger(__name__)

BATCH = 32


class NativeCache:
    """Native slices (HU or [0, 1] grey) of all rows, loaded once, plus DICOM lung fractions."""

    def __init__(self, rows: Sequence[Row], rendered: dict[str, Window] | None = None) -> None:
        """``rendered``: source -> the window its 8-bit images were rendered with; those
        images are mapped back to approximate HU and from then on treated like DICOM."""
        self.rows = list(rows)
        self.rendered = dict(rendered or {})
        self.natives = [self._native(r) for r in tqdm(self.rows, desc="reading slices")]
        self.kinds = [
            "dicom" if r.kind == "dicom" or r.source in self.rendered else "image"
            for r in self.rows
        ]
        self.lung = np.array(
            [
                lung_fraction(n) if r.kind == "dicom" else 1.0
                for r, n in zip(self.rows, self.natives, strict=True)
            ]
        )

    def _native(self, row: Row) -> np.ndarray:
        native = load_native(row)
        win = self.rendered.get(row.source)
        if row.kind == "dicom" or win is None:
            return native
        pseudo_hu = np.float32(win.low) + native * np.float32(win.width)
        return np.maximum(pseudo_hu, np.float32(AIR_HU), out=pseudo_hu)

    def key(self) -> dict[str, object]:
        return {s: asdict(w) for s, w in sorted(self.rendered.items())}

    def inputs(
        self,
        idx: Sequence[int],
        size: int,
        window: Window,
        cfg: AugmentConfig | None = None,
        rng: np.random.Generator | None = None,
        crop: str = "none",
        normalise: str = "none",
    ) -> np.ndarray:
        """Model inputs of rows ``idx``; augmented (intensity) when ``cfg`` and ``rng`` are given."""
        rng = rng or np.random.default_rng(0)
        out = np.empty((len(idx), size, size), np.float32)
        for j, i in enumerate(idx):
            out[j] = render(self.natives[i], self.kinds[i], size, window, cfg, rng, crop, normalise)
        return out


def _key(rows: Sequence[Row], idx: Sequence[int], extra: dict[str, object]) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for i in idx:
        h.update(rows[i].path.encode())
    return h.hexdigest()[:16]


def embed(emb_model: keras.Model, inputs: np.ndarray) -> np.ndarray:
    return np.asarray(emb_model.predict(inputs[..., None], batch_size=BATCH, verbose=0), np.float32)


def rendering_features(
    emb_model: keras.Model,
    cache: NativeCache,
    idx: Sequence[int],
    rendering: int,
    size: int,
    window: Window,
    cfg: AugmentConfig,
    seed: int,
    cache_dir: Path,
    crop: str = "none",
    normalise: str = "none",
) -> np.ndarray:
    """Features of rows ``idx`` in one rendering (0 = exact node input), cached on disk."""
    extra = {
        "r": rendering,
        "size": size,
        "window": asdict(window),
        "aug": asdict(cfg),
        "seed": seed,
        "n": len(idx),
        "rendered": cache.key(),
    }
    if crop != "none":
        extra["crop"] = crop
    if normalise != "none":
        extra["normalise"] = normalise
    key = _key(cache.rows, idx, extra)
    path = cache_dir / f"features_r{rendering}_{key}.npy"
    if path.is_file():
        return np.load(path)
    rng = np.random.default_rng([seed, rendering])
    aug = geometric_layers(cfg, seed + rendering) if rendering else None
    feats = []
    for start in tqdm(range(0, len(idx), BATCH), desc=f"features r{rendering}", leave=False):
        part = idx[start : start + BATCH]
        x = cache.inputs(part, size, window, cfg if rendering else None, rng, crop, normalise)
        if aug is not None:
            x = np.asarray(aug(x[..., None], training=True))[..., 0]
        feats.append(embed(emb_model, np.clip(x, 0.0, 1.0)))
    out = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out
