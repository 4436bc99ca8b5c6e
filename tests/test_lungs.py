"""Lung segmentation (node.lungs) and opacity quantification (node.opacity): phantoms with known
volumes, every patient orientation, padding outside the scan circle, series without lungs (also
through ``pipeline.analyse_files``), and the real series in ../shared/data.

The phantom is a float32 HU volume (60 x 256 x 256, spacing 2.5 x 1 x 1 mm) drawn in the patient's
frame of a supine head-first scan: outside air, an elliptical body (fat layer, soft tissue, spine),
two lung ellipsoids of different size with vessels running through them, a trachea above them,
and a hollow curved table below the body that does not touch it.  Other orientations flip the
anatomy (never the table, which stays under the patient in the image) as the scanner would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node import lungs, opacity, preprocess
from node.config import Settings
from node.errors import SeriesRejected
from node.infer import load_model
from node.pipeline import analyse_files
from node.series_check import order_and_check, read_headers
from tests.peers import SHARED_DATA, require_shared_data, series_files

SHAPE = (60, 256, 256)
SPACING = (2.5, 1.0, 1.0)  # (dz, dy, dx) mm
VOXEL_ML = SPACING[0] * SPACING[1] * SPACING[2] / 1000.0
SUPINE_HEAD_FIRST = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
NOISE_HU = 10.0

#: name -> (Image Orientation (Patient), axes of the supine head-first anatomy that it flips)
ORIENTATIONS = {
    "supine-head-first": (SUPINE_HEAD_FIRST, ()),
    "prone-head-first": ([-1.0, 0.0, 0.0, 0.0, -1.0, 0.0], (1, 2)),
    "supine-feet-first": ([-1.0, 0.0, 0.0, 0.0, 1.0, 0.0], (0, 2)),
    "prone-feet-first": ([1.0, 0.0, 0.0, 0.0, -1.0, 0.0], (0, 1)),
}


@dataclass(frozen=True)
class Phantom:
    """A HU volume and, voxel by voxel, what it holds."""

    hu: np.ndarray
    left: np.ndarray  # the patient's left lung (bool)
    right: np.ndarray
    ground_glass: np.ndarray
    consolidation: np.ndarray


def _mm_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    return z * SPACING[0], y * SPACING[1], x * SPACING[2]


def ellipsoid(centre_mm: tuple[float, float, float], radii_mm: tuple[float, ...]) -> np.ndarray:
    z, y, x = _mm_grid()
    (cz, cy, cx), (rz, ry, rx) = centre_mm, radii_mm
    return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def in_plane(mask_2d: np.ndarray) -> np.ndarray:
    return np.broadcast_to(mask_2d, SHAPE)


def body(hu: np.ndarray, inner_hu: float = 40.0) -> None:
    """An elliptical trunk, 220 x 150 mm: a 10 mm fat layer around soft tissue, a spine."""
    _, y, x = _mm_grid()
    r = ((y - 128) / 75) ** 2 + ((x - 128) / 110) ** 2
    hu[in_plane(r <= 1.0)] = -100.0
    hu[in_plane(r <= 0.85)] = inner_hu
    hu[in_plane((y - 180) ** 2 + (x - 128) ** 2 <= 15**2)] = 700.0


def finish(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The table (a dense curved shell, hollow, 8 mm below the body) and scanner noise."""
    _, y, x = _mm_grid()
    r2 = (y - 380) ** 2 + (x - 128) ** 2
    shell = (r2 <= 175**2) & (r2 >= 165**2) & (y > 210) & (np.abs(x - 128) < 100)
    hu[in_plane(shell)] = 300.0
    hu += rng.normal(0.0, NOISE_HU, SHAPE).astype(np.float32)
    return hu


