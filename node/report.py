"""Report stage: one ``SeriesVerdict`` becomes a TID 1500 Comprehensive 3D SR (highdicom).

The SR lands in the source study (patient and study attributes are copied from the source CT
headers) and holds one TID 1501 measurement group for the analysed series:

- ``Finding`` (DCM 121071): "Opacity" (DCM 112001), or "Not evaluated" when the series could not
  be analysed; finding site: lung;
- the Hounsfield quantification (``node.opacity``) as TID 300 measurements, each with its finding
  site: lung volume (SCT "Volume", mL) of both lungs and of each lung; PO and PHO (%, local codes)
  of both lungs, each lung and each lung's zones (SCT upper / middle / lower zone of lung +
  laterality) and bands (left / right lung + topographical modifier peripheral / central);
- the key slices (most opacity) as the group's source images, each with its slice PO;
- qualitative evaluations (``node.assess``): the RSNA-style CT category, "pneumonia-range lung
  opacity" Present / Absent and the category's COVID-19 likelihood (SCT high / intermediate / low);
- the CNN's output, named as the CNN's: its class, one probability per class, the series score
  (with the top slices it came from) and the slice counts;
- the algorithm (TID 4019: name, version; sha256, series rule and analysis version as parameters);
- TEXT "Comment" items: the not-analysed reason, coverage caveats, the assessment's reasons, the
  triage-aid disclaimer and the model's notice.

Result UIDs are derived from the input (see ``result_uids``), so a re-run makes the same SR and
a PACS that already holds it keeps one copy.  Every SR code lives in this module; the local
scheme ``99TRIAGE`` only names what has no standard code.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from io import BytesIO
from pathlib import Path
from typing import Any

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
    ValueTypeValues,
)
from highdicom.sr.utils import find_content_items
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.assess import ATYPICAL, CATEGORY_TEXT, INDETERMINATE, NEGATIVE, TYPICAL
from node.opacity import BANDS, SIDES, ZONES, Quantification, Region
from node.sanitise import nameless_source
from node.spool import write_atomic
from node.verdict import SeriesVerdict, SliceScore
from node.wording import (
    ASSESSMENT_PREFIX,
    COVERAGE_PREFIX,
    DISCLAIMER,
    MODEL_NOTICE_PREFIX,
    NOT_ANALYSED_PREFIX,
)

logger = logging.getLogger(__name__)

# --- Codes: the one home of every code the SR uses -------------------------------------------

LOCAL_SCHEME = "99TRIAGE"
"""Local coding scheme (PS3.3 8.2: "99" prefix) for concepts without a standard code."""

# Finding and anatomy (SNOMED CT; zones from CID 6171, modifiers from CID 2, laterality CID 244)
OPACITY = codes.DCM.Opacity
NOT_ANALYSED = Code("373121007", "SCT", "Not evaluated")
LUNG = codes.SCT.Lung  # 39607008
LEFT_LUNG = Code("44029006", "SCT", "Left lung")
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
SIDE_LUNGS = {"left": LEFT_LUNG, "right": RIGHT_LUNG}
LATERALITIES = {"left": codes.SCT.Left, "right": codes.SCT.Right}
BOTH_SIDES = codes.SCT.Bilateral
ZONE_CODES = {  # node.opacity's thirds of each lung's own cranio-caudal extent
    "upper": codes.SCT.UpperZoneOfLung,  # 281392002
    "middle": codes.SCT.MiddleZoneOfLung,  # 281393007
    "lower": codes.SCT.LowerZoneOfLung,  # 281394001
}
BAND_CODES = {"peripheral": codes.SCT.Peripheral, "central": codes.SCT.Central}

# Hounsfield measurements
VOLUME = codes.SCT.Volume  # 118565006
VOLUME_METHOD = codes.DCM.SumOfSegmentedVoxelMethodForVolume  # 126030, CID 7474
PO = Code("PO", LOCAL_SCHEME, "Percentage of opacity")
PHO = Code("PHO", LOCAL_SCHEME, "Percentage of high opacity")
SLICE_PO = Code("SLICE-PO", LOCAL_SCHEME, "Percentage of opacity in slice")
ML_UNIT = Code("ml", "UCUM", "mL")
PERCENT_UNIT = codes.UCUM.Percent

# Assessment (node.assess)
CT_CATEGORY = Code("CT-CATEGORY", LOCAL_SCHEME, "COVID-19 pneumonia CT category (RSNA)")
TYPICAL_APPEARANCE = Code("TYPICAL", LOCAL_SCHEME, CATEGORY_TEXT[TYPICAL])
INDETERMINATE_APPEARANCE = Code("INDETERMINATE", LOCAL_SCHEME, CATEGORY_TEXT[INDETERMINATE])
ATYPICAL_APPEARANCE = Code("ATYPICAL", LOCAL_SCHEME, CATEGORY_TEXT[ATYPICAL])
NO_OPACITY = Code("NEGATIVE", LOCAL_SCHEME, CATEGORY_TEXT[NEGATIVE])
CATEGORY_CODES = {
    TYPICAL: TYPICAL_APPEARANCE,
    INDETERMINATE: INDETERMINATE_APPEARANCE,
    ATYPICAL: ATYPICAL_APPEARANCE,
    NEGATIVE: NO_OPACITY,
}
PNEUMONIA_RANGE = Code("PNEUMONIA-RANGE", LOCAL_SCHEME, "Pneumonia-range lung opacity")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
COVID_LIKELIHOOD = Code("COVID-LIKELIHOOD", LOCAL_SCHEME, "COVID-19 likelihood of the CT category")
LIKELIHOOD_CODES = {
    "high": codes.SCT.High,  # 75540009
    "intermediate": codes.SCT.Intermediate,  # 11896004
    "low": codes.SCT.Low,  # 62482003
}

# The CNN (node.infer): its class, per-class probabilities, series score and slice counts
COVID_19 = Code("840539006", "SCT", "COVID-19")
"""SNOMED CT synonym; the full name "Disease caused by severe acute respiratory syndrome
coronavirus 2" is 65 characters, over the 64 a Code Meaning (LO) may hold."""
NORMAL = Code("17621005", "SCT", "Normal")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
NOT_COVID_19 = Code("NON-COVID", LOCAL_SCHEME, "Not COVID-19 (model class non-COVID)")
CLASS_CODES: dict[str, Code] = {
    "COVID-19": COVID_19,
    "non-COVID": NOT_COVID_19,
    "Normal": NORMAL,
    "Pneumonia": PNEUMONIA,
}
"""Model class name -> code, the value of the "CNN class" evaluation."""
CNN_CLASS = Code("CNN-CLASS", LOCAL_SCHEME, "CNN class")
CNN_PROBABILITY_CODES: dict[str, Code] = {
    "COVID-19": Code("CNN-P-COVID-19", LOCAL_SCHEME, "CNN probability of COVID-19"),
    "non-COVID": Code("CNN-P-NON-COVID", LOCAL_SCHEME, "CNN probability of non-COVID"),
    "Normal": Code("CNN-P-NORMAL", LOCAL_SCHEME, "CNN probability of Normal"),
    "Pneumonia": Code("CNN-P-PNEUMONIA", LOCAL_SCHEME, "CNN probability of Pneumonia"),
}
"""Model class name -> name of the CNN's probability for that class."""
CNN_SERIES_SCORE = Code("CNN-SCORE", LOCAL_SCHEME, "CNN series score")
SLICES_ANALYSED = Code("SLICES-ANALYSED", LOCAL_SCHEME, "Number of slices classified by the CNN")
SLICES_IN_SERIES = Code("SLICES-TOTAL", LOCAL_SCHEME, "Number of slices in series")
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
NO_UNITS = codes.UCUM.NoUnits  # "1": the series score is a mean score or a fraction of slices
SLICES_UNIT = Code("{slices}", "UCUM", "slices")

