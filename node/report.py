"""Report stage: one ``SeriesVerdict`` becomes a TID 1500 Comprehensive 3D SR (highdicom).

The SR lands in the source study (patient and study attributes are copied from the source CT
headers) and holds one measurement group for the analysed series:

- ``Finding`` (DCM 121071): the model's class as a code (``CLASS_CODES``), or "Not evaluated"
  when the series could not be analysed;
- a qualitative evaluation "COVID-19" (SCT 840539006) = Present / Absent / Undetermined,
  the triage answer in standard codes whatever the model's classes are;
- one NUM per class: concept = the class code, unit UCUM ``{probability}`` (value 0..1);
- the number of slices analysed and in the series (UCUM ``{slices}``) and the series score;
- the top-k most suspicious slices as "Source of Measurement" image references;
- the algorithm (TID 4019: name, version, sha256 and series rule as parameters);
- TEXT "Comment" items: the triage-aid disclaimer and, if not analysed, the reason.

Result UIDs are derived from the input (see ``result_uids``), so a re-run makes the same SR and
a PACS that already holds it keeps one copy.  Every SR code lives in this module.
"""

from __future__ import annotations

import json
import logging
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from io import BytesIO
from pathlib import Path
from typing import Any

from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
    ValueTypeValues,
)
from highdicom.sr.utils import find_content_items
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.spool import write_atomic
from node.verdict import SeriesVerdict

logger = logging.getLogger(__name__)

# --- Codes: the one home of every code the SR uses -------------------------------------------

LOCAL_SCHEME = "99TRIAGE"
"""Local coding scheme (PS3.3 8.2: "99" prefix) for concepts without a standard code."""

COVID_19 = Code("840539006", "SCT", "COVID-19")
"""SNOMED CT synonym; the full name "Disease caused by severe acute respiratory syndrome
coronavirus 2" is 65 characters, over the 64 a Code Meaning (LO) may hold."""
NORMAL = Code("17621005", "SCT", "Normal")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
NOT_COVID_19 = Code("NON-COVID", LOCAL_SCHEME, "Not COVID-19 (model class non-COVID)")
NOT_ANALYSED = Code("373121007", "SCT", "Not evaluated")

CLASS_CODES: dict[str, Code] = {
    "COVID-19": COVID_19,
    "non-COVID": NOT_COVID_19,
    "Normal": NORMAL,
    "Pneumonia": PNEUMONIA,
}
"""Model class name -> code, used for the finding and as the name of its probability."""

POSITIVE_CLASS = "COVID-19"
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
UNDETERMINED = Code("373068000", "SCT", "Undetermined")

PROCEDURE_CT_CHEST = Code("24627-2", "LN", "CT Chest")
COMMENT = Code("121106", "DCM", "Comment")
SLICES_ANALYSED = Code("SLICES-ANALYSED", LOCAL_SCHEME, "Number of slices analysed")
SLICES_IN_SERIES = Code("SLICES-TOTAL", LOCAL_SCHEME, "Number of slices in series")
SERIES_SCORE = Code("SERIES-SCORE", LOCAL_SCHEME, "Series score for COVID-19")
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
SLICES_UNIT = Code("{slices}", "UCUM", "slices")

# --- Fixed texts -------------------------------------------------------------------------------

SERIES_DESCRIPTION = "COVID triage (AI) - not a diagnosis"
MODEL_NOTICE_PREFIX = "Model notice: "
DISCLAIMER = (
    "Triage aid only, not a diagnosis: produced by an AI model without human review. "
    "A radiologist must read the images."
)
NOT_ANALYSED_PREFIX = "Not analysed: "
DEFAULT_SERIES_NUMBER = 9901
try:
    SOFTWARE_VERSION = version("triage-node")
except PackageNotFoundError:  # running from a checkout that is not installed
    SOFTWARE_VERSION = "unknown"

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:triage-node:structured-report")
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class ResultUIDs:
    """UIDs of the SR made for one (series, series version, model version)."""

    series_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class PredecessorRef:
    """An earlier SR for the same series, linked from the new one as its predecessor."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str


def _derived_uid(*parts: str) -> str:
    """A ``2.25.`` UID from a name-based (SHA-1, version 5) UUID of ``parts``."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, json.dumps(parts)).int}"


