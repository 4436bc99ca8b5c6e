"""Fuzzing (hypothesis) over the paths received bytes take: dataset -> spool, header checks, and
preprocessing.  Each property says what may come out: a valid result or the project's own
exception, never another one.  Bounded and derandomised, so the run is short and reproducible.
"""

from __future__ import annotations

import math
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info

from node import preprocess
from node.errors import InvalidInstance, SeriesRejected
from node.receive import parse_instance
from node.series_check import order_and_check
from node.spool import Spool, check_uid
from tests.peers import TCIA_SIEMENS_B40F, require_shared_data, series_files

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
EXPLICIT = "1.2.840.10008.1.2.1"


def small_slice() -> Dataset:
    """A real CT slice cropped to 32 x 32, so each example is a few kB."""
    require_shared_data(TCIA_SIEMENS_B40F)
    ds = pydicom.dcmread(series_files(TCIA_SIEMENS_B40F)[12])
    ds.PixelData = ds.pixel_array[240:272, 240:272].copy().tobytes()
    ds.Rows = ds.Columns = 32
    return ds


def as_received(ds: Dataset) -> bytes:
    """File meta + Explicit VR LE dataset, as ``event.encoded_dataset(include_meta=True)``."""
    from pynetdicom.dsutils import encode

    meta = BytesIO()
    ds.file_meta.TransferSyntaxUID = EXPLICIT
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    body = encode(ds, False, True)
    assert body is not None
    return b"\0" * 128 + b"DICM" + meta.getvalue() + body


@pytest.fixture(scope="module")
def received() -> tuple[bytes, str, str]:
    ds = small_slice()
    return as_received(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID)


mutations = st.lists(
    st.tuples(st.integers(min_value=0, max_value=10**6), st.binary(min_size=1, max_size=8)),
    min_size=1,
    max_size=6,
)


@FUZZ
@given(mutations=mutations, cut=st.one_of(st.none(), st.integers(min_value=0, max_value=10**6)))
def test_parse_instance_never_raises_anything_else(
    received: tuple[bytes, str, str],
    mutations: list[tuple[int, bytes]],
    cut: int | None,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data, sop_class, sop_uid = received
    buf = bytearray(data)
    for pos, chunk in mutations:
        at = 132 + pos % (len(buf) - 132)  # keep the preamble; anything after may change
        buf[at : at + len(chunk)] = chunk
    if cut is not None:
        buf = buf[: 132 + cut % (len(buf) - 132)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            header = parse_instance(bytes(buf), sop_class, sop_uid)
        except InvalidInstance:
            return
    root = tmp_path_factory.getbasetemp() / "fuzz-spool"
    path = Spool(root).path_for(
        header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
    )
    assert path.resolve().is_relative_to(root.resolve())
    assert len(path.relative_to(root).parts) == 3


@FUZZ
@given(text=st.text(max_size=80) | st.from_regex(r"[0-9./\\]{0,70}", fullmatch=True))
def test_check_uid_accepts_only_path_safe_uids(text: str) -> None:
    try:
        uid = check_uid(text, "SeriesInstanceUID")
    except InvalidInstance as exc:
        assert "SeriesInstanceUID" in str(exc)
        return
    assert 0 < len(uid) <= 64
    assert set(uid) <= set("0123456789.")
    assert ".." not in uid and not uid.startswith(".") and not uid.endswith(".")


@FUZZ
@given(
    rows=st.integers(min_value=1, max_value=48),
    columns=st.integers(min_value=1, max_value=48),
    slope=st.floats(min_value=1e-3, max_value=1e3),
    intercept=st.floats(min_value=-1e4, max_value=1e4),
    signed=st.booleans(),
    size=st.sampled_from([8, 32]),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_preprocess_gives_finite_unit_images(
    rows: int, columns: int, slope: float, intercept: float, signed: bool, size: int, seed: int
) -> None:
    """Any finite rescale and any 16-bit pixels give a (size, size) image in [0, 1]."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = int(signed)
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    pixels = rng.integers(info.min, info.max, size=(rows, columns), dtype=dtype, endpoint=True)
    ds.PixelData = pixels.tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.6g}", f"{intercept:.6g}"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = preprocess.dicom_to_input(ds, size)
    assert out.shape == (size, size) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6


@FUZZ
@given(mutations=mutations)
def test_read_and_preprocess_mutated_file(
    received: tuple[bytes, str, str], mutations: list[tuple[int, bytes]], tmp_path: Path
) -> None:
    """A damaged spooled file either preprocesses or raises InvalidInstance."""
    data = bytearray(received[0])
    for pos, chunk in mutations:
        at = 132 + pos % (len(data) - 132)
        data[at : at + len(chunk)] = chunk
    path = tmp_path / "slice.dcm"
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = preprocess.read_dicom(path)
            out = preprocess.dicom_to_input(ds, 16)
        except InvalidInstance:
            return
    assert out.shape == (16, 16)


number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "abc", "1e400", "-0", "nan"]),
)


@FUZZ
@given(
    n=st.integers(min_value=1, max_value=5),
    orientation=st.lists(number, min_size=0, max_size=7),
    position=st.lists(number, min_size=0, max_size=4),
    thickness=number,
    slope=number,
    size=st.tuples(st.integers(-5, 70000), st.integers(-5, 70000)),
)
def test_series_check_rejects_or_orders(
    n: int,
    orientation: list[object],
    position: list[object],
    thickness: object,
    slope: object,
    size: tuple[int, int],
) -> None:
    """Arbitrary geometry values: an ordered list or SeriesRejected, nothing else."""
    headers = []
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = f"1.2.3.{i}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.add_new(0x00200037, "LO", [str(v) for v in orientation])
            ds.add_new(0x00200032, "LO", [str(v) for v in position[:2]] + [str(i * 5.0)])
            ds.add_new(0x00180050, "LO", str(thickness))
            ds.add_new(0x00281053, "LO", str(slope))
            ds.add_new(0x00281052, "LO", "-1024")
        ds.Rows, ds.Columns = max(0, size[0]) % 65536, max(0, size[1]) % 65536
        headers.append((Path(f"{i}.dcm"), ds))
    try:
        ordered = order_and_check(headers, require_axial=True, max_gap_factor=1.6)
    except SeriesRejected:
        return
    assert len(ordered) == n
    assert all(math.isfinite(ref.z) for ref in ordered)