PROCEDURE_CT_CHEST = Code("24627-2", "LN", "CT Chest")
COMMENT = Code("121106", "DCM", "Comment")

# --- Fixed texts -------------------------------------------------------------------------------

SERIES_DESCRIPTION = "Lung opacity triage (AI) - not a diagnosis"
SHA256_PARAMETER = "sha256="
RULE_PARAMETER = "series rule="
ANALYSIS_PARAMETER = "analysis="
DEFAULT_SERIES_NUMBER = 9901
try:
    SOFTWARE_VERSION = version("triage-node")
except PackageNotFoundError:  # running from a checkout that is not installed
    SOFTWARE_VERSION = "unknown"


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:triage-node:structured-report")


@dataclass(frozen=True)
class RegionSite:
    """Where a Hounsfield measurement was made: a key into ``Quantification`` and its site."""

    # ("total",), ("lungs", side), ("zones", side, zone) or ("bands", side, band)
    key: tuple[str, ...]
    site: Code
    laterality: Code | None = None
    modifier: Code | None = None

    def finding_site(self) -> FindingSite:
        return FindingSite(
            self.site, laterality=self.laterality, topographical_modifier=self.modifier
        )

    def region(self, q: Quantification) -> Region:
        kind, *path = self.key
        if kind == "total":
            return q.total
        if kind == "lungs":
            return q.lungs[path[0]]
        return (q.zones if kind == "zones" else q.bands)[path[0]][path[1]]


