"""The fast path for plain uncompressed slices returns exactly what pydicom's pixel_array does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.errors import InvalidInstance
from node.preprocess import hounsfield, native_pixels
from tests.peers import SHARED_DATA, require_shared_data


def _native_files() -> list[Path]:
    return sorted((SHARED_DATA / "ct_dicom").rglob("*.dcm"))


def test_real_native_slices_match_pydicom() -> None:
    require_shared_data()
    checked = 0
    for path in _native_files():
        ds = pydicom.dcmread(path, force=True)
        fast = native_pixels(ds)
        if fast is None:
            continue
        expected = ds.pixel_array
        assert fast.dtype == expected.dtype and np.array_equal(fast, expected), path.name
        checked += 1
    assert checked >= 140  # TCIA explicit + implicit VR (92), RICORD signed 16-bit (50)


@pytest.mark.parametrize(("stored", "signed"), [(12, 0), (12, 1), (16, 1), (10, 0)])
def test_unused_high_bits_are_handled_as_pydicom_does(stored: int, signed: int) -> None:
    require_shared_data()
    path = next(p for p in _native_files() if "tcia" in str(p))
    ds = pydicom.dcmread(path)
    words = np.random.default_rng(stored).integers(0, 65536, ds.Rows * ds.Columns, dtype=np.uint16)
    ds.PixelData = words.astype("<u2").tobytes()  # garbage in the unused high bits too
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = stored, stored - 1, signed
    fast = native_pixels(ds)
    assert fast is not None
    expected = ds.pixel_array
    assert fast.dtype == expected.dtype and np.array_equal(fast, expected)


def test_short_pixel_data_falls_back_to_pydicom() -> None:
    require_shared_data()
    path = next(p for p in _native_files() if "tcia" in str(p))
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:1000]
    assert native_pixels(ds) is None
    with pytest.raises(InvalidInstance, match="cannot be decoded"):
        hounsfield(ds)