def result_uids(series_instance_uid: str, series_version: int, model_version: str) -> ResultUIDs:
    """Derive the SR's UIDs from its input, so a re-run produces the same SR.

    The SR series depends on the source series only: every triage SR for one CT series (new
    series versions, new models) lands in the same SR series.  The SOP Instance UID depends on
    all three inputs.

    Parameters
    ----------
    series_instance_uid
        Series Instance UID of the analysed CT series.
    series_version
        Version of the series content (increases when late instances arrive).
    model_version
        Version of the model that made the verdict.

    Returns
    -------
    ResultUIDs
        Series and SOP Instance UID of the SR.
    """
    return ResultUIDs(
        series_instance_uid=_derived_uid("sr-series", series_instance_uid),
        sop_instance_uid=_derived_uid(
            "sr-instance", series_instance_uid, str(series_version), model_version
        ),
    )


def build_report(
    verdict: SeriesVerdict,
    evidence: Sequence[Dataset],
    *,
    institution_name: str | None = None,
    predecessor: PredecessorRef | None = None,
    manufacturer: str = "triage-node",
    software_version: str = SOFTWARE_VERSION,
    series_number: int = DEFAULT_SERIES_NUMBER,
) -> Comprehensive3DSR:
    """Build the triage SR for one verdict.

    Parameters
    ----------
    verdict
        The analysis outcome; a not-analysed verdict gives an SR that says so, with the reason.
    evidence
        Headers of the source CT instances (pixel data not needed); at least one.  Patient and
        study attributes come from the first; every slice in ``verdict.top_slices`` must be here.
    institution_name
        Institution Name of the SR, if any.
    predecessor
        An earlier SR for the same series that this one replaces.
    manufacturer
        Manufacturer of the SR and of the device observer.
    software_version
        Software Versions of the SR (the node's version, not the model's).
    series_number
        Series Number of the SR series.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Complete, unverified, preliminary SR in the source study.

    Raises
    ------
    ValueError
        When ``evidence`` is empty or from another study, or a class has no code.
    """
    if not evidence:
        raise ValueError("evidence: at least one source instance is needed")
    if evidence[0].StudyInstanceUID != verdict.study_instance_uid:
        raise ValueError(
            f"evidence: StudyInstanceUID {evidence[0].StudyInstanceUID} differs from the "
            f"verdict's study_instance_uid {verdict.study_instance_uid}"
        )
    uids = result_uids(
        verdict.series_instance_uid, verdict.series_version, verdict.algorithm.version
    )
    observation_context = ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=_derived_uid("device", manufacturer, verdict.algorithm.name),
                name=verdict.algorithm.name,
                manufacturer_name=manufacturer,
                model_name=f"{verdict.algorithm.name} {verdict.algorithm.version}",
            ),
        )
    )
    report = MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE_CT_CHEST,
        imaging_measurements=[_measurement_group(verdict)],
    )
    # highdicom warns about "unusual" person names and quotes the name: that would put the
    # patient's name into the node's logs.  The name is copied as received; silence the warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        sr = Comprehensive3DSR(
            evidence=[_with_type2_defaults(evidence[0]), *evidence[1:]],
            content=report,
            series_instance_uid=uids.series_instance_uid,
            series_number=series_number,
            sop_instance_uid=uids.sop_instance_uid,
            instance_number=max(1, verdict.series_version),
            manufacturer=manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
            institution_name=institution_name,
            previous_versions=None if predecessor is None else [_predecessor_dataset(predecessor)],
            series_description=SERIES_DESCRIPTION,
            software_versions=software_version,
            specific_character_set="ISO_IR 192",
        )
    sr.CodingSchemeIdentificationSequence = [_local_scheme_item(manufacturer)]
    return sr