REGION_SITES: tuple[RegionSite, ...] = (
    RegionSite(("total",), LUNG, laterality=BOTH_SIDES),
    *(RegionSite(("lungs", s), SIDE_LUNGS[s]) for s in SIDES),
    *(
        RegionSite(("zones", s, z), ZONE_CODES[z], laterality=LATERALITIES[s])
        for s in SIDES
        for z in ZONES
    ),
    *(
        RegionSite(("bands", s, b), SIDE_LUNGS[s], modifier=BAND_CODES[b])
        for s in SIDES
        for b in BANDS
    ),
)
"""Every region the SR reports, in report order; volumes are reported for both lungs and each."""

PO_DECIMALS = 2
VOLUME_DECIMALS = 1
CNN_DECIMALS = 5  # readable, and within 1e-5 of the verdict (what the console compares)
"""Decimals written for PO/PHO (%), volumes (mL) and the CNN's probabilities and score."""


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


def result_uids(
    series_instance_uid: str, series_version: int, model_version: str, kind: str = "sr"
) -> ResultUIDs:
    """Derive the UIDs of a result object from its input, so a re-run produces the same object.

    The result series depends on the source series and the kind only: every triage SR for one
    CT series (new series versions, new models) lands in the same SR series, every summary
    image in the same summary series, and so on.  The SOP Instance UID depends on all four.

    Parameters
    ----------
    series_instance_uid
        Series Instance UID of the analysed CT series.
    series_version
        Version of the series content (increases when late instances arrive).
    model_version
        Version of the model that made the verdict.
    kind
        Which result object (``node.outputs.KINDS``): ``sr`` (this SR), ``kos``, ``summary``
        or ``text_sr``.

    Returns
    -------
    ResultUIDs
        Series and SOP Instance UID of the object.
    """
    return ResultUIDs(
        series_instance_uid=_derived_uid(f"{kind}-series", series_instance_uid),
        sop_instance_uid=_derived_uid(
            f"{kind}-instance", series_instance_uid, str(series_version), model_version
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
        study attributes come from the first; every slice in ``verdict.key_slices`` and
        ``verdict.top_slices`` must be here.
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
    check_evidence(verdict, evidence)
    observation_context = ObservationContext(
        observer_device_context=device_observer(verdict, manufacturer)
    )
    report = MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE_CT_CHEST,
        imaging_measurements=[_measurement_group(verdict)],
    )
    # highdicom gets no patient name to warn about (and quote); the SR gets it as received
    source, patient_name = nameless_source(evidence[0])
    sr = Comprehensive3DSR(
        evidence=[source, *evidence[1:]],
        content=report,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        previous_versions=None if predecessor is None else [_predecessor_dataset(predecessor)],
        coding_schemes=[local_coding_scheme(manufacturer)],
        **result_attributes(
            verdict,
            "sr",
            series_number=series_number,
            series_description=SERIES_DESCRIPTION,
            manufacturer=manufacturer,
            software_version=software_version,
        ),
    )
    sr.add(patient_name)
    separate_containers(sr)
    return sr


def separate_containers(sr: Dataset) -> None:
    """Mark every CONTAINER of ``sr`` ContinuityOfContent SEPARATE.

    highdicom makes containers CONTINUOUS, which tells a viewer to read their items as one run of
    prose: DCMTK's ``dsr2html`` then prints each measurement as a bare "1.94 %" without its
    concept name ("Percentage of opacity").  Measurements are separate statements, and DCMTK's
    and dcmqi's own TID 1500 documents mark their containers SEPARATE.
    """
    sr.ContinuityOfContent = "SEPARATE"
    stack = list(sr.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        if item.get("ValueType") == "CONTAINER":
            item.ContinuityOfContent = "SEPARATE"
        stack.extend(item.get("ContentSequence", []))


def result_attributes(
    verdict: SeriesVerdict,
    kind: str,
    *,
    series_number: int,
    series_description: str,
    manufacturer: str,
    software_version: str = SOFTWARE_VERSION,
) -> dict[str, Any]:
    """What every result object (SR, key images, summary, text SR) passes to its highdicom class.

    Its UIDs (``result_uids`` of the verdict and ``kind``), series and instance number (the
    series version), description, manufacturer and software, UTF-8, and one moment for the
    content and the series date and time (viewers list a series by its date and time).
    """
    uids = result_uids(
        verdict.series_instance_uid, verdict.series_version, verdict.algorithm.version, kind
    )
    now = datetime.now()
    return {
        "series_instance_uid": uids.series_instance_uid,
        "series_number": series_number,
        "sop_instance_uid": uids.sop_instance_uid,
        "instance_number": max(1, verdict.series_version),
        "manufacturer": manufacturer,
        "series_description": series_description,
        "software_versions": software_version,
        "specific_character_set": "ISO_IR 192",
        "content_date": now.date(),
        "content_time": now.time(),
        "series_date": now.date(),
        "series_time": now.time(),
    }


def check_evidence(verdict: SeriesVerdict, evidence: Sequence[Dataset]) -> None:
    """Raise ``ValueError`` unless ``evidence`` holds at least one header of the verdict's study."""
    if not evidence:
        raise ValueError("evidence: at least one source instance is needed")
    if evidence[0].StudyInstanceUID != verdict.study_instance_uid:
        raise ValueError(
            f"evidence: StudyInstanceUID {evidence[0].StudyInstanceUID} differs from the "
            f"verdict's study_instance_uid {verdict.study_instance_uid}"
        )


def local_coding_scheme(manufacturer: str) -> CodingSchemeIdentificationItem:
    """Identification of ``LOCAL_SCHEME`` for the Coding Scheme Identification Sequence."""
    return CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME,
        name="triage-node local codes",
        responsible_organization=manufacturer,
    )


def device_observer(verdict: SeriesVerdict, manufacturer: str) -> ObserverContext:
    """The algorithm as the observer (TID 1004 device) of every result document."""
    return ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=_derived_uid("device", manufacturer, verdict.algorithm.name),
            name=verdict.algorithm.name,
            manufacturer_name=manufacturer,
            model_name=f"{verdict.algorithm.name} {verdict.algorithm.version}",
        ),
    )


