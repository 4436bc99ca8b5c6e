"""series_complete.selection_failure: which complete series are ours, and the reason when not."""

from __future__ import annotations

from typing import Any

import pytest

from node.config import SelectionSettings
from node.db import Series
from node.series_complete import selection_failure

RULES = SelectionSettings.model_validate(
    {}
)  # the defaults: CT, chest-like descriptions, no scouts, >= 10 slices


def series(**columns: Any) -> Series:
    """A transient series (never added to a session): a chest CT unless ``columns`` say else."""
    values: dict[str, Any] = {
        "modality": "CT",
        "study_description": "CT Thorax",
        "series_description": "Thorax 1.0 B40f",
        "body_part": "CHEST",
        "image_type": "ORIGINAL\\PRIMARY\\AXIAL",
        "instance_count": 120,
    }
    return Series(**{**values, **columns})


@pytest.mark.parametrize(
    "columns",
    [
        {},
        {"modality": "ct"},  # case does not matter
        {"study_description": "", "series_description": "", "body_part": "LUNG"},
        {"study_description": "Tórax", "series_description": "", "body_part": ""},
        {"study_description": "", "series_description": "", "body_part": ""},  # accepted
        {"instance_count": 10},
    ],
)
def test_a_chest_ct_is_ours(columns: dict[str, Any]) -> None:
    assert selection_failure(series(**columns), RULES) is None


@pytest.mark.parametrize(
    ("columns", "reason"),
    [
        ({"modality": "MR"}, "modality: 'MR' not in ['CT']"),
        (
            {"image_type": "ORIGINAL\\PRIMARY\\LOCALIZER"},
            "image type: ['LOCALIZER'] is excluded",
        ),
        (
            {"series_description": "Topogram  0.6  T20s"},
            "series description: 'Topogram  0.6  T20s' matches exclude_series_pattern "
            f"{RULES.exclude_series_pattern!r}",
        ),
        (
            {"study_description": "CT Abdomen", "series_description": "Venous", "body_part": ""},
            "descriptions: none of ['CT Abdomen', 'Venous'] matches description_pattern "
            f"{RULES.description_pattern!r}",
        ),
        ({"instance_count": 9}, "instance count: 9 < min_instances 10"),
    ],
)
def test_the_first_rule_a_series_fails_is_the_reason(columns: dict[str, Any], reason: str) -> None:
    assert selection_failure(series(**columns), RULES) == reason


def test_missing_descriptions_can_be_refused() -> None:
    strict = SelectionSettings.model_validate({"accept_missing_descriptions": False})
    empty = series(study_description="", series_description="", body_part="")
    assert selection_failure(empty, strict) == (
        "descriptions: study/series description and body part are all empty"
    )


def test_the_rules_are_checked_in_order() -> None:
    """An MR scout of 3 images is refused for its modality, the first rule."""
    scout = series(modality="MR", series_description="Scout", instance_count=3)
    assert selection_failure(scout, RULES) == "modality: 'MR' not in ['CT']"


def test_configured_modalities_and_image_types() -> None:
    rules = SelectionSettings.model_validate(
        {"modalities": ["CT", "PT"], "exclude_image_types": ["DERIVED"]}
    )
    assert selection_failure(series(modality="PT"), rules) is None
    derived = series(image_type="DERIVED\\SECONDARY\\AXIAL")
    assert selection_failure(derived, rules) == "image type: ['DERIVED'] is excluded"
