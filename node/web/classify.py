"""Web console, upload-and-classify: one slice (PNG/JPG or DICOM) or a zipped DICOM series.

Same code as the node: slices go through ``node.preprocess`` and the loaded model; a series goes
through ``node.pipeline.analyse_series`` (the job's analysis) and ``node.report.build_report``, so
its verdict and SR equal what the node would send for the same files.  The key slices come drawn
from the masks the analysis measured (``analyse_series(draw=True)``); for the CNN's per-slice
curve every slice is read and scored once more, the unselected ones too.
"""

from __future__ import annotations

import logging
import secrets
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from node import preprocess
from node.classify import collect_series
from node.errors import InvalidInstance, SeriesRejected
from node.infer import LoadedModel, decide_finding
from node.pipeline import Context, analyse_series
from node.report import build_report, write_report
from node.series_check import order_and_check, read_headers
from node.verdict import SeriesVerdict, SliceScore
from node.web.analysis import KeyView, RegionRow, key_views, region_rows
from node.web.render import CurvePoint, png_data_uri

logger = logging.getLogger(__name__)

MAX_ZIP_MEMBERS = 5000
ZIP_EXPANSION = 4  # a zip may hold up to this many times the upload limit, uncompressed

#: One classification at a time: the node's jobs share the two cores and the model.
MODEL_LOCK = threading.Lock()


class UploadError(ValueError):
    """An upload the console cannot classify; the message is shown to the user as it is."""


@dataclass(frozen=True)
class SliceResult:
    name: str
    kind: str  # "image" (8-bit PNG/JPG) or "dicom"
    image: str  # data URI of what was classified, as the user should look at it
    image_note: str
    probabilities: tuple[tuple[str, float], ...]
    finding: str
    positive_score: float
    threshold: float
    note: str = ""


@dataclass(frozen=True)
class SeriesResult:
    verdict: SeriesVerdict
    description: str
    curve: tuple[CurvePoint, ...]  # the CNN's score per slice
    key_views: tuple[KeyView, ...]  # the verdict's key slices, outlines and opacity drawn
    regions: tuple[RegionRow, ...]  # the opacity table (empty when not analysed)
    sr_token: str | None


@dataclass(frozen=True)
class Outcome:
    name: str
    slices: tuple[SliceResult, ...] = ()
    series: tuple[SeriesResult, ...] = ()
    ignored_files: int = 0


class ReportStore:
    """SRs made by the console, kept in memory for download (the newest ``capacity``)."""

    def __init__(self, capacity: int = 20) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, filename: str, data: bytes) -> str:
        token = secrets.token_urlsafe(16)
        with self._lock:
            self._items[token] = (filename, data)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return token

    def get(self, token: str) -> tuple[str, bytes] | None:
        with self._lock:
            return self._items.get(token)


