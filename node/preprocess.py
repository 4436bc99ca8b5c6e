"""Preprocessing stage: THE CT input transform, shared by training and by the node.

Every image the model ever sees, in training or in the node, goes through this module:

* DICOM CT slice -> Hounsfield units (``RescaleSlope``/``RescaleIntercept``), padding outside the
  scan circle clipped to air, lung window, scaled to [0, 1];
* 8-bit published slice (PNG/JPG, already windowed by its publisher) -> one grey channel scaled to
  [0, 1];
* then the same square resize for both.

The result is a float32 ``(size, size)`` array in [0, 1].  Scaling to what the backbone expects
(ImageNet normalisation, three channels) is part of the Keras model, so this module depends on
numpy, pydicom and Pillow (8-bit image files, the resize) only.  ``PREPROCESSING_VERSION`` is
written into every model's ``model.json``; the node refuses a model made with a different version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from node.errors import InvalidInstance

logger = logging.getLogger(__name__)

PREPROCESSING_VERSION = 1
AIR_HU = -1024.0


@dataclass(frozen=True)
class Window:
    """A display window in Hounsfield units."""

    level: float = -600.0
    width: float = 1500.0

    @property
    def low(self) -> float:
        return self.level - self.width / 2.0

    @property
    def high(self) -> float:
        return self.level + self.width / 2.0


LUNG_WINDOW = Window(-600.0, 1500.0)


_NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def native_pixels(ds: Dataset) -> np.ndarray | None:
    """``ds.pixel_array`` of a plain uncompressed 16-bit single-frame slice, or None.

    Returns exactly what pydicom returns for such a slice (little-endian words, unused high bits
    cleared or sign-extended as its ``correct_unused_bits`` does) without its decoder set-up,
    which cost more than all of the HU arithmetic per slice.  Anything else (compressed, big
    endian, multi-frame, short or odd pixel data, missing attributes) gets None: use pydicom.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or str(meta.get("TransferSyntaxUID", "")) not in _NATIVE_LITTLE_ENDIAN:
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        stored, signed = int(ds.BitsStored), int(ds.PixelRepresentation)
        plain = (
            int(ds.BitsAllocated) == 16
            and int(ds.get("SamplesPerPixel", 1) or 1) == 1
            and int(ds.get("NumberOfFrames", 1) or 1) == 1
            and 1 <= stored <= 16
            and signed in (0, 1)
            and rows > 0
            and cols > 0
        )
        raw = ds.PixelData
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if not plain or not isinstance(raw, bytes) or len(raw) < rows * cols * 2:
        return None
    dtype = "<i2" if signed else "<u2"
    pixels = np.frombuffer(raw, dtype=dtype, count=rows * cols).reshape(rows, cols).copy()
    if stored < 16:
        shift = 16 - stored
        np.left_shift(pixels, shift, out=pixels)
        np.right_shift(pixels, shift, out=pixels)
    return pixels.astype(np.dtype(dtype).newbyteorder("="), copy=False)


def hounsfield(ds: Dataset) -> np.ndarray:
    """Return the slice in Hounsfield units as float32.

    Values below air (the -2048/-3024 padding outside the scan circle) are clipped to -1024 HU.

    Raises
    ------
    InvalidInstance
        If the dataset has no pixel data or its pixel data cannot be decoded.
    """
    if "PixelData" not in ds:
        raise InvalidInstance("no Pixel Data")
    pixels = native_pixels(ds)
    if pixels is None:
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # pydicom raises many types for undecodable pixel data
            raise InvalidInstance(f"pixel data cannot be decoded: {exc}") from exc
    if pixels.ndim != 2:
        raise InvalidInstance(f"expected one 2-D frame, got pixel array of shape {pixels.shape}")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    hu = pixels.astype(np.float32)  # then in place: one 1 MB array per slice, not three
    hu *= np.float32(slope)
    hu += np.float32(intercept)
    np.maximum(hu, AIR_HU, out=hu)
    return hu


def apply_window(hu: np.ndarray, window: Window = LUNG_WINDOW) -> np.ndarray:
    """Map Hounsfield units to [0, 1] through ``window`` (linear, clipped)."""
    out = hu - np.float32(window.low)
    out /= np.float32(window.width)  # in place: the same values, one temporary fewer
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D float image to ``(size, size)``: antialiased linear (triangle) filter.

    Pillow's BILINEAR on a float32 ("F") image: the triangle's support widens with the downscale
    factor, so downsizing averages instead of aliasing.  It computes exactly what a dense
    triangle-weight matrix product does (to float32 rounding, about 1e-7), about 3x faster for a
    512 -> 224 slice, because it only visits the few taps in the kernel's support.
    """
    from PIL import Image

    if image.ndim != 2:
        raise ValueError(f"resize expects a 2-D image, got shape {image.shape}")
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
    return np.array(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def square_pad(image: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Pad a non-square image to a square, centred, so resizing keeps the aspect ratio."""
    h, w = image.shape
    if h == w:
        return image
    n = max(h, w)
    out = np.full((n, n), fill, dtype=np.float32)
    top, left = (n - h) // 2, (n - w) // 2
    out[top : top + h, left : left + w] = image
    return out