def chest(flip: tuple[int, ...] = (), *, lesions: bool = False, seed: int = 0) -> Phantom:
    """The chest phantom; ``lesions`` adds ground glass and a consolidation to the left lung."""
    rng = np.random.default_rng(seed)
    hu = np.full(SHAPE, -1000.0, np.float32)
    body(hu)
    _, y, x = _mm_grid()
    left = ellipsoid((75, 120, 178), (55, 45, 30))  # patient's left: toward high columns
    right = ellipsoid((75, 120, 78), (60, 48, 36))  # the right lung is the larger one
    hu[left | right] = -850.0
    for cx in (70, 86, 170, 186):  # vessels along the body axis
        hu[in_plane((y - 110) ** 2 + (x - cx) ** 2 <= 1.5**2) & (left | right)] = 40.0
    z, _, _ = _mm_grid()
    hu[in_plane((y - 90) ** 2 + (x - 128) ** 2 <= 8**2) & (z > 140)] = -1000.0  # trachea
    ground_glass = consolidation = np.zeros(SHAPE, bool)
    if lesions:
        ground_glass = ellipsoid((70, 110, 178), (12, 12, 12)) & left  # central, 24 mm
        # 20 mm, touching the costal pleura from inside (the lung's lateral edge is at x = 208)
        consolidation = ellipsoid((80, 125, 198), (10, 10, 10)) & left
        hu[ground_glass] = -500.0
        hu[consolidation] = 20.0
    arrays = [hu, left, right, ground_glass, consolidation]
    if flip:
        arrays = [np.ascontiguousarray(np.flip(a, axis=flip)) for a in arrays]
    return Phantom(finish(arrays[0], rng), *arrays[1:])


def abdomen(seed: int = 0) -> np.ndarray:
    """No lungs: liver, bowel loops full of gas, a colon with gas, fat, spine, table."""
    rng = np.random.default_rng(seed)
    hu = np.full(SHAPE, -1000.0, np.float32)
    body(hu, inner_hu=30.0)
    hu[ellipsoid((75, 110, 80), (80, 45, 40))] = 60.0  # liver
    for cx, cy in ((150, 100), (175, 130), (140, 150), (195, 100)):  # gas-filled small bowel
        hu[ellipsoid((75, cy, cx), (60, 9, 9))] = -1000.0
    hu[ellipsoid((75, 150, 70), (80, 15, 18))] = -1000.0  # colon
    return finish(hu, rng)


def head(seed: int = 0) -> np.ndarray:
    """No lungs: a skull (bone shell) around brain, small air cells, on the table."""
    rng = np.random.default_rng(seed)
    hu = np.full(SHAPE, -1000.0, np.float32)
    hu[ellipsoid((75, 120, 128), (80, 90, 75))] = 800.0
    hu[ellipsoid((75, 120, 128), (72, 83, 68))] = 35.0
    hu[ellipsoid((75, 45, 128), (10, 6, 15))] = -1000.0  # frontal sinus
    return finish(hu, rng)


def geometry(orientation: list[float] = SUPINE_HEAD_FIRST) -> lungs.Geometry:
    return lungs.Geometry.from_orientation(SPACING, orientation)


def ml(mask: np.ndarray, voxel_ml: float = VOXEL_ML) -> float:
    return float(np.count_nonzero(mask)) * voxel_ml


# --- 1. volumes and sides -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_phantom_lung_volumes_and_sides(name: str) -> None:
    orientation, flip = ORIENTATIONS[name]
    phantom = chest(flip)
    masks = lungs.segment(phantom.hu, geometry(orientation))
    assert masks.factor == 1 and masks.hu.shape == SHAPE
    for side, found, truth in (
        ("left", masks.left, phantom.left),
        ("right", masks.right, phantom.right),
    ):
        assert ml(found) == pytest.approx(ml(truth), rel=0.10), side  # truth 311 / 434 mL
        # the patient's side, voxel by voxel (the lungs differ in size and place)
        assert np.count_nonzero(found & truth) >= 0.98 * np.count_nonzero(found), side
    assert not (masks.left & masks.right).any()


# --- 2. dense opacity kept inside, and measured --------------------------------------------------


def test_dense_opacities_inside_the_lung_and_measured() -> None:
    phantom = chest(lesions=True)
    masks = lungs.segment(phantom.hu, geometry())
    lesions = phantom.ground_glass | phantom.consolidation
    # the air threshold leaves the consolidation out; step 7 (holes, closing) takes it back
    assert np.count_nonzero(masks.aerated & phantom.consolidation) == 0
    for lesion in (phantom.ground_glass, phantom.consolidation):
        assert np.count_nonzero(masks.left & lesion) >= 0.97 * np.count_nonzero(lesion)
    assert ml(masks.left) == pytest.approx(ml(phantom.left), rel=0.02)

    q = opacity.quantify(masks)
    left, right = q.lungs["left"], q.lungs["right"]
    # truth: 7.22 mL ground glass + 4.15 mL consolidation; measured 11.14 (the opening takes the
    # sphere caps narrower than its disc: the consolidation reads ~5 % low, ground glass ~0 %)
    assert left.opacity_ml == pytest.approx(ml(lesions), rel=0.06)
    assert left.opacity_ml <= ml(lesions) * 1.01  # no vessel or pleural rim counted
    assert left.high_opacity_ml == pytest.approx(ml(phantom.consolidation), rel=0.10)
    assert q.ground_glass_share == pytest.approx(0.64, abs=0.05)
    assert right.po < 0.1  # vessels and fissure-free normal lung: nothing
    assert left.po == pytest.approx(100 * ml(lesions) / ml(phantom.left), rel=0.06)


