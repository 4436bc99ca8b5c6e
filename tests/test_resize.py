"""The Pillow-based resize computes the antialiased triangle-filter resampling it always did."""

from __future__ import annotations

import numpy as np
import pytest

from node.preprocess import resize


def triangle_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Reference: the dense (n_out, n_in) triangle-weight matrix (Pillow BILINEAR's kernel)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    src = np.arange(n_in) + 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centres[:, None]) / support)
    return weights / weights.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(("shape", "size"), [((512, 512), 224), ((512, 512), 512), ((32, 48), 64)])
def test_resize_equals_triangle_matrix(shape: tuple[int, int], size: int) -> None:
    image = np.random.default_rng(1).random(shape, dtype=np.float32)
    expected = (
        triangle_matrix(shape[0], size)
        @ image.astype(np.float64)
        @ triangle_matrix(shape[1], size).T
    )
    out = resize(image, size)
    assert out.dtype == np.float32 and out.shape == (size, size)
    assert np.abs(out - expected).max() < 1e-5
