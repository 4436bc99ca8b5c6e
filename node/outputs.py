"""Report stage, the set: which result objects a series gets, built once, sent per destination.

Kinds (``config.OutputKind``), each in its own series of the source study, UIDs derived from
(source series, series version, model version, kind) by ``report.result_uids``:

=========== ================================== ============================= ===========
kind        object                             SOP class                     Series No.
=========== ================================== ============================= ===========
``sr``      TID 1500 Comprehensive 3D SR       1.2.840.10008.5.1.4.1.1.88.34 base (9901)
``kos``     Key Object Selection of key slices 1.2.840.10008.5.1.4.1.1.88.59 base + 1
``summary`` Secondary Capture summary image    1.2.840.10008.5.1.4.1.1.7     base + 2
``text_sr`` Basic Text SR                      1.2.840.10008.5.1.4.1.1.88.11 base + 3
=========== ================================== ============================= ===========

The profile of a destination (``results.outputs.<peer>``) names the kinds it gets; a peer not
listed gets ``DEFAULT_PROFILE`` as far as it accepts each SOP class at association.  ``sr``
falls back to the Basic Text SR when the peer refuses Comprehensive 3D SR.  A listed kind the
peer refuses is a delivery failure (retried, then dead-lettered with the reason).

Analysis writes the set into ``spool/.results/<SR SOP Instance UID>/`` (one file per object,
named by its SOP Instance UID); delivery reads that folder, so a retry after a restart sends
the same bytes and a PACS keeps one copy of each object per series version.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom import Dataset
from pydicom.uid import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
)

from node.config import Peer, ResultSettings
from node.errors import SendFailed
from node.kos import build_key_images
from node.report import PredecessorRef, build_report, write_report
from node.send import Chooser
from node.summary import build_summary
from node.textsr import build_text_report

if TYPE_CHECKING:  # pipeline imports this module
    from node.pipeline import Analysis

logger = logging.getLogger(__name__)

KINDS = ("sr", "kos", "summary", "text_sr")
"""Every kind, in sending order."""
DEFAULT_PROFILE = ("sr", "kos", "summary")
SOP_CLASSES = {
    "sr": str(Comprehensive3DSRStorage),
    "kos": str(KeyObjectSelectionDocumentStorage),
    "summary": str(SecondaryCaptureImageStorage),
    "text_sr": str(BasicTextSRStorage),
}
SERIES_NUMBER_OFFSETS = {"sr": 0, "kos": 1, "summary": 2, "text_sr": 3}
FALLBACKS = {"sr": "text_sr"}
"""A kind the peer refuses -> the kind sent in its place, if the peer accepts that."""


@dataclass(frozen=True)
class Profile:
    """What one destination gets: ``kinds`` in sending order; ``explicit`` when configured (then
    a refused kind is an error, else it is left out)."""

    kinds: tuple[str, ...]
    explicit: bool


@dataclass(frozen=True)
class StoredObject:
    """One result object on disk, ready to send."""

    kind: str
    path: Path
    sop_instance_uid: str


def profile_for(results: ResultSettings, peer: str | None) -> Profile:
    """The profile of ``peer`` (``results.outputs``), or ``DEFAULT_PROFILE`` when not listed."""
    configured = results.outputs.get(peer or "")
    if configured is None:
        return Profile(DEFAULT_PROFILE, explicit=False)
    return Profile(tuple(k for k in KINDS if k in configured), explicit=True)


def kinds_to_build(results: ResultSettings) -> tuple[str, ...]:
    """What analysis builds: the destination's profile and its fallbacks, and always the SR
    (it is the node's record of the verdict: ``report.verdict_from_report``).  Without a
    destination, the default profile for the outbox, or the SR alone without an outbox."""
    if results.send_to is None and results.outbox_dir is None:
        return ("sr",)  # kept in the spool only
    profile = profile_for(results, results.send_to)
    wanted = {"sr", *profile.kinds}
    if results.send_to is not None:
        wanted |= {FALLBACKS[k] for k in profile.kinds if k in FALLBACKS}
    return tuple(k for k in KINDS if k in wanted)


def series_number(results: ResultSettings, kind: str) -> int:
    return results.series_number + SERIES_NUMBER_OFFSETS[kind]


def build_outputs(
    analysis: Analysis,
    results: ResultSettings,
    *,
    predecessor: PredecessorRef | None = None,
    kinds: tuple[str, ...] | None = None,
) -> dict[str, Dataset]:
    """Build every kind of ``kinds_to_build`` (or of ``kinds``) for one analysed series (KOS
    only with key slices).

    Parameters
    ----------
    analysis
        ``pipeline.analyse_series`` of the series, with ``draw=True`` when a summary is built.
    results
        The ``results`` settings (profiles, series numbers).
    predecessor
        The SR of the previous series version, named by the new SR.
    kinds
        What to build instead of the destination's profile (``classify --out``: all of
        ``KINDS``); the SR is always built.

    Returns
    -------
    dict
        Kind -> the object; always has ``sr`` (its errors raise); another kind that fails to
        build is logged and left out, so the verdict still reaches the PACS.
    """
    verdict, evidence = analysis.verdict, analysis.evidence
    objects: dict[str, Dataset] = {
        "sr": build_report(
            verdict, evidence, predecessor=predecessor, series_number=series_number(results, "sr")
        )
    }
    for kind in kinds_to_build(results) if kinds is None else kinds:
        if kind == "sr":
            continue
        number = series_number(results, kind)
        try:
            if kind == "kos":
                kos = build_key_images(verdict, evidence, series_number=number)
                if kos is not None:
                    objects[kind] = kos
            elif kind == "summary":
                objects[kind] = build_summary(
                    verdict, evidence, analysis.key_images, analysis.curves, series_number=number
                )
            elif kind == "text_sr":
                objects[kind] = build_text_report(verdict, evidence, series_number=number)
        except (ValueError, TypeError, IndexError, ArithmeticError):
            # the SR is built (above): an object beside it must not cost the verdict
            logger.exception("series %s: %s not built", verdict.series_instance_uid, kind)
    return objects


def write_outputs(objects: dict[str, Dataset], results_dir: Path) -> Path:
    """Write the objects into their folder under ``results_dir``; return the SR's path.

    The folder is named by the SR's SOP Instance UID (one per series version and model); files
    by their own SOP Instance UID.  Each is written atomically; a file left there by an earlier
    attempt with another profile is removed, so the folder holds exactly this set.
    """
    sr = objects["sr"]
    folder = results_dir / str(sr.SOPInstanceUID)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = {f"{ds.SOPInstanceUID}.dcm" for ds in objects.values()}
    for stale in folder.glob("*.dcm"):
        if stale.name not in names:
            stale.unlink()
    for ds in objects.values():
        write_report(ds, folder / f"{ds.SOPInstanceUID}.dcm")
    return folder / f"{sr.SOPInstanceUID}.dcm"


def stored_objects(sr_path: Path) -> list[StoredObject]:
    """The result objects written with the SR at ``sr_path``, in sending order.

    An SR written before result folders existed (``.results/<uid>.dcm``) is sent alone.
    """
    in_folder = sr_path.parent.name == sr_path.stem
    files = sorted(sr_path.parent.glob("*.dcm")) if in_folder else [sr_path]
    stored = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        kind = kind_of_sop_class(str(ds.SOPClassUID))
        if kind is None:
            logger.warning("%s: SOP class %s is no result object: not sent", path, ds.SOPClassUID)
            continue
        stored.append(StoredObject(kind, path, str(ds.SOPInstanceUID)))
    return sorted(stored, key=lambda o: KINDS.index(o.kind))


def kind_of_sop_class(sop_class_uid: str) -> str | None:
    """The kind whose SOP class is ``sop_class_uid`` (None for any other)."""
    return next((kind for kind, uid in SOP_CLASSES.items() if uid == sop_class_uid), None)


def chooser(stored: Iterable[StoredObject], profile: Profile, peer: Peer) -> Chooser:
    """``send.store_files``' choice: the profile's kinds the peer accepted, with fallbacks.

    A kind that was not built (no KOS without key slices) is skipped.  A refused kind is
    replaced by its fallback when that was built and is accepted; otherwise it is left out
    (default profile) or fails the delivery (explicit profile).  Nothing to send also fails.
    """
    by_kind = {o.kind: o for o in stored}

    def choose(accepted: frozenset[str]) -> list[Path]:
        chosen: list[StoredObject] = []
        refused = []
        for kind in profile.kinds:
            obj = by_kind.get(kind)
            if obj is None:
                continue
            if SOP_CLASSES[kind] in accepted:
                if obj not in chosen:  # a fallback may have put it there already
                    chosen.append(obj)
                continue
            fallback = by_kind.get(FALLBACKS.get(kind, ""))
            if fallback is not None and SOP_CLASSES[fallback.kind] in accepted:
                logger.info("%s refuses %s: sending %s instead", peer.name, kind, fallback.kind)
                if fallback not in chosen:
                    chosen.append(fallback)
                continue
            refused.append(kind)
        if refused and profile.explicit:
            raise SendFailed(
                f"{peer.name} refused {', '.join(refused)} at association (SOP class "
                f"{', '.join(SOP_CLASSES[k] for k in refused)}): allow it there or remove it "
                f"from results.outputs.{peer.name}"
            )
        if refused:
            logger.info("%s does not accept %s: not sent", peer.name, ", ".join(refused))
        if not chosen:
            raise SendFailed(
                f"{peer.name} accepts none of the result objects ({', '.join(by_kind)})"
            )
        chosen.sort(key=lambda o: KINDS.index(o.kind))
        return [o.path for o in chosen]

    return choose
