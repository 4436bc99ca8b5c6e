"""Analysis fit and evaluation: Hounsfield series -> PO threshold (site held out) and a report.

``python -m training.analysis --model models/<name>/<version>`` runs every series listed in
``training/configs/analysis_series.csv`` (paths relative to ``--data``, ../shared/data by
default; add a hospital's own labelled series the same way) through the node's own analysis
(``node.pipeline.analyse_files``: segmentation, quantification, CNN, assessment), then

- fits the one fitted parameter, ``analysis.po_threshold``, on all labelled series, and again
  with each **site** left out, scoring the left-out site with the threshold its absence gave
  (``fit_threshold``: the geometric mean of the largest PO without pneumonia and the smallest
  PO with pneumonia among the training series);
- reports per series (held out: yes, always, for the flag) the category, PO/PHO, the CNN
  score and whether the pneumonia flag was right; sensitivity and specificity per site and in
  all, held out; the CNN's series-level AUC for both questions beside PO's;
- measures the within-patient slice AUC of slice PO against COVID-CT-MD's slice labels;
- writes ``analysis_evaluation.json`` and, with ``--write``, the fitted ``analysis`` block and
  a recomputed ``notice`` into ``model.json``; ``--overlays DIR`` draws lung and opacity
  overlays of every series there (not into the repository: the images are licensed data);
- with ``--write-reference``, the ``reference`` block of ``model.json``: the PO and CNN scores
  of these series and their input mix read from their headers (``node.drift.input_mix``), which
  the node's drift monitoring compares its own series with.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from node.assess import assess
from node.config import Settings
from node.drift import InputMix, input_mix, reference_summary
from node.infer import LoadedModel, load_model
from node.lungs import read_volume, segment
from node.model_spec import SPEC_FILE, AnalysisSpec, load_spec
from node.opacity import Quantification, opacity_mask, quantify
from node.pipeline import analyse_files
from node.series_check import order_and_check, read_headers
from training.evaluate import _auc, auc_ci95

logger = logging.getLogger(__name__)

DEFAULT_SERIES = Path(__file__).parent / "configs" / "analysis_series.csv"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EVALUATION_FILE = "analysis_evaluation.json"
CARD_FILE = "ANALYSIS.md"


@dataclasses.dataclass
class SeriesResult:
    """One analysed series with its labels (``pneumonia``/``covid``: None when unknown)."""

    name: str
    site: str
    patient_id: str
    diagnosis: str
    pneumonia: bool | None
    covid: bool | None
    series_uid: str
    analysed: bool
    reason: str = ""
    po: float = 0.0
    pho: float = 0.0
    volume_ml: float = 0.0
    category: str = ""
    cnn_score: float | None = None
    slice_thickness_mm: float = 0.0
    slices: int = 0
    verdict: dict[str, Any] = dataclasses.field(default_factory=dict)
    quantification: Quantification | None = None  # to re-assess with the fitted threshold
    mix: InputMix | None = None  # scanner, kernel, thickness, contrast (drift reference)


def _flag(value: str) -> bool | None:
    return None if value.strip() == "" else value.strip() == "1"


def analyse_listed(
    listing: Path, data: Path, model: LoadedModel, settings: Settings
) -> list[SeriesResult]:
    """Every series of every listed folder through ``analyse_files`` (the node's path)."""
    from node.classify import collect_series

    results = []
    with open(listing, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        folder = data / row["path"]
        if not folder.is_dir():
            raise FileNotFoundError(f"{listing}: {folder} does not exist")
        series = sorted(collect_series([folder]).items())
        for uid, files in series:
            verdict, evidence = analyse_files(files, model, settings)
            v = verdict.as_json()
            total = verdict.quantification.total if verdict.quantification else None
            header = evidence[0] if evidence else None
            result = SeriesResult(
                name=Path(row["path"]).name + (f"/{uid[-6:]}" if len(series) > 1 else ""),
                site=row["site"],
                patient_id=row["patient_id"],
                diagnosis=row["diagnosis"],
                pneumonia=_flag(row["pneumonia"]),
                covid=_flag(row["covid"]),
                series_uid=uid,
                analysed=verdict.analysed,
                reason=verdict.reason,
                po=total.po if total else 0.0,
                pho=total.pho if total else 0.0,
                volume_ml=total.volume_ml if total else 0.0,
                category=verdict.category,
                cnn_score=verdict.series_score,
                slice_thickness_mm=float(header.get("SliceThickness", 0) or 0) if header else 0,
                slices=len(files),
                verdict=v,
                quantification=verdict.quantification,
                mix=input_mix(header) if header is not None else None,
            )
            logger.info(
                "%s %s: %s PO %.2f%% PHO %.2f%% CNN %s",
                result.site,
                result.name,
                result.category,
                result.po,
                result.pho,
                "-" if result.cnn_score is None else f"{result.cnn_score:.3f}",
            )
            results.append(result)
    return results


def fit_threshold(results: list[SeriesResult], default: float) -> tuple[float, str]:
    """PO threshold from series with a known pneumonia label; ``default`` when a class is absent.

    The geometric mean of the largest PO without pneumonia and the smallest PO with it: the
    widest margin on a log scale (PO spans three decades).  Where the classes overlap the same
    rule still gives a value between them, and the held-out evaluation shows the cost.
    """
    neg = [r.po for r in results if r.analysed and r.pneumonia is False]
    pos = [r.po for r in results if r.analysed and r.pneumonia is True]
    if not neg or not pos:
        return default, f"default {default:g}% (a class is missing among the training series)"
    hi_neg, lo_pos = max(neg), min(pos)
    value = math.sqrt(max(hi_neg, 0.01) * max(lo_pos, 0.01))
    return round(value, 3), (
        f"geometric mean of the largest PO without pneumonia ({hi_neg:.2f}%) and the smallest "
        f"PO with pneumonia ({lo_pos:.2f}%) over {len(neg) + len(pos)} series"
    )


def _rates(rows: list[dict[str, Any]]) -> dict[str, Any]:
    pos = [r for r in rows if r["pneumonia"] is True]
    neg = [r for r in rows if r["pneumonia"] is False]
    tp = sum(r["flagged"] for r in pos)
    tn = sum(not r["flagged"] for r in neg)
    return {
        "sensitivity": None if not pos else round(tp / len(pos), 3),
        "specificity": None if not neg else round(tn / len(neg), 3),
        "true_positive": tp,
        "positives": len(pos),
        "true_negative": tn,
        "negatives": len(neg),
    }


def site_held_out(results: list[SeriesResult], default: float) -> dict[str, Any]:
    """Fit the PO threshold without each site, flag that site's series with it."""
    rows = []
    for site in sorted({r.site for r in results}):
        threshold, how = fit_threshold([r for r in results if r.site != site], default)
        for r in results:
            if r.site != site:
                continue
            flagged = r.analysed and r.po >= threshold
            rows.append(
                {
                    "series": r.name,
                    "site": site,
                    "diagnosis": r.diagnosis,
                    "pneumonia": r.pneumonia,
                    "po": r.po,
                    "threshold_without_site": threshold,
                    "flagged": flagged,
                    "right": None if r.pneumonia is None else flagged == r.pneumonia,
                    "fit": how,
                }
            )
    by_site = {s: _rates([r for r in rows if r["site"] == s]) for s in {r["site"] for r in rows}}
    return {"series": rows, "per_site": by_site, "all": _rates(rows)}


def series_aucs(results: list[SeriesResult]) -> dict[str, Any]:
    """Series-level ROC AUC of PO and of the CNN score for both questions (few series: say so)."""
    out: dict[str, Any] = {}
    for question in ("pneumonia", "covid"):
        known = [r for r in results if r.analysed and getattr(r, question) is not None]
        y = np.array([getattr(r, question) for r in known], dtype=int)
        entry: dict[str, Any] = {"series": len(known), "positive": int(y.sum())}
        for name, values in (
            ("po", [r.po for r in known]),
            ("cnn", [r.cnn_score or 0.0 for r in known]),
        ):
            auc = _auc(y, np.array(values))
            entry[f"{name}_auc"] = None if auc is None else round(auc, 3)
        out[question] = entry
    return out


def slice_aucs(listing: Path, data: Path) -> dict[str, Any]:
    """Within-patient AUC of slice PO against the slice infection labels of a manifest.csv."""
    out: dict[str, Any] = {}
    with open(listing, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        folder = data / row["path"]
        manifest = folder.parent.parent / "manifest.csv"
        if not manifest.is_file():
            continue
        with open(manifest, newline="") as fh:
            labels = {
                r["SOPInstanceUID"]: r.get("slice_infection_label", "")
                for r in csv.DictReader(fh)
                if "SOPInstanceUID" in r
            }
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        slices = order_and_check(read_headers(files), require_axial=True, max_gap_factor=1.6)
        marks = [labels.get(s.sop_instance_uid, "") for s in slices]
        if "1" not in marks:
            continue
        volume, geometry, padding = read_volume(slices)
        q = quantify(segment(volume, geometry, padding_hu=padding))
        y = np.array([m == "1" for m in marks], dtype=int)
        auc = _auc(y, np.array(q.slice_po))
        auc_ml = _auc(y, np.array(q.slice_opacity_ml))
        out[row["patient_id"]] = {
            "slices": len(y),
            "marked_infected": int(y.sum()),
            "auc": None if auc is None else round(auc, 3),
            "auc_opacity_ml": None if auc_ml is None else round(auc_ml, 3),
            # adjacent slices are correlated: a block bootstrap over runs of 4 slices
            "ci95": auc_ci95(y, np.array(q.slice_po), [str(i // 4) for i in range(len(y))]),
        }
    return out


def notice(held_out: dict[str, Any], slices: dict[str, Any]) -> str:
    """The caveat written into every SR, computed from the held-out results."""
    rates = held_out["all"]
    slice_text = ", ".join(
        f"{pid} {v['auc']:.2f}" for pid, v in slices.items() if v["auc"] is not None
    )
    return (
        "Hounsfield opacity analysis validated on few series only: with each site held out it "
        f"flagged {rates['true_positive']} of {rates['positives']} pneumonia series and cleared "
        f"{rates['true_negative']} of {rates['negatives']} without pneumonia; slice opacity vs "
        f"radiologists' slice marks ROC AUC {slice_text}. The category reads the pattern, it "
        "does not diagnose COVID-19. Validate locally before relying on it."
    )


def draw_overlays(results: list[SeriesResult], listing: Path, data: Path, out: Path) -> None:
    """One PNG per series: eight slices, lungs outlined, opacity in red (for looking, not CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from node.classify import collect_series

    out.mkdir(parents=True, exist_ok=True)
    with open(listing, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for uid, files in sorted(collect_series([data / row["path"]]).items()):
            slices = order_and_check(read_headers(files), require_axial=True, max_gap_factor=1.6)
            volume, geometry, padding = read_volume(slices)
            masks = segment(volume, geometry, padding_hu=padding)
            opacity = opacity_mask(masks)
            n = len(slices)
            picks = np.linspace(0, n - 1, min(8, n)).round().astype(int)
            fig, axes = plt.subplots(2, 4, figsize=(16, 8.4))
            for ax in axes.ravel():
                ax.axis("off")
            for ax, i in zip(axes.ravel(), picks, strict=False):
                grey = np.clip((masks.hu[i] + 1350.0) / 1500.0, 0, 1)
                rgb = np.stack([grey] * 3, axis=-1)
                rgb[find_boundaries(masks.left[i])] = (0.2, 0.45, 1.0)
                rgb[find_boundaries(masks.right[i])] = (0.2, 0.9, 0.2)
                rgb[opacity[i]] = rgb[opacity[i]] * 0.4 + np.array([1.0, 0.0, 0.0]) * 0.6
                ax.imshow(rgb)
                ax.set_title(f"slice {i + 1}/{n}", fontsize=9)
            result = next((r for r in results if r.series_uid == uid), None)
            title = f"{row['site']} {Path(row['path']).name}"
            if result is not None:
                title += f": {result.category}, PO {result.po:.2f}%, PHO {result.pho:.2f}%"
            fig.suptitle(title + "  (blue: left lung, green: right lung, red: opacity)")
            fig.tight_layout()
            fig.savefig(out / f"{row['site']}_{Path(row['path']).name}_{uid[-6:]}.png", dpi=60)
            plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings.model_validate({"results": {"send_to": None}})
    cache = Path(tempfile.gettempdir()) / "triage-analysis-litert"
    model = load_model(args.model, runtime="auto", cache_dir=cache)
    results = analyse_listed(args.series, args.data, model, settings)
    default = AnalysisSpec().po_threshold
    threshold, how = fit_threshold(results, default)
    fitted = model.spec.analysis.model_copy(update={"po_threshold": threshold})
    for r in results:  # the categories the fitted model.json gives (the flag is held out below)
        if r.quantification is not None:
            assessment = assess(r.quantification, fitted, r.cnn_score)
            r.category = assessment.category
            r.verdict["assessment"] = assessment.as_json()
    held_out = site_held_out(results, default)
    slices = slice_aucs(args.series, args.data)
    report = {
        "analysis_version": results[0].verdict.get("analysis_version") if results else "",
        "po_threshold": threshold,
        "po_threshold_fit": how,
        "site_held_out": held_out,
        "series_auc": series_aucs(results),
        "slice_auc_within_patient": slices,
        "series": [
            {
                f.name: getattr(r, f.name)
                for f in dataclasses.fields(r)
                if f.name not in ("verdict", "quantification", "mix")
            }
            | {"assessment": r.verdict.get("assessment"), "coverage": r.verdict.get("coverage")}
            for r in results
        ],
    }
    (args.model / EVALUATION_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (args.model / CARD_FILE).write_text(analysis_card(report))
    if args.write:
        write_analysis(args.model, threshold, how, held_out, slices)
    if args.write_reference:
        write_reference(args.model, results, args.series)
    if args.overlays is not None:
        draw_overlays(results, args.series, args.data, args.overlays)
    return report


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def analysis_card(report: dict[str, Any]) -> str:
    """``ANALYSIS.md``: the measured table of the Hounsfield analysis, from ``report`` only."""
    held = {r["series"]: r for r in report["site_held_out"]["series"]}
    lines = [
        f"# Hounsfield analysis: {report['analysis_version']}",
        "",
        "Written by `python -m training.analysis`; every number below is measured by it.",
        "",
        f"PO threshold {report['po_threshold']:g}% ({report['po_threshold_fit']}).",
        "",
        "| site | series | diagnosis | category | PO % | PHO % | lung mL | CNN score "
        "| flag threshold without the site | flagged | right |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["series"]:
        h = held.get(r["name"], {})
        cnn = "-" if r["cnn_score"] is None else f"{r['cnn_score']:.2f}"
        right = {True: "yes", False: "**no**", None: "(no label)"}[h.get("right")]
        lines.append(
            f"| {r['site']} | {r['name']} | {r['diagnosis']} | {r['category']} | {r['po']:.2f} "
            f"| {r['pho']:.2f} | {r['volume_ml']:.0f} | {cnn} "
            f"| {h.get('threshold_without_site', '-')} | {'yes' if h.get('flagged') else 'no'} "
            f"| {right} |"
        )
    lines += ["", "Held out by site (pneumonia flag):", "", "| site | sensitivity | specificity |"]
    lines.append("|---|---|---|")
    for site, rates in sorted(report["site_held_out"]["per_site"].items()):
        lines.append(
            f"| {site} | {_pct(rates['sensitivity'])} ({rates['true_positive']}/"
            f"{rates['positives']}) | {_pct(rates['specificity'])} ({rates['true_negative']}/"
            f"{rates['negatives']}) |"
        )
    rates = report["site_held_out"]["all"]
    lines.append(
        f"| all | {_pct(rates['sensitivity'])} ({rates['true_positive']}/{rates['positives']}) "
        f"| {_pct(rates['specificity'])} ({rates['true_negative']}/{rates['negatives']}) |"
    )
    lines += [
        "",
        "Series-level ROC AUC (threshold-free; the CNN saw these series in training):",
        "",
    ]
    for question, entry in report["series_auc"].items():
        lines.append(
            f"- {question}: PO {entry['po_auc']}, CNN {entry['cnn_auc']} "
            f"({entry['positive']} of {entry['series']} series positive)"
        )
    lines += ["", "Within-patient slice AUC of slice PO vs the radiologists' slice marks:", ""]
    for pid, entry in report["slice_auc_within_patient"].items():
        lines.append(
            f"- {pid}: {entry['auc']} (95% CI {entry['ci95']}, {entry['marked_infected']} of "
            f"{entry['slices']} slices marked); slice opacity volume (mL) instead of PO: "
            f"{entry['auc_opacity_ml']}"
        )
    return "\n".join(lines) + "\n"


def write_analysis(
    model_dir: Path, threshold: float, how: str, held_out: dict[str, Any], slices: dict[str, Any]
) -> None:
    """Put the fitted threshold, its evaluation and the recomputed notice into model.json."""
    spec = load_spec(model_dir)
    raw = json.loads((model_dir / SPEC_FILE).read_text())
    analysis = spec.analysis.model_copy(
        update={
            "po_threshold": threshold,
            "justification": (
                f"po_threshold: {how}. The HU ranges (-700 HU well-aerated limit, -200 HU high "
                "opacity) are from Colombi et al. 2020 and Chaganti et al. 2020; the pattern "
                "thresholds (bilateral, peripheral ratio 1.5, ground glass share 0.5, solitary "
                "focus 0.8) are the RSNA categories read in numbers, set a priori, not tuned. "
                "cnn_weight 0: the CNN was measured at chance on Hounsfield series "
                "(evaluation.json, site held out) and its series score is reported, not used."
            ),
            "evaluation": {"site_held_out": held_out["all"], "slice_auc": slices},
        }
    )
    raw["analysis"] = analysis.model_dump(mode="json")
    raw["notice"] = notice(held_out, slices)
    (model_dir / SPEC_FILE).write_text(json.dumps(raw, indent=2) + "\n")
    load_spec(model_dir)  # still valid


def write_reference(model_dir: Path, results: list[SeriesResult], listing: Path) -> None:
    """Put the ``reference`` summary (``node.drift.reference_summary``) of the analysed series
    into model.json, changing nothing else in it."""
    analysed = [r for r in results if r.analysed]
    sites = sorted({r.site for r in results})
    summary = reference_summary(
        po=[r.po for r in analysed],
        cnn_score=[r.cnn_score for r in analysed],
        mixes=[r.mix for r in results if r.mix is not None],
        source=f"{listing.name}: {len(results)} series from {len(sites)} sites "
        f"({', '.join(sites)}); PO and CNN score of the {len(analysed)} analysed",
    )
    raw = json.loads((model_dir / SPEC_FILE).read_text())
    raw["reference"] = summary.model_dump(mode="json")
    (model_dir / SPEC_FILE).write_text(json.dumps(raw, indent=2) + "\n")
    load_spec(model_dir)  # still valid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.analysis", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model directory")
    parser.add_argument("--series", type=Path, default=DEFAULT_SERIES, help="series listing CSV")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="root of listed paths")
    parser.add_argument("--write", action="store_true", help="update model.json's analysis")
    parser.add_argument("--overlays", type=Path, default=None, help="folder for overlay PNGs")
    parser.add_argument(
        "--write-reference",
        action="store_true",
        help="write model.json's reference summary (drift monitoring)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("node.infer", "node.runtime", "node.series_check"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = run(args)
    json.dump(
        {k: report[k] for k in ("po_threshold", "site_held_out", "series_auc")},
        sys.stdout,
        indent=1,
    )
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
