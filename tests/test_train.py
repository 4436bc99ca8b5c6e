"""Training end to end on tiny generated data: 3 classes, 32 px, random backbone, 1-2 epochs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from PIL import Image

from node.model_spec import load_spec
from training.config import TrainConfig
from training.train import run

CLASSES_3 = ["Normal", "Pneumonia", "COVID-19"]


def make_images(root: Path, per_class: int = 4, size: int = 40) -> Path:
    """Folder-per-class grey JPEGs, each class with its own brightness pattern."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["Normal", "CAP", "COVID"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size)) + 60 * c
            img[size // 4 : size // 2, :] += 40 * c
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i}.jpg")
    return root


def make_csv_source(root: Path) -> Path:
    """A CSV manifest with patient ids (two slices per patient) pointing at generated images."""
    images = make_images(root / "img", per_class=4)
    csv_path = root / "manifest.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id"])
        for cls in ("Normal", "CAP", "COVID"):
            for i in range(4):
                w.writerow([f"img/{cls}/{i}.jpg", cls, f"{cls}-{i // 2}"])
    assert images.is_dir()
    return csv_path


def tiny_config(tmp_path: Path, **overrides: Any) -> TrainConfig:
    folders = make_images(tmp_path / "folders")
    manifest = make_csv_source(tmp_path / "csvsrc")
    data: dict[str, Any] = {
        "name": "tiny",
        "version": "0.0.1",
        "classes": CLASSES_3,
        "positive_class": "COVID-19",
        "input_size": 32,
        "backbone_weights": None,
        "sources": [
            {
                "name": "folders",
                "kind": "folders",
                "path": str(folders),
                "split": "carve",
                "licence": "generated",
            },
            {"name": "csvsrc", "kind": "csv", "path": str(manifest), "split": "train"},
        ],
        "split": {"val_fraction": 0.25, "test_fraction": 0.25},
        "head": {"epochs": 2, "batch_size": 8, "renderings": 1, "learning_rate": 1e-3},
        "finetune": {"epochs": 1, "batch_size": 4, "top_blocks": 1},
        "output_root": str(tmp_path / "models"),
        "work_dir": str(tmp_path / "work"),
    }
    data.update(overrides)
    return TrainConfig.model_validate(data)


def test_tiny_three_class_run_writes_loadable_model_dir(tmp_path: Path) -> None:
    model_dir = run(tiny_config(tmp_path))
    spec = load_spec(model_dir)
    assert spec.classes == CLASSES_3 and spec.input_size == 32
    assert spec.sha256 and len(spec.sha256) == 64
    model = keras.models.load_model(model_dir / "model.keras", compile=False)
    probs = model.predict(np.zeros((2, 32, 32, 1), np.float32), verbose=0)
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    for name in (
        "evaluation.json",
        "MODEL_CARD.md",
        "training_head_log.csv",
        "training_finetune_log.csv",
        "confusion_folders.png",
    ):
        assert (model_dir / name).is_file(), name
    evaluation = json.loads((model_dir / "evaluation.json").read_text())
    assert "held_out_test" in evaluation["sources"]["folders"]
    # model.keras and model.tflite (the same weights twice) each stay under max_model_mb
    assert all(p.stat().st_size < 25e6 for p in model_dir.iterdir())
    assert spec.tflite is not None and (model_dir / "model.tflite").is_file()


class Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch == 1:
            raise KeyboardInterrupt("simulated interruption")


def test_training_resumes_after_interruption(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        head={"epochs": 4, "batch_size": 8, "renderings": 1, "patience": 10},
        finetune={"epochs": 0},
    )
    with pytest.raises(KeyboardInterrupt):
        run(cfg, extra_callbacks=[Interrupt()])
    work = tmp_path / "work"
    epochs_before = [
        json.loads(line)["epoch"] for line in (work / "head" / "log.jsonl").read_text().splitlines()
    ]
    assert epochs_before == [0, 1]
    assert any((work / "features").iterdir()), "feature cache kept for the resumed run"
    model_dir = run(cfg)
    epochs = [
        json.loads(line)["epoch"] for line in (work / "head" / "log.jsonl").read_text().splitlines()
    ]
    assert epochs == [0, 1, 2, 3], "resumed at epoch 2 instead of starting over"
    assert load_spec(model_dir).name == "tiny"