def _measurement_group(verdict: SeriesVerdict) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for the series: finding, probabilities, counts, slices, algorithm."""
    algorithm = verdict.algorithm
    parameters = [f"sha256={algorithm.sha256}"]
    if verdict.rule:
        parameters.append(f"series rule={verdict.rule}")
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=_derived_uid("tracking", verdict.series_instance_uid),
            identifier=f"COVID triage of CT series {verdict.series_instance_uid}",
        ),
        finding_type=_finding_code(verdict),
        algorithm_id=AlgorithmIdentification(
            name=algorithm.name, version=algorithm.version, parameters=parameters
        ),
        measurements=_measurements(verdict),
        qualitative_evaluations=[QualitativeEvaluation(COVID_19, _covid_presence(verdict))],
        source_images=[
            SourceImageForMeasurementGroup(s.sop_class_uid, s.sop_instance_uid)
            for s in verdict.top_slices
        ],
    )
    comments = [DISCLAIMER]
    if algorithm.notice:
        comments.append(MODEL_NOTICE_PREFIX + algorithm.notice)
    if not verdict.analysed:
        comments.insert(0, NOT_ANALYSED_PREFIX + (verdict.reason or "no reason given"))
    for text in comments:
        group[0].ContentSequence.append(
            TextContentItem(
                name=COMMENT, value=text, relationship_type=RelationshipTypeValues.CONTAINS
            )
        )
    return group


def _measurements(verdict: SeriesVerdict) -> list[Measurement]:
    """Class probabilities, slice counts and the series score as TID 300 measurements."""
    measurements = []
    if verdict.probabilities:  # a not-analysed verdict may name classes but has no probabilities
        if len(verdict.probabilities) != len(verdict.classes):
            raise ValueError(
                f"verdict.probabilities: {len(verdict.probabilities)} values for "
                f"{len(verdict.classes)} classes"
            )
        measurements = [
            Measurement(name=_class_code(name), value=float(p), unit=PROBABILITY_UNIT)
            for name, p in zip(verdict.classes, verdict.probabilities, strict=True)
        ]
    if verdict.analysed:
        measurements.append(
            Measurement(name=SLICES_ANALYSED, value=verdict.slices_analysed, unit=SLICES_UNIT)
        )
    measurements.append(
        Measurement(name=SLICES_IN_SERIES, value=verdict.slices_total, unit=SLICES_UNIT)
    )
    if verdict.series_score is not None:
        measurements.append(
            Measurement(name=SERIES_SCORE, value=float(verdict.series_score), unit=PROBABILITY_UNIT)
        )
    return measurements


def _class_code(name: str) -> Code:
    try:
        return CLASS_CODES[name]
    except KeyError:
        raise ValueError(
            f"verdict class {name!r} has no SR code; known classes: {sorted(CLASS_CODES)}"
        ) from None


def _finding_code(verdict: SeriesVerdict) -> Code:
    if not verdict.analysed:
        return NOT_ANALYSED
    if verdict.finding is None:
        raise ValueError("verdict.finding: missing for an analysed series")
    return _class_code(verdict.finding)


def _covid_presence(verdict: SeriesVerdict) -> Code:
    if not verdict.analysed or verdict.finding is None:
        return UNDETERMINED
    return PRESENT if verdict.finding == POSITIVE_CLASS else ABSENT


def _with_type2_defaults(source: Dataset) -> Dataset:
    """A copy of ``source`` with the patient/study attributes highdicom copies, empty if absent."""
    header = Dataset()
    header.update(source)
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _predecessor_dataset(ref: PredecessorRef) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = ref.sop_instance_uid
    ds.SOPClassUID = ref.sop_class_uid
    ds.SeriesInstanceUID = ref.series_instance_uid
    ds.StudyInstanceUID = ref.study_instance_uid
    return ds


def _local_scheme_item(manufacturer: str) -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "triage-node local codes"
    item.CodingSchemeResponsibleOrganization = manufacturer
    return item


def verdict_from_report(ds: Dataset) -> dict[str, Any]:
    """Read the verdict back from a triage SR (as written by ``build_report``).

    Parameters
    ----------
    ds
        The SR dataset, e.g. read with ``pydicom.dcmread``.

    Returns
    -------
    dict
        Keys as in ``SeriesVerdict.as_json`` where they exist: ``analysed``, ``finding`` (class
        name or None), ``probabilities`` (class -> value), ``slices_analysed`` (None if not
        analysed), ``slices_total``, ``series_score``, ``reason``, ``model`` (name, version,
        sha256); plus ``covid_19`` (meaning of the presence evaluation) and ``top_slice_uids``.
    """
    group = _measurement_group_of(ds)
    finding = group.finding_type
    if finding is None:
        raise ValueError(f"SR {ds.SOPInstanceUID}: the measurement group has no Finding")
    analysed = finding != NOT_ANALYSED
    probabilities: dict[str, float] = {}
    counts: dict[str, float] = {}
    for m in group.get_measurements():
        if m.unit == PROBABILITY_UNIT and m.name != SERIES_SCORE:
            probabilities[_class_name(m.name)] = float(m.value)
        else:
            counts[m.name.value] = m.value
    comments = [item.value for item in _items(group[0], COMMENT, ValueTypeValues.TEXT)]
    reasons = [c[len(NOT_ANALYSED_PREFIX) :] for c in comments if c.startswith(NOT_ANALYSED_PREFIX)]
    presence = group.get_qualitative_evaluations(name=COVID_19)
    return {
        "analysed": analysed,
        "finding": _class_name(finding) if analysed else None,
        "probabilities": probabilities,
        "slices_analysed": _int_or_none(counts.get(SLICES_ANALYSED.value)),
        "slices_total": _int_or_none(counts.get(SLICES_IN_SERIES.value)),
        "series_score": counts.get(SERIES_SCORE.value),
        "reason": reasons[0] if reasons else "",
        "covid_19": presence[0][0].value.meaning if presence else None,
        "top_slice_uids": [s.referenced_sop_instance_uid for s in group.source_images],
        "model": {
            "name": _text(group[0], codes.DCM.AlgorithmName),
            "version": _text(group[0], codes.DCM.AlgorithmVersion),
            "sha256": _sha256(group[0]),
        },
    }


def _class_name(code: CodedConcept) -> str:
    for name, class_code in CLASS_CODES.items():
        if code == class_code:
            return name
    raise ValueError(f"code {code.value} ({code.scheme_designator}) is no model class")


def _measurement_group_of(ds: Dataset) -> MeasurementsAndQualitativeEvaluations:
    content = Comprehensive3DSR.from_dataset(ds).content
    if not isinstance(content, MeasurementReport):
        raise ValueError(f"SR {ds.SOPInstanceUID} is not a TID 1500 measurement report")
    groups = content.get_image_measurement_groups()
    if len(groups) != 1:
        raise ValueError(
            f"SR {ds.SOPInstanceUID}: expected one measurement group, found {len(groups)}"
        )
    return groups[0]


def _items(parent: Dataset, name: Code, value_type: ValueTypeValues) -> list[Any]:
    return list(find_content_items(parent, name=name, value_type=value_type))


def _text(parent: Dataset, name: Code) -> str | None:
    found = _items(parent, name, ValueTypeValues.TEXT)
    return str(found[0].value) if found else None


def _sha256(parent: Dataset) -> str | None:
    for item in _items(parent, codes.DCM.AlgorithmParameters, ValueTypeValues.TEXT):
        if str(item.value).startswith("sha256="):
            return str(item.value)[len("sha256=") :]
    return None


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)


def write_report(sr: Dataset, path: Path) -> None:
    """Write the SR to ``path`` atomically (``spool.write_atomic``: temp file, fsync, rename).

    Parameters
    ----------
    sr
        The SR from ``build_report``.
    path
        Destination file; replaced if it exists.
    """
    buffer = BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    write_atomic(Path(path), buffer.getvalue())


__all__ = [
    "CLASS_CODES",
    "DEFAULT_SERIES_NUMBER",
    "PredecessorRef",
    "ResultUIDs",
    "build_report",
    "result_uids",
    "verdict_from_report",
    "write_report",
]