CROPS = ("none", "body")
BODY_THRESHOLD = 0.55  # windowed grey above this is soft tissue or bone in every rendering
BODY_MIN_FRACTION = 0.02  # a row/column belongs to the body box when this much of it is bright


def body_box(windowed: np.ndarray) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the body in a windowed [0, 1] slice.

    Rows and columns in which at least ``BODY_MIN_FRACTION`` of the pixels are brighter than
    ``BODY_THRESHOLD``; the whole image where fewer than 8 rows or columns qualify.  Works on
    windowed grey, so DICOM and 8-bit slices are cropped by the same rule.
    """
    bright = windowed > BODY_THRESHOLD
    rows = np.flatnonzero(bright.mean(axis=1) >= BODY_MIN_FRACTION)
    cols = np.flatnonzero(bright.mean(axis=0) >= BODY_MIN_FRACTION)
    if len(rows) < 8 or len(cols) < 8:
        return 0, windowed.shape[0], 0, windowed.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_image(windowed: np.ndarray, crop: str = "none") -> np.ndarray:
    """Apply the model's crop (``ModelSpec.crop``): ``none`` or ``body`` (see ``body_box``)."""
    if crop == "none":
        return windowed
    if crop == "body":
        top, bottom, left, right = body_box(windowed)
        return windowed[top:bottom, left:right]
    raise ValueError(f"unknown crop {crop!r}; expected one of {CROPS}")


NORMALISATIONS = ("none", "equalise")


def equalise(image: np.ndarray) -> np.ndarray:
    """Histogram equalisation of a [0, 1] image: each pixel -> the mid-rank of its grey value.

    Any monotonic re-rendering (another window, gamma, contrast) of the same slice gives the
    same result, up to values the rendering clipped together.
    """
    flat = image.ravel()
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    cdf = (np.cumsum(counts) - counts / 2.0) / flat.size
    return cdf[inverse].reshape(image.shape).astype(np.float32)


def normalise_image(windowed: np.ndarray, normalise: str = "none") -> np.ndarray:
    """Apply the model's intensity normalisation (``ModelSpec.normalise``)."""
    if normalise == "none":
        return windowed
    if normalise == "equalise":
        return equalise(windowed)
    raise ValueError(f"unknown normalisation {normalise!r}; expected one of {NORMALISATIONS}")


def windowed_to_input(
    windowed: np.ndarray, size: int, crop: str = "none", normalise: str = "none"
) -> np.ndarray:
    """Last common step of both paths: a [0, 1] grey image -> ``(size, size)`` model input.

    Crop (``crop_image``), then intensity normalisation (``normalise_image``), square pad, resize.
    """
    return resize(square_pad(normalise_image(crop_image(windowed, crop), normalise)), size)


def hu_to_input(
    hu: np.ndarray,
    size: int,
    window: Window = LUNG_WINDOW,
    crop: str = "none",
    normalise: str = "none",
) -> np.ndarray:
    """A slice in Hounsfield units -> model input (the node calls this after slice selection)."""
    return windowed_to_input(apply_window(hu, window), size, crop, normalise)


def dicom_to_input(
    ds: Dataset,
    size: int,
    window: Window = LUNG_WINDOW,
    crop: str = "none",
    normalise: str = "none",
) -> np.ndarray:
    """The DICOM path used by training and by the node: CT dataset -> model input."""
    return hu_to_input(hounsfield(ds), size, window, crop, normalise)


def read_dicom(path: str | Path) -> Dataset:
    """Read one DICOM file, tolerating a missing or partial file meta (real exports do that)."""
    try:
        return pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise InvalidInstance(f"{Path(path).name}: not readable as DICOM: {exc}") from exc


def grey_image_to_unit(pixels: np.ndarray) -> np.ndarray:
    """An 8-bit image array (H, W), (H, W, 3) or (H, W, 4) -> one grey channel in [0, 1].

    RGB is converted with the ITU-R 601 luma weights; alpha is dropped.
    """
    arr = np.asarray(pixels)
    if arr.ndim == 3:
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    elif arr.ndim != 2:
        raise ValueError(f"expected a 2-D or 3-D image, got shape {arr.shape}")
    return (arr.astype(np.float32) / np.float32(255.0)).astype(np.float32, copy=False)


def image_file_to_input(
    path: str | Path, size: int, crop: str = "none", normalise: str = "none"
) -> np.ndarray:
    """The 8-bit path: a PNG/JPG slice (already windowed by its publisher) -> model input."""
    from PIL import Image  # imported here so the node's DICOM path does not need it loaded

    with Image.open(path) as img:
        arr = np.asarray(img.convert("L") if img.mode not in ("L", "RGB", "RGBA") else img)
    return windowed_to_input(grey_image_to_unit(arr), size, crop, normalise)


def lung_fraction(hu: np.ndarray) -> float:
    """Fraction of the slice's pixels that look like lung parenchyma (-950..-400 HU).

    Used to pick the slices worth classifying: slices above the apex or below the bases have
    almost none.  Outside-of-body air is below -950 after clipping and does not count.
    """
    lung = (hu > -950.0) & (hu < -400.0)
    return np.count_nonzero(lung) / lung.size  # = lung.mean(), without a float pass