@pytest.mark.xfail(
    strict=True,
    reason="known limit (report): a broad-based subpleural consolidation (20 mm, centre 5 mm "
    "inside the pleura) is a bite as wide as the 10 mm closing disc; ~60 % of it is taken back "
    "and that narrow dense crescent is then taken for a vessel, so it reads 0 mL (a 15 mm "
    "closing was measured: it pulled tumour and mediastinum into TCIA A0002, PO 0.4 -> 2 %)",
)
def test_broad_based_subpleural_consolidation_is_measured() -> None:
    phantom = chest()
    lesion = ellipsoid((80, 125, 203), (10, 10, 10)) & phantom.left
    phantom.hu[lesion] = 20.0
    q = opacity.quantify(lungs.segment(phantom.hu, geometry()))
    assert q.lungs["left"].opacity_ml >= 0.8 * ml(lesion)


def test_mixed_density_opacity_at_the_dense_threshold_is_measured() -> None:
    """A lesion whose noise straddles -300 HU is measured whole (opening the ground-glass and
    dense ranges apart once erased it: each range alone was salt and pepper)."""
    phantom = chest()
    lesion = ellipsoid((70, 110, 178), (12, 12, 12)) & phantom.left
    rng = np.random.default_rng(1)
    phantom.hu[lesion] = rng.normal(opacity.DENSE_HU, 20.0, np.count_nonzero(lesion))
    q = opacity.quantify(lungs.segment(phantom.hu, geometry()))
    assert q.lungs["left"].opacity_ml >= 0.8 * ml(lesion)


# --- 3. no lungs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [abdomen, head], ids=["abdomen", "head"])
def test_no_lungs_rejected(make: Callable[[], np.ndarray]) -> None:
    with pytest.raises(SeriesRejected, match=r"^no lungs found"):
        lungs.segment(make(), geometry())


