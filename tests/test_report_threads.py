"""report.build_report from several threads at once (the scheduler's worker and the console's
thread pool do that): no process-wide warning filters touched, no patient name in a warning, the
name in the SR as received."""

from __future__ import annotations

import threading
import warnings
from typing import Any

import pytest
from highdicom.sr import Comprehensive3DSR
from pydicom import Dataset, examples

from node import report
from node.report import build_report
from node.verdict import AlgorithmInfo, SeriesVerdict

#: One component, no caret: highdicom warns about such names and quotes them.
NAME = "ANONYMISED"


def source() -> Dataset:
    ds = examples.ct.copy()
    del ds.PixelData
    ds.PatientName = NAME
    return ds


def verdict(ds: Dataset) -> SeriesVerdict:
    return SeriesVerdict(
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        series_version=1,
        algorithm=AlgorithmInfo(name="test-model", version="0.0.1", sha256="00" * 32),
        analysed=False,
        reason="no lungs found",
    )


def test_build_report_leaves_the_warning_filters_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """warnings.catch_warnings swaps the process-wide filter list: another thread entering or
    leaving meanwhile restores the wrong list (a warning let through, or a filter left behind)."""
    seen: list[list[Any]] = []

    def recording(*args: Any, **kwargs: Any) -> Comprehensive3DSR:
        seen.append(list(warnings.filters))
        return Comprehensive3DSR(*args, **kwargs)

    monkeypatch.setattr(report, "Comprehensive3DSR", recording)
    before = list(warnings.filters)
    ds = source()
    build_report(verdict(ds), [ds])
    assert seen == [before]
    assert warnings.filters == before


def test_concurrent_reports_no_name_in_warnings_name_kept() -> None:
    before = list(warnings.filters)
    ds = source()
    barrier = threading.Barrier(6)
    results: list[Dataset] = []
    errors: list[BaseException] = []

    def build() -> None:
        barrier.wait()
        try:
            for _ in range(3):
                results.append(build_report(verdict(ds), [ds]))
        except BaseException as exc:  # a warning is an error under pytest's filterwarnings
            errors.append(exc)

    with warnings.catch_warnings(record=True) as caught:  # this test's thread only
        warnings.simplefilter("always")
        threads = [threading.Thread(target=build) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert errors == []
    assert not [w for w in caught if NAME in str(w.message)]
    assert len(results) == 18
    assert {str(sr.PatientName) for sr in results} == {NAME}
    assert warnings.filters == before
