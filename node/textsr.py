"""Report stage, fallback: the verdict as a Basic Text SR, for PACS that refuse Comprehensive 3D SR.

Some archives and viewers accept only the oldest SR SOP class, Basic Text SR (no numbers, no
coordinates: text, codes and image references).  This document says what the TID 1500 SR
says, in the sentences of ``node.wording``, in a TID 2000-style tree:

- root CONTAINER "Diagnostic Imaging Report" (LN 18748-4), the algorithm as device observer;
- TEXT "Comment": "AI triage aid, not a diagnosis" and the disclaimer, first;
- CONTAINER "Findings": the category or "not analysed" and why, the flag, the measurements,
  the key slices (each an IMAGE "Illustration of Finding"), the CNN's output, the caveats;
- CONTAINER "Conclusions": the category as a CODE (the same code as the TID 1500 SR) and as
  TEXT "Conclusion", then the model notice.

``node.outputs`` sends it in place of the TID 1500 SR when the destination does not accept
Comprehensive 3D SR at association, or always when the destination's profile asks for it.
highdicom has no Basic Text SR class; ``BasicTextSR`` is its SR base class with that SOP class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    ImageContentItem,
    RelationshipTypeValues,
    TextContentItem,
)
from highdicom.sr.sop import _SR
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import BasicTextSRStorage

from node.report import (
    CATEGORY_CODES,
    CT_CATEGORY,
    SOFTWARE_VERSION,
    check_evidence,
    device_observer,
    local_coding_scheme,
    result_attributes,
)
from node.sanitise import nameless_source
from node.verdict import SeriesVerdict
from node.wording import describe

SERIES_DESCRIPTION = "Lung opacity triage (AI) text report - not a diagnosis"
DOCUMENT_TITLE = codes.LN.DiagnosticImagingReport
CONTAINS = RelationshipTypeValues.CONTAINS


class BasicTextSR(_SR):
    """Basic Text SR document (SOP class 1.2.840.10008.5.1.4.1.1.88.11)."""

    def __init__(self, *, evidence: Sequence[Dataset], content: Dataset, **kwargs: Any) -> None:
        super().__init__(
            evidence=evidence, content=content, sop_class_uid=BasicTextSRStorage, **kwargs
        )


def build_text_report(
    verdict: SeriesVerdict,
    evidence: Sequence[Dataset],
    *,
    series_number: int,
    manufacturer: str = "triage-node",
    software_version: str = SOFTWARE_VERSION,
    institution_name: str | None = None,
) -> BasicTextSR:
    """Build the Basic Text SR of ``verdict``.

    Parameters
    ----------
    verdict
        The analysis outcome (analysed or not).
    evidence
        Headers of the source CT instances; the key slices must be among them.
    series_number
        Series Number of the text report series.
    manufacturer, software_version, institution_name
        As for ``node.report.build_report``.

    Returns
    -------
    BasicTextSR
        Complete, unverified, preliminary, in the source study, UIDs from
        ``report.result_uids(..., kind="text_sr")``.
    """
    check_evidence(verdict, evidence)
    source, patient_name = nameless_source(evidence[0])  # no name for highdicom to quote
    sr = BasicTextSR(
        evidence=[source, *evidence[1:]],
        content=_content(verdict, manufacturer),
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        coding_schemes=[local_coding_scheme(manufacturer)],
        **result_attributes(
            verdict,
            "text_sr",
            series_number=series_number,
            series_description=SERIES_DESCRIPTION,
            manufacturer=manufacturer,
            software_version=software_version,
        ),
    )
    sr.add(patient_name)
    return sr


def _content(verdict: SeriesVerdict, manufacturer: str) -> ContainerContentItem:
    words = describe(verdict)
    root = ContainerContentItem(name=DOCUMENT_TITLE, is_content_continuous=False)
    findings = _container(codes.DCM.Findings)
    for text in (words.headline, words.flag, *words.measurements):
        if text:
            findings.ContentSequence.append(_text(codes.DCM.Finding, text))
    if words.key_slices:
        key = _text(codes.DCM.Finding, words.key_slices)
        key.ContentSequence = DicomSequence(
            ImageContentItem(
                name=codes.DCM.IllustrationOfFinding,
                referenced_sop_class_uid=s.sop_class_uid,
                referenced_sop_instance_uid=s.sop_instance_uid,
                relationship_type=RelationshipTypeValues.INFERRED_FROM,
            )
            for s in verdict.key_slices
        )
        findings.ContentSequence.append(key)
    for text in (words.cnn, *words.caveats):
        if text:
            findings.ContentSequence.append(_text(codes.DCM.Comment, text))
    conclusions = _container(codes.DCM.Conclusions)
    if verdict.assessment is not None and verdict.analysed:
        conclusions.ContentSequence.append(
            CodeContentItem(
                name=CT_CATEGORY,
                value=CATEGORY_CODES[verdict.assessment.category],
                relationship_type=CONTAINS,
            )
        )
    conclusion = words.headline + (f". {words.flag}" if words.flag else "")
    conclusions.ContentSequence.append(_text(codes.DCM.Conclusion, conclusion))
    for text in words.notices[1:]:
        conclusions.ContentSequence.append(_text(codes.DCM.Comment, text))
    root.ContentSequence = DicomSequence(
        [
            *device_observer(verdict, manufacturer),
            _text(codes.DCM.Comment, words.notices[0]),  # the disclaimer
            findings,
            conclusions,
        ]
    )
    return root


def _container(name: Any) -> ContainerContentItem:
    # SEPARATE: each finding is its own statement, shown with its name on its own line (as
    # CONTINUOUS, a viewer runs them together into one paragraph: dsr2html did)
    item = ContainerContentItem(name=name, relationship_type=CONTAINS, is_content_continuous=False)
    item.ContentSequence = DicomSequence()
    return item


def _text(name: Any, value: str) -> TextContentItem:
    return TextContentItem(name=name, value=value, relationship_type=CONTAINS)
