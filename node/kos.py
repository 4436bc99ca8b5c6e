"""Report stage, key images: a Key Object Selection document flagging the key slices.

Most viewers show a KOS as "key images" of the study, with its title and description, even
when they show no SR at all.  Title: "Of Interest" (DCM 113000, CID 7010); description: why
these slices (the most lung opacity by volume), each slice's PO and the category, marked as a
triage aid; content: an IMAGE reference per key slice, the algorithm as device observer.
A series without key slices (not analysed, or no opacity at all) gets no KOS.
"""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom import Dataset
from pydicom.sr.codedict import codes

from node.report import check_evidence, device_observer, result_attributes
from node.sanitise import nameless_source
from node.verdict import SeriesVerdict
from node.wording import TRIAGE_AID, describe

SERIES_DESCRIPTION = "Lung opacity triage (AI) key images - not a diagnosis"
DOCUMENT_TITLE = codes.DCM.OfInterest


def build_key_images(
    verdict: SeriesVerdict,
    evidence: Sequence[Dataset],
    *,
    series_number: int,
    manufacturer: str = "triage-node",
    institution_name: str | None = None,
) -> KeyObjectSelectionDocument | None:
    """The KOS of ``verdict``'s key slices, or None when it has none.

    Parameters
    ----------
    verdict
        The analysis outcome; its ``key_slices`` are flagged, most opacity first.
    evidence
        Headers of the source CT instances; every key slice must be among them.
    series_number
        Series Number of the key image series.
    manufacturer, institution_name
        As for ``node.report.build_report``.

    Returns
    -------
    highdicom.ko.KeyObjectSelectionDocument or None
        In the source study, UIDs from ``report.result_uids(..., kind="kos")``.

    Raises
    ------
    ValueError
        When a key slice is not in ``evidence``, or ``evidence`` is from another study.
    """
    check_evidence(verdict, evidence)
    if not verdict.key_slices:
        return None
    by_uid = {str(ds.SOPInstanceUID): ds for ds in evidence}
    missing = [s.sop_instance_uid for s in verdict.key_slices if s.sop_instance_uid not in by_uid]
    if missing:
        raise ValueError(f"evidence: key slice(s) {missing} not among the source headers")
    keys = [by_uid[s.sop_instance_uid] for s in verdict.key_slices]
    content = KeyObjectSelection(
        document_title=DOCUMENT_TITLE,
        referenced_objects=keys,
        observer_device_context=device_observer(verdict, manufacturer),
        description=description(verdict),
    )
    source, patient_name = nameless_source(keys[0])  # no name for highdicom to quote in a warning
    kos = KeyObjectSelectionDocument(
        evidence=[source, *keys[1:]],
        content=content,
        institution_name=institution_name,
        **result_attributes(
            verdict,
            "kos",
            series_number=series_number,
            series_description=SERIES_DESCRIPTION,
            manufacturer=manufacturer,
        ),
    )
    kos.add(patient_name)
    return kos


def description(verdict: SeriesVerdict) -> str:
    """The Key Object Description: why these slices, and what the series was found to show."""
    words = describe(verdict)
    return (
        f"{TRIAGE_AID}. {words.key_slices}. {words.headline}"
        + (f". {words.flag}" if words.flag else "")
        + "."
    )