def _measurement_group(verdict: SeriesVerdict) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for the series: finding, measurements, evaluations, key slices, comments."""
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=_derived_uid("tracking", verdict.series_instance_uid),
            identifier=f"Lung opacity triage of CT series {verdict.series_instance_uid}",
        ),
        finding_type=OPACITY if verdict.analysed else NOT_ANALYSED,
        finding_sites=[FindingSite(LUNG)],
        algorithm_id=_algorithm_id(verdict),
        measurements=[*_opacity_measurements(verdict), *_cnn_measurements(verdict)],
        qualitative_evaluations=_evaluations(verdict),
        source_images=[
            SourceImageForMeasurementGroup(s.sop_class_uid, s.sop_instance_uid)
            for s in verdict.key_slices
        ],
    )
    for text in _comments(verdict):
        group[0].ContentSequence.append(
            TextContentItem(
                name=COMMENT, value=text, relationship_type=RelationshipTypeValues.CONTAINS
            )
        )
    return group


def _algorithm_id(verdict: SeriesVerdict) -> AlgorithmIdentification:
    algorithm = verdict.algorithm
    parameters = [SHA256_PARAMETER + algorithm.sha256]
    if verdict.rule:
        parameters.append(RULE_PARAMETER + verdict.rule)
    if verdict.analysis_version:
        parameters.append(ANALYSIS_PARAMETER + verdict.analysis_version)
    return AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, parameters=parameters
    )


def _opacity_measurements(verdict: SeriesVerdict) -> list[Measurement]:
    """Volume, PO and PHO of every region in ``REGION_SITES``, then each key slice's PO."""
    q = verdict.quantification
    if not verdict.analysed or q is None:
        return []
    measurements = []
    for where in REGION_SITES:
        region = where.region(q)
        if where.key[0] in ("total", "lungs"):
            measurements.append(
                Measurement(
                    name=VOLUME,
                    value=round(region.volume_ml, VOLUME_DECIMALS),
                    unit=ML_UNIT,
                    method=VOLUME_METHOD,
                    finding_sites=[where.finding_site()],
                )
            )
        for name, value in ((PO, region.po), (PHO, region.pho)):
            measurements.append(
                Measurement(
                    name=name,
                    value=round(value, PO_DECIMALS),
                    unit=PERCENT_UNIT,
                    finding_sites=[where.finding_site()],
                )
            )
    measurements.extend(
        Measurement(
            name=SLICE_PO,
            value=round(s.positive_score, PO_DECIMALS),
            unit=PERCENT_UNIT,
            referenced_images=[_source_image(s)],
        )
        for s in verdict.key_slices
    )
    return measurements


