"""Tests for training.backbone (torch-free weight conversion) and training.model."""

from __future__ import annotations

import io
import pickle
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from PIL import Image
from skimage import data

from training.backbone import (
    NUM_BLOCKS,
    build_lite0,
    lite0_weights_path,
    load_torch_state_dict,
)
from training.model import build_classifier, embedding_model, set_backbone_trainable

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def weights() -> Path:
    return lite0_weights_path()


def test_state_dict_is_read_completely(weights: Path) -> None:
    state = load_torch_state_dict(weights)
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(a).all() for a in state.values())


def test_conversion_consumes_every_tensor(weights: Path) -> None:
    # build_lite0 raises if a tensor is left over or a Keras weight is not set.
    model = build_lite0(include_top=True, weights=weights)
    state = load_torch_state_dict(weights)
    n_values = sum(a.size for k, a in state.items() if not k.endswith("num_batches_tracked"))
    assert model.count_params() == n_values


def test_imagenet_cat_in_top5(weights: Path) -> None:
    model = build_lite0(include_top=True, weights=weights)
    cat = Image.fromarray(data.chelsea()).resize((224, 224), Image.Resampling.BILINEAR)
    x = (np.asarray(cat, dtype=np.float32) - 127.0) / 128.0
    logits = model.predict(x[None], verbose=0)[0]
    top5 = [int(i) for i in np.argsort(logits)[::-1][:5]]
    print("chelsea top-5 ImageNet indices:", top5)
    assert set(top5) & set(IMAGENET_CATS)
    assert top5[0] in IMAGENET_CATS


def test_classifier_saves_and_reloads(tmp_path: Path, weights: Path) -> None:
    model = build_classifier(2, 96, weights)
    assert model.output_shape == (None, 2)
    x = np.random.default_rng(0).random((3, 96, 96, 1), dtype=np.float32)
    probs = model.predict(x, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), probs, atol=1e-5)


def test_set_backbone_trainable_keeps_bn_frozen() -> None:
    model = build_classifier(2, 64, None)
    backbone = model.get_layer("efficientnet_lite0")
    set_backbone_trainable(model, 0)
    assert backbone.trainable_weights == []
    set_backbone_trainable(model, 2)
    names = {layer.name for layer in backbone.layers if layer.trainable and layer.weights}
    assert names == {
        f"block{i:02d}_{part}"
        for i in (NUM_BLOCKS - 2, NUM_BLOCKS - 1)
        for part in ("expand_conv", "dwconv", "project_conv")
    } | {"head_conv"}
    assert model.get_layer("classifier").trainable


def test_embedding_model_gives_pooled_features() -> None:
    model = build_classifier(2, 64, None)
    features = embedding_model(model).predict(np.zeros((2, 64, 64, 1), np.float32), verbose=0)
    assert features.shape == (2, 1280)


class _FakeStorage:
    """What torch.save sees as a storage: pickled as a persistent id, data written apart."""

    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key, self.data = key, data


def _fake_torch() -> types.ModuleType:
    """A stand-in ``torch`` module holding just the globals a state-dict pickle names."""
    torch_mod = types.ModuleType("torch")
    utils_mod = types.ModuleType("torch._utils")

    def rebuild(*args: object) -> None:
        raise AssertionError("only pickled, never called")

    rebuild.__module__, rebuild.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = rebuild  # type: ignore[attr-defined]
    torch_mod._utils = utils_mod  # type: ignore[attr-defined]
    storage_cls = type("FloatStorage", (), {"__module__": "torch"})
    torch_mod.FloatStorage = storage_cls  # type: ignore[attr-defined]
    return torch_mod


def _write_zip_checkpoint(path: Path, tensors: dict[str, np.ndarray], torch_mod: Any) -> None:
    """Write float32 ``tensors`` as torch.save's zip format does: data.pkl + data/<key>."""

    class _Tensor:
        def __init__(self, storage: _FakeStorage, shape: tuple[int, ...]) -> None:
            self.storage, self.shape = storage, shape

        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            stride = tuple(int(np.prod(self.shape[i + 1 :])) for i in range(len(self.shape)))
            args = (self.storage, 0, self.shape, stride, False, OrderedDict())
            return torch_mod._utils._rebuild_tensor_v2, args

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if isinstance(obj, _FakeStorage):
                return ("storage", torch_mod.FloatStorage, obj.key, "cpu", obj.data.size)
            return None

    storages = {n: _FakeStorage(str(i), a.ravel()) for i, (n, a) in enumerate(tensors.items())}
    state = OrderedDict((n, _Tensor(storages[n], a.shape)) for n, a in tensors.items())
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buf.getvalue())
        for s in storages.values():
            archive.writestr(f"archive/data/{s.key}", s.data.astype("<f4").tobytes())


def test_zip_format_state_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = {
        "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
        "bn.bias": np.array([0.5, -1.0], dtype=np.float32),
    }
    path = tmp_path / "zip.pth"
    torch_mod = _fake_torch()
    with monkeypatch.context() as m:  # the fake torch is visible only while pickling
        m.setitem(sys.modules, "torch", torch_mod)
        m.setitem(sys.modules, "torch._utils", torch_mod._utils)
        _write_zip_checkpoint(path, tensors, torch_mod)
    state = load_torch_state_dict(path)
    assert list(state) == list(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(state[name], array)
