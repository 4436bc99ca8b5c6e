"""The shared CT transform: the training path and the node path give identical arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.preprocess import (
    LUNG_WINDOW,
    Window,
    apply_window,
    hounsfield,
    hu_to_input,
    lung_fraction,
    read_dicom,
)
from training.augment import render
from training.dataset import Row, load_input, load_native

DATA = Path(__file__).parents[1].parent / "shared" / "data"
CT_MD = DATA / "ct_dicom" / "covid_ct_md"
TCIA = DATA / "ct_dicom" / "tcia_lung_pet_ct_dx"

needs_data = pytest.mark.skipif(
    not CT_MD.is_dir(), reason=f"real CT data not found at {DATA} (../shared/data)"
)


def _first_dicom(folder: Path) -> Path:
    return sorted(p for p in folder.rglob("*.dcm"))[len(list(folder.rglob("*.dcm"))) // 2]


@needs_data
@pytest.mark.parametrize("folder", [CT_MD / "COVID" / "P001", TCIA / "Lung_Dx-A0001"])
def test_training_and_node_paths_give_identical_arrays(folder: Path) -> None:
    """JPEG Lossless (COVID-CT-MD) and Implicit VR (TCIA) slices, at two sizes."""
    path = _first_dicom(folder)
    row = Row(str(path), "COVID-19", "p", "s", kind="dicom")
    for size in (64, 224):
        node = hu_to_input(hounsfield(read_dicom(path)), size, LUNG_WINDOW)
        training = load_input(row, size, LUNG_WINDOW)
        rendered = render(
            load_native(row), "dicom", size, LUNG_WINDOW, None, np.random.default_rng(0)
        )
        assert training.dtype == node.dtype == np.float32
        np.testing.assert_array_equal(training, node)
        np.testing.assert_array_equal(rendered, node)
        assert node.shape == (size, size) and node.min() >= 0.0 and node.max() <= 1.0


@needs_data
def test_hounsfield_clips_padding_and_finds_lung() -> None:
    hu = hounsfield(read_dicom(_first_dicom(CT_MD / "Normal" / "normal001")))
    assert hu.min() >= -1024.0
    assert lung_fraction(hu) > 0.05


def test_window_maps_level_to_half() -> None:
    w = Window(-600.0, 1500.0)
    out = apply_window(np.array([[-1350.0, -600.0, 150.0, 3000.0]], np.float32), w)
    np.testing.assert_allclose(out, [[0.0, 0.5, 1.0, 1.0]])


@needs_data
def test_body_crop_is_the_same_on_both_paths_and_removes_air() -> None:
    path = _first_dicom(CT_MD / "Normal" / "normal001")
    row = Row(str(path), "Normal", "p", "s", kind="dicom")
    node = hu_to_input(hounsfield(read_dicom(path)), 64, LUNG_WINDOW, crop="body")
    np.testing.assert_array_equal(load_input(row, 64, LUNG_WINDOW, crop="body"), node)
    rendered = render(
        load_native(row), "dicom", 64, LUNG_WINDOW, None, np.random.default_rng(0), crop="body"
    )
    np.testing.assert_array_equal(rendered, node)
    from node.preprocess import body_box

    tcia = apply_window(hounsfield(read_dicom(_first_dicom(TCIA / "Lung_Dx-A0001"))))
    top, bottom, left, right = body_box(tcia)
    assert (bottom - top) * (right - left) < 0.8 * tcia.size  # the air around the body goes


def test_body_box_of_a_synthetic_slice() -> None:
    from node.preprocess import body_box, crop_image

    img = np.zeros((100, 120), np.float32)
    img[20:70, 30:100] = 0.9
    assert body_box(img) == (20, 70, 30, 100)
    assert crop_image(img, "body").shape == (50, 70)
    assert crop_image(np.zeros((10, 10), np.float32), "body").shape == (10, 10)
    with pytest.raises(ValueError, match="unknown crop"):
        crop_image(img, "lungs")


def test_equalise_ignores_monotonic_re_rendering() -> None:
    from node.preprocess import equalise, normalise_image

    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 100, (40, 40)).astype(np.float32)
    a = apply_window(hu, Window(-600, 1500))
    b = apply_window(hu, Window(-500, 1800)) ** 1.3  # another window and gamma, nothing clipped
    np.testing.assert_allclose(equalise(a), equalise(b), atol=1e-6)
    assert equalise(a).min() > 0.0 and equalise(a).max() < 1.0
    assert normalise_image(a, "none") is a
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise_image(a, "zscore")


@needs_data
def test_equalised_inputs_are_the_same_on_both_paths() -> None:
    path = _first_dicom(CT_MD / "COVID" / "P001")
    row = Row(str(path), "COVID-19", "p", "s", kind="dicom")
    node = hu_to_input(hounsfield(read_dicom(path)), 64, LUNG_WINDOW, normalise="equalise")
    np.testing.assert_array_equal(load_input(row, 64, LUNG_WINDOW, normalise="equalise"), node)
    rendered = render(
        load_native(row),
        "dicom",
        64,
        LUNG_WINDOW,
        None,
        np.random.default_rng(0),
        normalise="equalise",
    )
    np.testing.assert_array_equal(rendered, node)
