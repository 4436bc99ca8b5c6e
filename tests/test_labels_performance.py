"""Ground truth in (``labels import``, and one series' label as the console sets it) and local
performance out (``performance``), with numbers worked out by hand for a fixture with known
labels."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from node import cli
from node.config import Settings
from node.db import Job, JobStage, JobState, Label, LabelAudit, Series, SeriesState
from node.labels import LabelImportError, import_labels, label_history, set_series_label
from node.performance import collect_performance, wilson
from node.service import open_state

T0 = dt.datetime(2026, 11, 30, 8, 0, 0)
HEADER = (
    "Series Instance UID,Study Instance UID,Accession Number,label,covid,labelled_by,labelled_at\n"
)


@pytest.fixture
def state(tmp_path: Path) -> tuple[sessionmaker[Any], Path]:
    raw = {
        "results": {"send_to": None},
        "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.sqlite3"},
    }
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(raw))
    sessions, _ = open_state(Settings.model_validate(raw).resolve(tmp_path))
    return sessions, config


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


def count(sessions: sessionmaker[Any], table: Any) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


# --------------------------------------------------------------------------------------------------
# labels import


def test_import_writes_labels_with_an_audit_trail(
    state: tuple[sessionmaker[Any], Path], tmp_path: Path
) -> None:
    sessions, config = state
    first = write_csv(
        tmp_path / "a.csv",
        [
            "1.2.3.1.1,,,pneumonia,yes,dr.a,2026-11-30T09:00:00",
            ",1.2.3.2,,no pneumonia,,dr.a,2026-11-30",
            ",,ACC42,Pneumonia,no,dr.b,2026-11-30T10:00:00+01:00",
        ],
    )
    assert cli.main(["labels", "import", str(first), "--config", str(config)]) == 0
    assert count(sessions, Label) == 3 and count(sessions, LabelAudit) == 3
    # a second opinion changes one label: one audit row with before and after
    second = write_csv(
        tmp_path / "b.csv",
        [
            "1.2.3.1.1,,,no pneumonia,no,dr.c,2026-12-01T09:00:00",
            ",1.2.3.2,,no pneumonia,,dr.a,2026-11-30",
        ],
    )
    result = import_labels(sessions, second)
    assert (result.added, result.changed, result.unchanged) == (0, 1, 1)
    with sessions() as session:
        audit = session.scalars(select(LabelAudit).order_by(LabelAudit.id.desc())).first()
        accession = session.scalars(select(Label).where(Label.key_kind == "accession")).one()
    assert audit is not None and audit.changed_by == "dr.c" and audit.source == "b.csv row 2"
    assert json.loads(audit.before_json)["pneumonia"] is True
    assert json.loads(audit.after_json) == {
        "key": "series:1.2.3.1.1",
        "pneumonia": False,
        "covid": False,
        "labelled_by": "dr.c",
        "labelled_at": "2026-12-01T09:00:00",
    }
    assert accession.labelled_at == dt.datetime(2026, 11, 30, 9, 0)  # stored in UTC


def test_one_bad_row_imports_nothing_and_names_row_and_column(
    state: tuple[sessionmaker[Any], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sessions, config = state
    path = write_csv(
        tmp_path / "bad.csv",
        [
            "1.2.3.1.1,,,pneumonia,,dr.a,2026-11-30",
            "1.2.3.1.2,,,maybe,,dr.a,2026-11-30",
            "1.2.3.1.3,,,no pneumonia,,dr.a,2026-11-30",
        ],
    )
    with pytest.raises(LabelImportError) as caught:
        import_labels(sessions, path)
    assert caught.value.errors == [
        "row 3, column label: 'maybe' is not one of ['pneumonia', 'no pneumonia']"
    ]
    assert count(sessions, Label) == 0 and count(sessions, LabelAudit) == 0
    assert cli.main(["labels", "import", str(path), "--config", str(config)]) == 1
    assert "row 3, column label" in capsys.readouterr().err
    assert count(sessions, Label) == 0


@pytest.mark.parametrize(
    ("row", "error"),
    [
        ("1.2.x,,,pneumonia,,dr.a,2026-11-30", "row 2, column series_instance_uid: '1.2.x'"),
        (",,,pneumonia,,dr.a,2026-11-30", "row 2, column series_instance_uid/study_instance_uid"),
        ("1.2.3,,,pneumonia,maybe,dr.a,2026-11-30", "row 2, column covid: 'maybe'"),
        ("1.2.3,,,pneumonia,,,2026-11-30", "row 2, column labelled_by: empty"),
        ("1.2.3,,,pneumonia,,dr.a,yesterday", "row 2, column labelled_at: 'yesterday'"),
    ],
)
def test_each_bad_cell_is_named(
    state: tuple[sessionmaker[Any], Path], tmp_path: Path, row: str, error: str
) -> None:
    with pytest.raises(LabelImportError) as caught:
        import_labels(state[0], write_csv(tmp_path / "x.csv", [row]))
    assert caught.value.errors[0].startswith(error), caught.value.errors


def test_a_key_labelled_twice_in_one_file_is_an_error(
    state: tuple[sessionmaker[Any], Path], tmp_path: Path
) -> None:
    rows = ["1.2.3,,,pneumonia,,dr.a,2026-11-30", "1.2.3,,,no pneumonia,,dr.b,2026-11-30"]
    with pytest.raises(LabelImportError, match="row 3, column series: also labelled in row 2"):
        import_labels(state[0], write_csv(tmp_path / "x.csv", rows))


# --------------------------------------------------------------------------------------------------
# performance

# (truth or None = unlabelled, flagged, PO %, seconds from last image to SR)
CASES = [
    (True, True, 30.0, 10),
    (True, True, 20.0, 20),
    (True, True, 8.0, 30),
    (True, False, 2.0, 40),
    (False, True, 10.0, 50),
    (False, False, 1.0, 60),
    (False, False, 0.5, 70),
    (False, False, 3.0, 80),
    (None, True, 12.0, 90),
    (False, False, 0.0, 100),  # labelled through its study
]


def add_case(
    sessions: sessionmaker[Any], n: int, flagged: bool, po: float, latency_s: float, **job: Any
) -> None:
    verdict = {
        "category": "typical" if flagged else "negative",
        "quantification": {"total": {"po": po}},
    }
    with sessions.begin() as session:
        series = Series(
            study_instance_uid=f"1.2.3.{n}",
            series_instance_uid=f"1.2.3.{n}.1",
            state=SeriesState.COMPLETE,
            last_received_at=T0,
        )
        session.add(series)
        session.flush()
        values: dict[str, Any] = {
            "series_id": series.id,
            "series_version": 1,
            "state": JobState.DONE,
            "stage": JobStage.DELIVER,
            "analysed": 1,
            "finding": verdict["category"],
            "verdict_json": json.dumps(verdict),
            "model_version": "1.0",
            "finished_at": T0 + dt.timedelta(seconds=latency_s),
        }
        values.update(job)
        session.add(Job(**values))


def test_performance_matches_the_hand_computation(
    state: tuple[sessionmaker[Any], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sessions, config = state
    rows = []
    for n, (truth, flagged, po, latency) in enumerate(CASES, start=1):
        # half delivered (delivered_at counts), half kept locally / shadow (finished_at counts)
        sent = {"delivered_at": T0 + dt.timedelta(seconds=latency)} if n % 2 else {}
        add_case(sessions, n, flagged, po, latency, **sent)
        if truth is not None and n != 10:
            label = "pneumonia" if truth else "no pneumonia"
            rows.append(f"1.2.3.{n}.1,,,{label},,dr.a,2026-11-30")
    rows.append(",1.2.3.10,,no pneumonia,,dr.a,2026-11-30")
    add_case(sessions, 11, True, 40.0, 5, model_version="2.0")  # another version, unlabelled
    add_case(sessions, 12, True, 40.0, 5, analysed=0)  # not analysed: not counted
    add_case(sessions, 13, True, 40.0, 5, state=JobState.FAILED)  # analysed, never sent
    rows.append("1.2.3.13.1,,,pneumonia,,dr.a,2026-11-30")
    import_labels(sessions, write_csv(tmp_path / "truth.csv", rows))

    report = collect_performance(sessions)["model_versions"]
    assert sorted(report) == ["1.0", "2.0"]
    v1 = report["1.0"]
    # labelled: 5 positives (1-4, 13), 5 negatives (5-8, 10); series 9 unlabelled
    assert (v1["series"], v1["labelled"], v1["unlabelled"]) == (11, 10, 1)
    assert v1["confusion"] == {"tp": 4, "fp": 1, "fn": 1, "tn": 4}
    # 4/5 each, Wilson 95%: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.96
    for name in ("sensitivity", "specificity", "ppv", "npv"):
        assert v1[name] == {"value": 0.8, "ci95": [0.3755, 0.9638], "n": 5}, name
    # AUC of PO: positives {30, 20, 8, 2, 40} over negatives {10, 1, 0.5, 3, 0}:
    # 5 + 5 + 4 + 3 + 5 = 22 of 25 pairs ranked right
    assert v1["auc_po"]["value"] == 0.88 and v1["auc_po"]["n"] == 10
    lo, hi = v1["auc_po"]["ci95"]
    assert lo <= 0.88 <= hi <= 1.0
    # latency over the 10 finished ones (13 failed: none): 10..100 s; median 55, p95 95.5 (linear)
    assert v1["latency_last_image_to_sr"] == {"median_s": 55.0, "p95_s": 95.5, "n": 10}
    v2 = report["2.0"]
    assert (v2["series"], v2["labelled"], v2["unlabelled"]) == (1, 0, 1)
    assert v2["sensitivity"] == {"value": None, "ci95": None, "n": 0}

    assert cli.main(["performance", "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["model_versions"]["1.0"] == v1
    assert cli.main(["performance", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "sensitivity  0.800 [0.376, 0.964] (n=5)" in text
    assert "median 55.0 s, 95th percentile 95.5 s (n=10)" in text


def test_wilson_by_hand() -> None:
    assert wilson(3, 4) == {"value": 0.75, "ci95": [0.3006, 0.9544], "n": 4}
    assert wilson(0, 10)["ci95"] == [0.0, 0.2775]
    assert wilson(0, 0)["value"] is None


def test_roc_auc_matches_scikit_learn_with_ties() -> None:
    """node.stats.roc_auc (numpy only, for the node) equals scikit-learn's, ties included."""
    from sklearn.metrics import roc_auc_score

    from node.stats import roc_auc

    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        s = rng.integers(0, 6, 40).astype(float)  # many ties
        if 0 < y.sum() < len(y):
            assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert roc_auc(np.array([1, 1]), np.array([0.1, 0.2])) is None


