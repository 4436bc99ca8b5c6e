"""Training stage, research aid: does a recipe generalise to a hospital it never saw?

``python -m training.site_experiment --config training/configs/experiments/<name>.yaml
--site ../shared/data/ct_dicom/covid_ct_md [--log models/<name>/<version>/ablation.jsonl]``

The config leaves one Hounsfield DICOM site out of its sources entirely.  This trains it with
``training.train`` (so any recipe, fine-tuning included, is measured as it would ship), scores the
left-out site's series through the node's own inference path (``training.evaluate``: slice
selection, series rule) and prints one JSON line: UCSD/MosMed held-out ROC AUC with their
patient-bootstrap intervals, the site's infected-slice AUC and its series verdicts.  ``--log``
appends the line to a JSONL file (the shipped model's ``ablation.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def summarise(config: Path, model_dir: Path, site: Path) -> dict[str, Any]:
    import keras

    from node.model_spec import MODEL_FILE, load_spec
    from training.evaluate import dicom_rows, evaluate_series

    report = json.loads((model_dir / "evaluation.json").read_text())
    out: dict[str, Any] = {"experiment": config.stem, "config": str(config)}
    for name, entry in report.get("sources", {}).items():
        test = entry.get("held_out_test")
        if test:
            out[f"{name}_test_auc"] = test["roc_auc"]
            out[f"{name}_test_auc_ci95"] = test.get("roc_auc_ci95")
            for group, g in test.get("by_subgroup", {}).items():
                out[f"{name}_{group}_auc"] = g["roc_auc_vs_negatives"]
    spec = load_spec(model_dir)
    model = keras.models.load_model(model_dir / MODEL_FILE, compile=False)
    held = evaluate_series(model, spec, dicom_rows(site, None))
    sel = held["selected_slices"]
    out[f"{site.name}_site_out_infected_auc"] = sel["infected_vs_non_covid_auc"]
    out[f"{site.name}_site_out_infected_auc_ci95"] = sel.get("infected_vs_non_covid_ci95")
    out[f"{site.name}_site_out_within_patient_auc"] = {
        k: round(v["auc"], 3) for k, v in sel["within_patient_marked_vs_unmarked_auc"].items()
    }
    out[f"{site.name}_site_out_series"] = {
        v["patient_id"]: {k: v.get(k) for k in ("score", "positive", "correct", "verdict")}
        for v in held["series"].values()
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.site_experiment", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--site", type=Path, required=True, help="the left-out DICOM site folder")
    parser.add_argument("--log", type=Path, help="append the JSON line to this file")
    args = parser.parse_args(argv)
    import logging

    from training.config import load_config
    from training.train import run

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = load_config(args.config)
    if any(cfg.resolved(s.path).resolve().is_relative_to(args.site.resolve()) for s in cfg.sources):
        parser.error(f"{args.config} trains on {args.site}: leave the site out of its sources")
    line = json.dumps(summarise(args.config, run(cfg), args.site))
    print(line)
    if args.log:
        with open(args.log, "a") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