def _cnn_measurements(verdict: SeriesVerdict) -> list[Measurement]:
    """The CNN's class probabilities, series score (from its top slices) and slice counts."""
    measurements = []
    if verdict.probabilities:  # a not-analysed verdict may name classes but has no probabilities
        if len(verdict.probabilities) != len(verdict.classes):
            raise ValueError(
                f"verdict.probabilities: {len(verdict.probabilities)} values for "
                f"{len(verdict.classes)} classes"
            )
        measurements = [
            Measurement(
                name=_class_code(name, CNN_PROBABILITY_CODES),
                value=round(float(p), CNN_DECIMALS),
                unit=PROBABILITY_UNIT,
            )
            for name, p in zip(verdict.classes, verdict.probabilities, strict=True)
        ]
    if verdict.series_score is not None:
        measurements.append(
            Measurement(
                name=CNN_SERIES_SCORE,
                value=round(float(verdict.series_score), CNN_DECIMALS),
                unit=NO_UNITS,
                referenced_images=[_source_image(s) for s in verdict.top_slices] or None,
            )
        )
    if verdict.analysed:
        measurements.append(_count(SLICES_ANALYSED, verdict.slices_analysed, SLICES_UNIT))
    measurements.append(_count(SLICES_IN_SERIES, verdict.slices_total, SLICES_UNIT))
    return measurements


def _count(name: Code, value: int, unit: Code) -> Measurement:
    """A NUM for a count, its Numeric Value an integer string ("74", not "74.0").

    highdicom formats every value as a float (``DS(74, auto_format=True)`` is "74.0"); a count
    reads, and reads back, as an integer.
    """
    measurement = Measurement(name=name, value=int(value), unit=unit)
    measurement[0].MeasuredValueSequence[0].NumericValue = str(int(value))
    return measurement