def test_a_series_label_set_twice_keeps_both_audit_rows(
    state: tuple[sessionmaker[Any], Path],
) -> None:
    sessions, _ = state
    uid = "1.2.3.9.1"
    with pytest.raises(ValueError, match="labelled_by"):
        set_series_label(sessions, uid, pneumonia=True, covid=None, who=" ", source="console")
    with pytest.raises(ValueError, match="series_instance_uid"):
        set_series_label(sessions, "1.2.x", pneumonia=True, covid=None, who="dr.a", source="c")
    assert count(sessions, Label) == 0 and count(sessions, LabelAudit) == 0

    first = set_series_label(sessions, uid, pneumonia=True, covid=None, who="dr.a", source="a")
    second = set_series_label(sessions, uid, pneumonia=False, covid=False, who="dr.b", source="b")
    assert (first, second) == ("added", "changed")
    with sessions() as session:
        history = label_history(session, [("series", uid)])
        label = session.scalars(select(Label)).one()
    assert (label.pneumonia, label.covid, label.labelled_by) == (0, 0, "dr.b")
    assert [h.changed_by for h in history] == ["dr.b", "dr.a"]  # newest first
    assert history[1].before is None and history[0].before == history[1].after
    assert history[0].after["pneumonia"] is False and history[0].source == "b"