def ct_dataset(slice_hu: np.ndarray, index: int, series_uid: str, study_uid: str) -> Dataset:
    """One CT Image Storage slice: signed 16-bit, slope 1, intercept 0 (so -3024 is storable)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(index)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.InstanceNumber = "CT", index + 1
    ds.ImageOrientationPatient = SUPINE_HEAD_FIRST
    ds.ImagePositionPatient = [-128.0, -128.0, index * SPACING[0]]
    ds.PixelSpacing = [SPACING[1], SPACING[2]]
    ds.SliceThickness = SPACING[0]
    ds.Rows, ds.Columns = slice_hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = np.round(slice_hu).astype("<i2").tobytes()
    return ds


def test_no_lungs_through_the_pipeline(tmp_path: Path, tiny_model_dir: Path) -> None:
    study, series = generate_uid(entropy_srcs=["abdomen"]), generate_uid(entropy_srcs=["s"])
    paths = []
    for k, slice_hu in enumerate(abdomen()):
        paths.append(tmp_path / f"{k:03d}.dcm")
        ct_dataset(slice_hu, k, series, study).save_as(paths[-1], enforce_file_format=True)
    settings = Settings.model_validate({"results": {"send_to": None}})
    verdict, evidence = analyse_files(paths, load_model(tiny_model_dir), settings)
    assert not verdict.analysed
    assert verdict.reason.startswith("no lungs found"), verdict.reason
    assert verdict.series_instance_uid == series and len(evidence) == len(paths)


# --- 4. padding outside the scan circle -----------------------------------------------------------


def through_hounsfield(hu: np.ndarray) -> np.ndarray:
    """The volume as the node reads it: stored values -> ``preprocess.hounsfield`` per slice."""
    uids = ("1.2.3", "1.2.3.4")
    return np.stack([preprocess.hounsfield(ct_dataset(s, k, *uids)) for k, s in enumerate(hu)])


@pytest.mark.parametrize(
    ("padding", "header"),
    [(-2048.0, None), (-3024.0, None), (0.0, None), (0.0, 0.0)],
    ids=["-2048", "-3024", "0-found", "0-in-header"],
)
def test_padding_outside_the_scan_circle(padding: float, header: float | None) -> None:
    phantom = chest()
    plain = lungs.segment(through_hounsfield(phantom.hu), geometry())
    y, x = np.ogrid[: SHAPE[1], : SHAPE[2]]
    outside = (y - 127.5) ** 2 + (x - 127.5) ** 2 > 127.5**2  # corners; cuts the table
    padded = phantom.hu.copy()
    padded[:, outside] = padding
    hu = through_hounsfield(padded)
    if padding < preprocess.AIR_HU:
        assert hu.min() == preprocess.AIR_HU  # clipped to air by preprocess.hounsfield
    masks = lungs.segment(hu, geometry(), padding_hu=header)
    assert (masks.hu[:, outside] == lungs.AIR_HU).all()  # padding is air to the segmentation
    assert ml(masks.left) == pytest.approx(ml(plain.left), rel=0.02)
    assert ml(masks.right) == pytest.approx(ml(plain.right), rel=0.02)
    assert ml(plain.left) == pytest.approx(ml(phantom.left), rel=0.10)


# --- 5. real series -------------------------------------------------------------------------------

CT_DICOM = SHARED_DATA / "ct_dicom"
_A0002 = "tcia_lung_pet_ct_dx/Lung_Dx-A0002/04-25-2007-NA-ThoraxAThoraxRoutine Adult-34834"
#: every series under ct_dicom: whole chest (2-8 L of lung) or a 10-slice slab (0.1-1.5 L)
REAL_SERIES = {
    "covid_ct_md/COVID/P001": "chest",
    "covid_ct_md/CAP/cap001": "chest",
    "covid_ct_md/Normal/normal001": "chest",
    "tcia_lung_pet_ct_dx/Lung_Dx-A0001/04-04-2007-NA-Chest-07990/2.000000-5mm-40805": "chest",
    f"{_A0002}/2.000000-ThoraxRoutine  8.0.0  B70f-62919": "chest",
    f"{_A0002}/3.000000-ThoraxRoutine  8.0.0  B40f-10983": "chest",
    "midrc_ricord/COVID/MIDRC-RICORD-1A-440808-000006": "slab",
    "midrc_ricord/COVID/MIDRC-RICORD-1A-440808-000008": "slab",
    "midrc_ricord/nonCOVID/MIDRC-RICORD-1B-440808-000046": "slab",
    "midrc_ricord/nonCOVID/MIDRC-RICORD-1B-440808-000047": "slab",
    "midrc_ricord/nonCOVID/MIDRC-RICORD-1B-440808-000049": "slab",
}
PLAUSIBLE_ML = {"chest": (2000.0, 8000.0), "slab": (100.0, 1500.0)}


def test_real_series_list_is_complete() -> None:
    require_shared_data(CT_DICOM)
    found = {str(p.parent.relative_to(CT_DICOM)) for p in CT_DICOM.rglob("*.dcm")}
    assert found == set(REAL_SERIES)


@pytest.mark.parametrize("relative", list(REAL_SERIES), ids=lambda r: r.split("/")[-1][:24])
def test_real_series_lung_volumes(relative: str) -> None:
    folder = CT_DICOM / relative
    require_shared_data(folder)
    slices = order_and_check(
        read_headers(series_files(folder)), require_axial=True, max_gap_factor=1.6
    )
    volume, geom, padding = lungs.read_volume(slices)
    masks = lungs.segment(volume, geom, padding_hu=padding)
    voxel = masks.geometry.voxel_ml
    left, right = ml(masks.left, voxel), ml(masks.right, voxel)
    low, high = PLAUSIBLE_ML[REAL_SERIES[relative]]
    assert low <= left + right <= high, (left, right)
    for side in (left, right):  # both lungs present (RICORD ...006: left lung mostly consolidated)
        assert side >= 0.1 * (left + right), (left, right)


def test_pydicom_reads_back_the_phantom_slices(tmp_path: Path) -> None:
    """The writer the pipeline test relies on: what is saved reads back as the same HU."""
    hu = chest().hu[30]
    ct_dataset(hu, 0, "1.2.3", "1.2.3.4").save_as(tmp_path / "s.dcm", enforce_file_format=True)
    back = preprocess.hounsfield(pydicom.dcmread(tmp_path / "s.dcm"))
    assert np.abs(back - np.maximum(np.round(hu), preprocess.AIR_HU)).max() == 0