def _source_image(s: SliceScore) -> SourceImageForMeasurement:
    return SourceImageForMeasurement(s.sop_class_uid, s.sop_instance_uid)


def _evaluations(verdict: SeriesVerdict) -> list[QualitativeEvaluation]:
    """Category, pneumonia-range flag and likelihood (``node.assess``), then the CNN's class."""
    if not verdict.analysed:
        return []
    evaluations = []
    a = verdict.assessment
    if a is not None:
        evaluations = [
            QualitativeEvaluation(CT_CATEGORY, CATEGORY_CODES[a.category]),
            QualitativeEvaluation(PNEUMONIA_RANGE, PRESENT if a.pneumonia else ABSENT),
            QualitativeEvaluation(COVID_LIKELIHOOD, LIKELIHOOD_CODES[a.covid_likelihood]),
        ]
    if verdict.finding is None:
        raise ValueError("verdict.finding: missing for an analysed series")
    evaluations.append(QualitativeEvaluation(CNN_CLASS, _class_code(verdict.finding, CLASS_CODES)))
    return evaluations


def _comments(verdict: SeriesVerdict) -> list[str]:
    comments = []
    if not verdict.analysed:
        comments.append(NOT_ANALYSED_PREFIX + (verdict.reason or "no reason given"))
    comments.extend(COVERAGE_PREFIX + c for c in verdict.coverage)
    if verdict.assessment is not None:
        comments.extend(ASSESSMENT_PREFIX + r for r in verdict.assessment.reasons)
    comments.append(DISCLAIMER)
    if verdict.algorithm.notice:
        comments.append(MODEL_NOTICE_PREFIX + verdict.algorithm.notice)
    return comments


def _class_code(name: str, table: dict[str, Code]) -> Code:
    try:
        return table[name]
    except KeyError:
        raise ValueError(
            f"verdict class {name!r} has no SR code; known classes: {sorted(table)}"
        ) from None


def _predecessor_dataset(ref: PredecessorRef) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = ref.sop_instance_uid
    ds.SOPClassUID = ref.sop_class_uid
    ds.SeriesInstanceUID = ref.series_instance_uid
    ds.StudyInstanceUID = ref.study_instance_uid
    return ds


def verdict_from_report(ds: Dataset) -> dict[str, Any]:
    """Read the verdict back from a triage SR (as written by ``build_report``).

    Parameters
    ----------
    ds
        The SR dataset, e.g. read with ``pydicom.dcmread``.

    Returns
    -------
    dict
        Keys as in ``SeriesVerdict.as_json`` where they exist: ``analysed``, ``finding`` (the
        CNN's class name or None), ``probabilities`` (class -> CNN probability),
        ``slices_analysed`` (None if not analysed), ``slices_total``, ``series_score`` (the CNN's),
        ``reason``, ``category`` (``node.assess`` category or None), ``pneumonia`` (bool or None),
        ``covid_likelihood``, ``analysis_version``, ``coverage``, ``model`` (name, version,
        sha256); plus ``quantification`` (None if not analysed, else ``total`` -> volume_ml, po,
        pho; ``lungs`` -> side -> the same; ``zones`` and ``bands`` -> side -> part -> po, pho),
        ``key_slices`` (sop_instance_uid, po; most opacity first), ``top_slice_uids`` (the CNN's)
        and ``assessment_reasons``.
    """
    group = _measurement_group_of(ds)
    finding = group.finding_type
    if finding is None:
        raise ValueError(f"SR {ds.SOPInstanceUID}: the measurement group has no Finding")
    measurements = group.get_measurements()
    comments = [str(item.value) for item in _items(group[0], COMMENT, ValueTypeValues.TEXT)]
    parameters = _texts(group[0], codes.DCM.AlgorithmParameters)
    category = _evaluation(group, CT_CATEGORY, CATEGORY_CODES)
    pneumonia = _evaluation(group, PNEUMONIA_RANGE, {"yes": PRESENT, "no": ABSENT})
    by_name = {m.name.value: m for m in measurements}
    series_score = by_name.get(CNN_SERIES_SCORE.value)
    return {
        "analysed": finding != NOT_ANALYSED,
        "finding": _evaluation(group, CNN_CLASS, CLASS_CODES),
        "probabilities": {
            _name_of(m.name, CNN_PROBABILITY_CODES): m.value
            for m in measurements
            if m.name in CNN_PROBABILITY_CODES.values()
        },
        "slices_analysed": _int_or_none(by_name.get(SLICES_ANALYSED.value)),
        "slices_total": _int_or_none(by_name.get(SLICES_IN_SERIES.value)),
        "series_score": None if series_score is None else series_score.value,
        "reason": _first(_prefixed(comments, NOT_ANALYSED_PREFIX)) or "",
        "category": category,
        "pneumonia": None if pneumonia is None else pneumonia == "yes",
        "covid_likelihood": _evaluation(group, COVID_LIKELIHOOD, LIKELIHOOD_CODES),
        "quantification": _quantification(measurements),
        "key_slices": [
            {"sop_instance_uid": m.referenced_images[0].referenced_sop_instance_uid, "po": m.value}
            for m in measurements
            if m.name == SLICE_PO
        ],
        "top_slice_uids": []
        if series_score is None
        else [s.referenced_sop_instance_uid for s in series_score.referenced_images],
        "analysis_version": _first(_prefixed(parameters, ANALYSIS_PARAMETER)) or "",
        "coverage": _prefixed(comments, COVERAGE_PREFIX),
        "assessment_reasons": _prefixed(comments, ASSESSMENT_PREFIX),
        "model": {
            "name": _first(_texts(group[0], codes.DCM.AlgorithmName)),
            "version": _first(_texts(group[0], codes.DCM.AlgorithmVersion)),
            "sha256": _first(_prefixed(parameters, SHA256_PARAMETER)),
        },
    }