def test_folded_head_equals_head_on_standardised_features() -> None:
    from training.train import build_head, fold_standardisation, head_predict

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (16, 8)).astype(np.float32)
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-3
    head = build_head(8, 3, 0.2, 1e-3)
    expected = head.predict((x - mu) / sd, verbose=0)
    kernel, bias = fold_standardisation(head, mu, sd)
    np.testing.assert_allclose(head_predict(x, kernel, bias), expected, rtol=1e-4, atol=1e-5)


def test_series_rule_choice_does_not_reward_calling_everything_negative() -> None:
    from node.model_spec import SeriesRule
    from training.export import choose_series_rule

    series = {
        "a": {
            "patient_id": "a",
            "label": "COVID-19",
            "positive": True,
            "selected": 6,
            "scores": [0.95, 0.9, 0.8, 0.7, 0.2, 0.1],
        },
        **{
            n: {
                "patient_id": n,
                "label": "Normal",
                "positive": False,
                "selected": 6,
                "scores": [0.85, 0.3, 0.2, 0.1, 0.1, 0.1],
            }
            for n in "bcd"
        },
    }
    silent = SeriesRule(kind="top_k_mean", k=1, series_threshold=0.99)
    useful = SeriesRule(kind="top_k_mean", k=3, series_threshold=0.5)
    rule, results = choose_series_rule(series, [silent, useful], min_slices=5)
    assert rule == useful
    assert results[1]["balanced_accuracy"] == 1.0 and results[0]["balanced_accuracy"] == 0.5


def test_held_out_by_site_never_trains_on_the_scored_site() -> None:
    """Leave-one-site-out: every row of a ``lopo`` source is scored by a head that saw no row of
    that source; leave-one-patient-out still trains on the rest of the patient's site."""
    from dataclasses import dataclass

    from training.dataset import Row
    from training.train import Phase1

    @dataclass
    class Src:
        name: str
        lopo: bool

    @dataclass
    class Cfg:
        sources: list[Src]

    rows = [
        Row(
            f"{s}/{p}/{i}",
            "COVID-19" if p == 0 else "Normal",
            f"{s}:{p}",
            s,
            "dicom",
            split="train",
        )
        for s in ("siteA", "siteB")
        for p in range(2)
        for i in range(3)
    ] + [Row(f"img/{i}", "Normal", f"img:{i}", "images", split="train") for i in range(4)]
    phase = object.__new__(Phase1)
    phase.cfg = Cfg([Src("siteA", True), Src("siteB", True), Src("images", False)])  # type: ignore[assignment]
    phase.rows = rows
    phase.train_idx = list(range(len(rows)))
    phase.base = np.arange(len(rows), dtype=np.float32)[:, None]
    phase.aug_feats = []
    phase.labels = np.array([1 if r.label == "COVID-19" else 0 for r in rows])
    phase.source_weight = {}
    seen: list[set[str]] = []

    def fake_fit(exclude: Any, log_dir: Any, extra: Any = (), exclude_by: Any = None) -> Any:
        x, _, _ = phase.train_set(exclude, exclude_by)
        seen.append({rows[int(v)].source + "|" + rows[int(v)].patient_id for v in x[:, 0]})
        return np.zeros((1, 2), np.float32), np.zeros(2, np.float32)

    phase.fit_head = fake_fit  # type: ignore[method-assign]
    by_site = phase.held_out_scores(1, "site")
    assert sorted(by_site) == list(range(12)), "every row of the lopo sources scored once"
    assert [sorted({k.split("|")[0] for k in s}) for s in seen] == [
        ["images", "siteB"],
        ["images", "siteA"],
    ]
    seen.clear()
    phase.held_out_scores(1, "patient")
    assert len(seen) == 4
    assert all("siteA|siteA:1" in s for s in seen[:1])  # patient siteA:0 out, its site-mate in
    assert all("siteA|siteA:0" not in s for s in seen[:1])


def test_fine_tuned_model_file_has_no_optimizer_state(tmp_path: Path) -> None:
    """The exported model holds weights only: a fine-tuned model's Adam slots would double it."""
    import zipfile

    model_dir = run(tiny_config(tmp_path))
    with zipfile.ZipFile(model_dir / "model.keras") as z:
        import io

        import h5py

        with h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as f:
            assert "optimizer" not in f, "optimizer state saved with the model"


def test_site_experiment_refuses_a_config_that_trains_on_the_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A site experiment is only honest if the site is absent from training."""
    import yaml

    from training.site_experiment import main

    cfg = tiny_config(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(path), "--site", str(tmp_path / "folders")])
    assert exc.value.code == 2
    assert "leave the site out" in capsys.readouterr().err