def sniff(path: Path) -> str:
    """``zip``, ``image``, ``dicom`` or ``unknown``, from the content (not the file name)."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff"):
        return "image"
    if head[128:132] == b"DICM":
        return "dicom"
    try:  # DICOM without preamble (some exports): must at least name its SOP class
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # pydicom raises many types on non-DICOM bytes
        return "unknown"
    return "dicom" if "SOPClassUID" in ds else "unknown"


def classify_upload(path: Path, name: str, ctx: Context, store: ReportStore) -> Outcome:
    """Classify an uploaded file (already on disk, size-checked).

    Raises
    ------
    UploadError
        Unsupported or unreadable content, with a message for the user.
    """
    kind = sniff(path)
    with MODEL_LOCK:
        if kind == "image":
            return Outcome(name, slices=(classify_image(path, name, ctx.model),))
        if kind == "dicom":
            return Outcome(name, slices=(classify_dicom(path, name, ctx.model),))
        if kind == "zip":
            return classify_zip(path, name, ctx, store)
    raise UploadError(
        f"{name}: unsupported file. Upload a PNG or JPEG slice, one DICOM CT file, "
        "or a .zip of the DICOM files of one series."
    )


def _slice_result(model: LoadedModel, model_input: np.ndarray, **fields: object) -> SliceResult:
    spec = model.spec
    probs = model.predict(model_input[np.newaxis])[0]
    positive = float(probs[spec.positive_index])
    finding = decide_finding(spec, positive, spec.threshold, probs)
    return SliceResult(
        probabilities=tuple((c, float(p)) for c, p in zip(spec.classes, probs, strict=True)),
        finding=finding,
        positive_score=positive,
        threshold=spec.threshold,
        **fields,  # type: ignore[arg-type]
    )


def classify_image(path: Path, name: str, model: LoadedModel) -> SliceResult:
    """An 8-bit slice (already windowed by its publisher), as training reads those."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            shown = preprocess.grey_image_to_unit(np.asarray(img.convert("L")))
        model_input = model.spec.image_file_to_input(path)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UploadError(f"{name}: not a readable PNG/JPEG image: {exc}") from exc
    return _slice_result(
        model,
        model_input,
        name=name,
        kind="image",
        image=png_data_uri(shown),
        image_note="as uploaded, in grey (8-bit images are already windowed)",
        note="An 8-bit image: the model was made for Hounsfield-unit CT; treat this as a demo.",
    )


def classify_dicom(path: Path, name: str, model: LoadedModel) -> SliceResult:
    """One CT slice: Hounsfield units, the model's window, its input size (as the node does)."""
    spec = model.spec
    try:
        ds = preprocess.read_dicom(path)
    except InvalidInstance as exc:
        raise UploadError(f"{name}: {exc}") from exc
    modality = str(ds.get("Modality", "") or "")
    if modality and modality != "CT":
        raise UploadError(
            f"{name}: a DICOM {modality} object; the model reads CT slices (Hounsfield units) only"
        )
    try:
        hu = preprocess.hounsfield(ds)
    except InvalidInstance as exc:
        raise UploadError(f"{name}: cannot classify this DICOM file: {exc}") from exc
    window = spec.window.as_window()
    fraction = preprocess.lung_fraction(hu)
    note = ""
    if fraction < spec.selection.min_lung_fraction:
        note = (
            f"Lung covers {100 * fraction:.1f}% of this slice, less than the model's "
            f"{100 * spec.selection.min_lung_fraction:.0f}%: the node would not use it."
        )
    return _slice_result(
        model,
        spec.hu_to_input(hu),
        name=name,
        kind="dicom",
        image=png_data_uri(preprocess.apply_window(hu, window)),
        image_note=f"lung window: level {window.level:g} HU, width {window.width:g} HU",
        note=note,
    )


