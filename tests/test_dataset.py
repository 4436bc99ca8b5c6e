"""Dataset readers, the manifest, patient-level splits and sample weights, on tiny generated data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.dataset import (
    COVID,
    NON_COVID,
    NORMAL,
    PNEUMONIA,
    Row,
    canonical_label,
    check_patient_disjoint,
    class_index,
    covidx_patient_id,
    load_input,
    read_covidx,
    read_csv_manifest,
    read_image_folders,
    read_manifest,
    sample_weights,
    split_by_patient,
    write_manifest,
)


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 12), value, np.uint8)).save(path)
    return path


def test_read_image_folders(tmp_path: Path) -> None:
    _png(tmp_path / "COVID" / "a.png")
    _png(tmp_path / "NonCOVID" / "b.jpg")
    _png(tmp_path / "Normal" / "sub" / "c.png")
    (tmp_path / "Normal" / "notes.txt").write_text("x")
    rows = read_image_folders(tmp_path, "src")
    assert sorted((Path(r.path).name, r.label) for r in rows) == [
        ("a.png", COVID),
        ("b.jpg", NON_COVID),
        ("c.png", NORMAL),
    ]
    assert len({r.patient_id for r in rows}) == 3 and all(r.source == "src" for r in rows)


def test_read_csv_manifest_paths_relative_to_csv(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "img" / "x.png")
    _png(tmp_path / "data" / "img" / "y.png")
    csv_path = tmp_path / "data" / "list.csv"
    csv_path.write_text("path,label,patient_id\nimg/x.png,COVID,p1\nimg/y.png,CAP,p1\n")
    rows = read_csv_manifest(csv_path, "mine")
    assert [r.label for r in rows] == [COVID, PNEUMONIA]
    assert rows[0].path == str((tmp_path / "data" / "img" / "x.png").resolve())
    assert {r.patient_id for r in rows} == {"mine:p1"}
    no_pid = tmp_path / "data" / "nopid.csv"
    no_pid.write_text("path,label\nimg/x.png,Normal\n")
    assert read_csv_manifest(no_pid)[0].patient_id == "data:x"
    bad = tmp_path / "data" / "bad.csv"
    bad.write_text("file,label\nimg/x.png,Normal\n")
    with pytest.raises(ValueError, match="path"):
        read_csv_manifest(bad)


def test_read_covidx_label_file_and_metadata(tmp_path: Path) -> None:
    labels = tmp_path / "train_COVIDx_CT-2A.txt"
    labels.write_text(
        "NCP_96_1328_0032.png 2 10 20 400 380\n"
        "NCP_96_1328_0033.png 2 10 20 400 380\n"
        "CP_12_3310_0005.png 1 0 0 512 512\n"
        "Normal_7_12_0001.png 0 1 2 3 4\n"
    )
    meta = tmp_path / "metadata.csv"
    meta.write_text("patient id,source,country\nNCP_96,CNCB,China\n")
    rows = read_covidx(labels, tmp_path / "2A_images", meta)
    assert [r.label for r in rows] == [COVID, COVID, PNEUMONIA, NORMAL]
    assert rows[0].patient_id == rows[1].patient_id == "covidx:NCP_96"
    assert rows[0].source == "covidx/CNCB" and rows[2].source == "covidx"
    assert all(r.official_split == "train" for r in rows)
    assert covidx_patient_id("Normal_7_12_0001.png") == "Normal_7"
    (tmp_path / "bad.txt").write_text("x.png 3 0 0 1 1\n")
    with pytest.raises(ValueError, match="class 3"):
        read_covidx(tmp_path / "bad.txt", tmp_path)


def test_manifest_round_trip(tmp_path: Path) -> None:
    rows = [
        Row("/a.dcm", COVID, "p", "s", kind="dicom", slice_label=1, z=-3.5, series_uid="1.2"),
        Row("/b.png", NORMAL, "q", "s", official_split="test", split="test"),
    ]
    write_manifest(rows, tmp_path / "m.csv")
    assert read_manifest(tmp_path / "m.csv") == rows


def test_labels_and_classes() -> None:
    assert canonical_label("lung_cancer_dx(not COVID)") == NON_COVID
    assert canonical_label("nonCOVID") == NON_COVID
    with pytest.raises(ValueError):
        canonical_label("banana")
    two = ["non-COVID", "COVID-19"]
    three = ["Normal", "Pneumonia", "COVID-19"]
    assert [class_index(x, two) for x in (NORMAL, PNEUMONIA, NON_COVID, COVID)] == [0, 0, 0, 1]
    assert [class_index(x, three) for x in (NORMAL, PNEUMONIA, NON_COVID, COVID)] == [0, 1, None, 2]


def _patients(n: int, slices: int = 3) -> list[Row]:
    return [
        Row(f"/{p}_{s}.png", COVID if p % 3 else NORMAL, f"p{p}", "src")
        for p in range(n)
        for s in range(slices)
    ]


def test_split_by_patient_is_disjoint_and_stratified() -> None:
    rows = split_by_patient(_patients(40), 0.2, 0.25, seed=1)
    check_patient_disjoint(rows)
    by_patient: dict[str, set[str | None]] = {}
    for r in rows:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in by_patient.values())
    for split in ("train", "val", "test"):
        labels = {r.label for r in rows if r.split == split}
        assert labels == {COVID, NORMAL}, split
    assert split_by_patient(_patients(40), 0.2, 0.25, seed=1) == rows  # seeded


def test_split_keeps_official_split_and_rejects_conflicts() -> None:
    rows = [
        Row("/a", COVID, "p1", "s", official_split="test"),
        Row("/b", COVID, "p1", "s", official_split="test"),
        Row("/c", NORMAL, "p2", "s", official_split="val"),
    ]
    out = split_by_patient(rows, 0.5, 0.5, seed=0)
    assert [r.split for r in out] == ["test", "test", "val"]
    assert {r.split for r in split_by_patient(rows, 0.5, 0.5, 0, fixed="train")} == {"train"}
    clash = [*rows, Row("/d", COVID, "p1", "s", official_split="train")]
    with pytest.raises(ValueError, match="several official splits"):
        split_by_patient(clash, 0.5, 0.5, seed=0)


def test_check_patient_disjoint_catches_a_crossing_patient() -> None:
    rows = [Row("/a", COVID, "p1", "s", split="train"), Row("/b", COVID, "p1", "s", split="test")]
    with pytest.raises(ValueError, match="crossing"):
        check_patient_disjoint(rows)


def test_sample_weights_balance_classes_with_source_multipliers() -> None:
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 1])
    sources = ["a", "a", "a", "a", "b", "b", "b", "b", "b", "b"]
    w = sample_weights(labels, sources)
    assert w.mean() == pytest.approx(1.0)
    assert w[labels == 0].sum() == pytest.approx(w[labels == 1].sum())
    w2 = sample_weights(labels, sources, {"b": 3.0})
    assert w2[5] / w2[3] == pytest.approx(3.0)  # same class, source b weighs 3x


def test_load_input_of_an_8bit_file(tmp_path: Path) -> None:
    path = _png(tmp_path / "x.png", 255)
    x = load_input(Row(str(path), COVID, "p", "s"), 16)
    assert x.shape == (16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x[8], 1.0, atol=1e-6)


def test_csv_manifest_with_slice_labels(tmp_path: Path) -> None:
    with open(tmp_path / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "patient_folder", "label", "z", "slice_infection_label"])
        w.writerow(["P1/a.dcm", "P1", "COVID", "-10.5", "1"])
        w.writerow(["P1/b.dcm", "P1", "COVID", "-14.5", ""])
    rows = read_csv_manifest(tmp_path / "manifest.csv", "ct")
    assert [(r.kind, r.slice_label, r.z, r.patient_id) for r in rows] == [
        ("dicom", 1, -10.5, "ct:P1"),
        ("dicom", None, -14.5, "ct:P1"),
    ]