def _quantification(measurements: list[Measurement]) -> dict[str, Any] | None:
    """Volume, PO and PHO by region (``REGION_SITES``), nested like ``Quantification.as_json``."""
    fields = {VOLUME.value: "volume_ml", PO.value: "po", PHO.value: "pho"}
    sites = {_site_key(w.site, w.laterality, w.modifier): w.key for w in REGION_SITES}
    out: dict[str, Any] = {}
    for m in measurements:
        field = fields.get(m.name.value)
        if field is None or not m.finding_sites:
            continue
        site = m.finding_sites[0]
        key = sites[_site_key(site.value, site.laterality, site.topographical_modifier)]
        node = out
        for part in key:
            node = node.setdefault(part, {})
        node[field] = m.value
    return out or None


def _site_key(*concepts: Code | CodedConcept | None) -> tuple[str, ...]:
    return tuple("" if c is None else f"{c.scheme_designator}:{c.value}" for c in concepts)


def _evaluation(
    group: MeasurementsAndQualitativeEvaluations, name: Code, values: dict[str, Code]
) -> str | None:
    """The key in ``values`` of the evaluation ``name``, or None when the SR has none."""
    found = group.get_qualitative_evaluations(name=name)
    return _name_of(found[0][0].value, values) if found else None


def _name_of(code: CodedConcept, table: dict[str, Code]) -> str:
    for name, known in table.items():
        if code == known:
            return name
    raise ValueError(f"code {code.value} ({code.scheme_designator}) is not one of {sorted(table)}")


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


def _texts(parent: Dataset, name: Code) -> list[str]:
    return [str(item.value) for item in _items(parent, name, ValueTypeValues.TEXT)]


def _prefixed(texts: list[str], prefix: str) -> list[str]:
    return [t[len(prefix) :] for t in texts if t.startswith(prefix)]


def _first(texts: list[str]) -> str | None:
    return texts[0] if texts else None


def _int_or_none(m: Measurement | None) -> int | None:
    return None if m is None else int(m.value)


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
    "REGION_SITES",
    "PredecessorRef",
    "RegionSite",
    "ResultUIDs",
    "build_report",
    "result_uids",
    "verdict_from_report",
    "write_report",
]