def extract_zip(path: Path, target: Path, max_bytes: int) -> list[Path]:
    """Extract the files of a zip under numbered names (archive names are never used as paths)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise UploadError(f"not a valid zip file: {exc}") from exc
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if not members:
            raise UploadError("the zip is empty")
        if len(members) > MAX_ZIP_MEMBERS:
            raise UploadError(f"the zip holds {len(members)} files; at most {MAX_ZIP_MEMBERS}")
        total = sum(m.file_size for m in members)
        if total > max_bytes:
            raise UploadError(
                f"the zip expands to {total / 2**20:.0f} MiB; at most {max_bytes / 2**20:.0f} MiB"
            )
        target.mkdir(parents=True, exist_ok=True)
        files = []
        written = 0
        for i, member in enumerate(members):
            out = target / f"{i:05d}.dcm"
            with archive.open(member) as src, open(out, "wb") as dst:
                while block := src.read(1 << 20):
                    written += len(block)
                    if written > max_bytes:  # sizes in the directory can lie
                        raise UploadError("the zip expands to more than it declares")
                    dst.write(block)
            files.append(out)
    return files


def classify_zip(path: Path, name: str, ctx: Context, store: ReportStore) -> Outcome:
    max_bytes = int(ctx.settings.web.max_upload_mb * ZIP_EXPANSION * 2**20)
    files = extract_zip(path, path.parent / "unzipped", max_bytes)
    groups = collect_series(files)
    if not groups:
        raise UploadError(f"{name}: the zip holds no DICOM files")
    ignored = len(files) - sum(len(v) for v in groups.values())
    results = tuple(classify_series(paths, ctx, store) for paths in groups.values())
    return Outcome(name, series=results, ignored_files=ignored)


def classify_series(paths: list[Path], ctx: Context, store: ReportStore) -> SeriesResult:
    """The node's analysis of one series, its SR, its key slices drawn and the CNN's curve."""
    analysis = analyse_series(paths, ctx.model, ctx.settings, draw=True)
    verdict, evidence = analysis.verdict, analysis.evidence
    token = None
    if evidence and verdict.study_instance_uid:
        sr = build_report(verdict, evidence, series_number=ctx.settings.results.series_number)
        sr_path = paths[0].parent / "sr.dcm"
        write_report(sr, sr_path)
        token = store.put(f"SR_{sr.SOPInstanceUID}.dcm", sr_path.read_bytes())
    description = str(evidence[0].get("SeriesDescription", "")) if evidence else ""
    regions: tuple[RegionRow, ...] = ()
    if verdict.analysed and verdict.quantification is not None:
        regions = region_rows(verdict.quantification)
    views = key_views(analysis.key_images)
    slices = _readable_slices(paths, ctx)
    curve = slice_curve(slices, ctx, verdict.top_slices)
    return SeriesResult(verdict, description, curve, views, regions, token)


def _body_axis_order(paths: list[Path], ctx: Context) -> list[tuple[Path, str, float]]:
    headers = read_headers(paths)
    try:
        refs = order_and_check(
            headers,
            require_axial=ctx.settings.analysis.require_axial,
            max_gap_factor=ctx.settings.analysis.max_gap_factor,
        )
        return [(r.path, r.sop_instance_uid, r.z) for r in refs]
    except SeriesRejected:  # the verdict says why; still draw what can be drawn

        def z_of(ds: pydicom.Dataset, index: int) -> float:
            position = ds.get("ImagePositionPatient")
            if position is not None and len(position) == 3:
                return float(position[2])
            return float(ds.get("InstanceNumber", index) or index)

        placed = [
            (p, str(ds.get("SOPInstanceUID", "")), z_of(ds, i)) for i, (p, ds) in enumerate(headers)
        ]
        return sorted(placed, key=lambda item: item[2])


def _readable_slices(paths: list[Path], ctx: Context) -> Iterator[tuple[str, float, np.ndarray]]:
    """``(SOP Instance UID, z, HU)`` of every decodable slice, in body-axis order."""
    for path, uid, z in _body_axis_order(paths, ctx):
        try:
            yield uid, z, preprocess.hounsfield(preprocess.read_dicom(path))
        except InvalidInstance:
            continue


def slice_curve(
    slices: Iterable[tuple[str, float, np.ndarray]], ctx: Context, top: Sequence[SliceScore]
) -> tuple[CurvePoint, ...]:
    """The CNN's positive-class score of every slice (same preprocessing as the node).

    The verdict's top slices (``top``, by the CNN) are marked with their rank.
    """
    spec = ctx.model.spec
    ranks = {s.sop_instance_uid: i + 1 for i, s in enumerate(top)}
    placed: list[tuple[str, float, bool]] = []
    inputs: list[np.ndarray] = []
    for uid, z, hu in slices:
        placed.append((uid, z, preprocess.lung_fraction(hu) >= spec.selection.min_lung_fraction))
        inputs.append(spec.hu_to_input(hu))
    if not inputs:
        return ()
    batch = ctx.settings.analysis.batch_size
    scores = np.concatenate(
        [ctx.model.predict(np.stack(inputs[i : i + batch])) for i in range(0, len(inputs), batch)]
    )[:, spec.positive_index]
    return tuple(
        CurvePoint(z=z, score=float(s), selected=sel, rank=ranks.get(uid))
        for (uid, z, sel), s in zip(placed, scores, strict=True)
    )
