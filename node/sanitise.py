"""Report stage, input side: the source attributes our result objects copy, made valid.

Every result object (SR, Key Object Selection, summary image) lands in the source study and so
copies the source's patient, study and equipment attributes (highdicom copies every attribute
of the Patient and Study modules it finds, and the acquisition equipment as Contributing
Equipment).  Real exports are sloppy: TCIA Lung_Dx-A0001 has a ReferencedStudySequence item
without its Referenced SOP Class UID, other sources carry dates like ``2020-01-01`` or a
Patient's Sex of ``U``.  Copied as they are they make our object invalid, or make highdicom
refuse to build it.  ``clean_source`` keeps what is valid and drops (or, where the attribute is
Type 2, empties) the rest; each dropped attribute is logged by keyword, never by value.
"""

from __future__ import annotations

import copy
import logging

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

logger = logging.getLogger(__name__)

IDENTITY = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
"""Kept unchanged: they say which study our objects belong to and what they reference."""

TYPE2 = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    }
)
"""Patient and study attributes that must be present (empty if unknown): emptied, not dropped."""

ENUMERATED = {"PatientSex": frozenset({"M", "F", "O"})}

TEXT_CHECKED = frozenset({"FD", "FL", "SL", "SS", "SV", "UL", "US", "UV", "AT"})
"""Binary numbers: their values are checked as they are, not as text."""

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

REFERENCE_ITEMS = {
    "ReferencedStudySequence": ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID"),
    "ReferencedPatientSequence": ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID"),
}
"""Sequences of SOP Instance Reference Macro items: both UIDs are Type 1 in every item."""

_CODE_VALUES = ("CodeValue", "LongCodeValue", "URNCodeValue")


def clean_source(source: Dataset) -> Dataset:
    """A copy of the root attributes of ``source`` with only valid values.

    Parameters
    ----------
    source
        A header of the source series (pixel data is not copied).

    Returns
    -------
    pydicom.Dataset
        ``IDENTITY`` as in ``source``; every other public root attribute kept when each value is
        valid for its VR (and, for ``ENUMERATED`` ones, an allowed value); a ``TYPE2`` attribute
        with an invalid value kept empty (and added empty when missing); sequences kept only as
        far as their items are valid code items or complete SOP instance references (nested
        sequences dropped); private, binary and unknown-VR attributes dropped.
    """
    clean = Dataset()
    dropped = []
    for element in source:
        keyword = element.keyword
        if element.tag.group <= 0x0002 or element.tag.is_private or not keyword:
            continue
        if keyword == "PixelData":
            continue
        kept = element if keyword in IDENTITY else _clean_element(element)
        if kept is not None:
            clean.add(copy.deepcopy(kept))  # never shared: changing ours leaves the source alone
        elif element.VR not in BINARY_VRS:
            dropped.append(keyword)
    for keyword in TYPE2:
        if keyword not in clean:
            setattr(clean, keyword, None)
    _keep_deidentification_consistent(clean)
    if dropped:
        logger.debug("source attributes dropped or emptied as invalid: %s", ", ".join(dropped))
    return clean


def nameless_source(source: Dataset) -> tuple[Dataset, DataElement]:
    """``clean_source(source)`` with an empty Patient's Name, and the name element apart.

    highdicom warns about a single-component person name and quotes it: the patient's name
    would reach the logs.  Filtering warnings is process-wide (``warnings.catch_warnings`` is
    not thread-safe; result objects are built on the scheduler thread and in the console's
    threads at once), so the builder gets no name to check and the caller puts the element
    back, as received, into the object it built (``obj.add(name)``).
    """
    clean = clean_source(source)
    name = clean["PatientName"]
    del clean.PatientName
    clean.PatientName = None
    return clean, name


def _clean_element(element: DataElement) -> DataElement | None:
    """``element`` if valid, a sequence of its valid items if any, else None."""
    keyword = element.keyword
    if element.VR == "SQ":
        if keyword not in REFERENCE_ITEMS and not keyword.endswith("CodeSequence"):
            return None
        items = [item for item in (_clean_item(keyword, i) for i in element.value) if item]
        return DataElement(element.tag, "SQ", items) if items else None
    if element.VR in BINARY_VRS or not _valid_values(element):
        return None
    allowed = ENUMERATED.get(keyword)
    if allowed is not None and not element.is_empty and str(element.value) not in allowed:
        return None
    return element


def _valid_values(element: DataElement) -> bool:
    if element.is_empty:
        return True
    values = element.value if isinstance(element.value, MultiValue) else [element.value]
    try:
        for value in values:
            # numbers (DS, IS) and names (PN) are checked as the text they were read from
            text = getattr(value, "original_string", None) or str(value)
            validate_value(element.VR, value if element.VR in TEXT_CHECKED else text, config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _clean_item(keyword: str, item: Dataset) -> Dataset | None:
    """A code item (code value, scheme, meaning) or a complete SOP instance reference, without
    nested sequences; None when a required value is missing or any value is invalid."""
    required: tuple[str, ...] | None = REFERENCE_ITEMS.get(keyword)
    if required is None:
        value = next((k for k in _CODE_VALUES if item.get(k)), "CodeValue")
        required = (value, "CodeMeaning")
        if value != "URNCodeValue":
            required += ("CodingSchemeDesignator",)
    clean = Dataset()
    for element in item:
        if element.VR == "SQ" or element.tag.is_private:
            continue
        if element.VR in BINARY_VRS or not _valid_values(element):
            return None
        clean.add(copy.deepcopy(element))
    if any(name not in clean or clean[name].is_empty for name in required):
        return None
    return clean


def _keep_deidentification_consistent(clean: Dataset) -> None:
    """Patient Identity Removed YES needs a method (text or codes): dropped if neither is left."""
    if clean.get("PatientIdentityRemoved") == "YES" and not (
        clean.get("DeidentificationMethod") or clean.get("DeidentificationMethodCodeSequence")
    ):
        del clean.PatientIdentityRemoved
