"""Ground-truth stage: radiologists' labels in, for ``triage-node labels import`` and performance.

A CSV row names a series (Series Instance UID), a study (Study Instance UID) or an accession
number, and says pneumonia / no pneumonia (optionally covid yes / no), who said so and when.
Every row is validated first; errors name the row (the file's line number) and the column, and
one bad row imports nothing.  Each change is written to ``label_audit`` with before and after.
The web console sets one series' label the same way (``set_series_label``), as the signed-in user.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db import Label, LabelAudit, utcnow
from node.errors import NodeError

logger = logging.getLogger(__name__)

KEY_COLUMNS = ("series_instance_uid", "study_instance_uid", "accession_number")
"""Columns that name what a label is about, most specific first: the first one filled is used."""
KEY_KIND = {
    "series_instance_uid": "series",
    "study_instance_uid": "study",
    "accession_number": "accession",
}
COLUMNS = (*KEY_COLUMNS, "label", "covid", "labelled_by", "labelled_at")
REQUIRED = ("label", "labelled_by", "labelled_at")
PNEUMONIA = {"pneumonia": 1, "no pneumonia": 0}
YES_NO = {"yes": 1, "no": 0}
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class LabelImportError(NodeError):
    """A label file has invalid rows; ``errors`` lists each as "row N, column C: why"."""

    def __init__(self, path: Path, errors: list[str]) -> None:
        self.errors = errors
        listing = "\n  ".join(errors)
        super().__init__(f"{path}: nothing imported, {len(errors)} error(s):\n  {listing}")


@dataclass(frozen=True)
class LabelRow:
    row: int
    key_kind: str
    key_value: str
    pneumonia: int
    covid: int | None
    labelled_by: str
    labelled_at: dt.datetime


@dataclass(frozen=True)
class ImportResult:
    added: int
    changed: int
    unchanged: int


def _column_name(header: str) -> str:
    """ "Series Instance UID", "SeriesInstanceUID", "series_instance_uid" -> the canonical name."""
    squashed = re.sub(r"[^a-z]", "", header.lower())
    for name in COLUMNS:
        if name.replace("_", "") == squashed:
            return name
    return header


def _parse_when(text: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when


def _parse_row(line: int, row: dict[str, str]) -> tuple[LabelRow | None, list[str]]:
    errors: list[str] = []
    value = {k: (row.get(k) or "").strip() for k in COLUMNS}
    key = next((k for k in KEY_COLUMNS if value[k]), None)
    if key is None:
        errors.append(f"row {line}, column {'/'.join(KEY_COLUMNS)}: none is filled")
    elif key != "accession_number" and (len(value[key]) > 64 or not _UID.match(value[key])):
        errors.append(f"row {line}, column {key}: {value[key]!r} is not a DICOM UID")
    elif key == "accession_number" and len(value[key]) > 16:
        errors.append(f"row {line}, column {key}: longer than 16 characters")
    for name in REQUIRED:
        if not value[name]:
            errors.append(f"row {line}, column {name}: empty")
    label = value["label"].lower()
    if label and label not in PNEUMONIA:
        errors.append(
            f"row {line}, column label: {value['label']!r} is not one of {list(PNEUMONIA)}"
        )
    covid = value["covid"].lower()
    if covid and covid not in YES_NO:
        errors.append(f"row {line}, column covid: {value['covid']!r} is not yes, no or empty")
    if len(value["labelled_by"]) > 64:
        errors.append(f"row {line}, column labelled_by: longer than 64 characters")
    when: dt.datetime | None = None
    if value["labelled_at"]:
        try:
            when = _parse_when(value["labelled_at"])
        except ValueError:
            errors.append(
                f"row {line}, column labelled_at: {value['labelled_at']!r} is not an ISO date"
            )
    if errors or key is None or when is None:
        return None, errors
    return (
        LabelRow(
            row=line,
            key_kind=KEY_KIND[key],
            key_value=value[key],
            pneumonia=PNEUMONIA[label],
            covid=YES_NO[covid] if covid else None,
            labelled_by=value["labelled_by"],
            labelled_at=when,
        ),
        [],
    )


def read_labels(path: Path) -> list[LabelRow]:
    """Parse and validate every row of ``path``.

    Raises
    ------
    LabelImportError
        Listing every bad row (row = line number in the file, the header is row 1) and column.
    """
    errors: list[str] = []
    rows: list[LabelRow] = []
    seen: dict[tuple[str, str], int] = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        headers = [_column_name(h) for h in reader.fieldnames or []]
        unknown = [h for h in headers if h not in COLUMNS]
        if unknown:
            raise LabelImportError(path, [f"row 1: unknown column(s) {unknown}; known: {COLUMNS}"])
        if not any(k in headers for k in KEY_COLUMNS) or "label" not in headers:
            raise LabelImportError(path, [f"row 1: needs label and one of {KEY_COLUMNS}"])
        reader.fieldnames = headers
        for raw in reader:
            line = reader.line_num
            if None in raw:
                errors.append(f"row {line}: more cells than columns")
                continue
            parsed, row_errors = _parse_row(line, raw)
            errors += row_errors
            if parsed is None:
                continue
            first = seen.setdefault((parsed.key_kind, parsed.key_value), line)
            if first != line:
                errors.append(f"row {line}, column {parsed.key_kind}: also labelled in row {first}")
            rows.append(parsed)
    if errors:
        raise LabelImportError(path, errors)
    return rows


def _as_json(label: Label) -> dict[str, Any]:
    return {
        "key": f"{label.key_kind}:{label.key_value}",
        "pneumonia": bool(label.pneumonia),
        "covid": None if label.covid is None else bool(label.covid),
        "labelled_by": label.labelled_by,
        "labelled_at": label.labelled_at.isoformat(),
    }


def _write(session: Session, r: LabelRow, source: str) -> str:
    """Set one label in an open transaction, with an audit row when it changes.

    Returns "added", "changed" or "unchanged" (then no audit row: nothing changed).
    """
    label = session.scalars(
        select(Label).where(Label.key_kind == r.key_kind, Label.key_value == r.key_value)
    ).one_or_none()
    before = _as_json(label) if label is not None else None
    if label is None:
        label = Label(key_kind=r.key_kind, key_value=r.key_value)
        session.add(label)
    label.pneumonia, label.covid = r.pneumonia, r.covid
    label.labelled_by, label.labelled_at = r.labelled_by, r.labelled_at
    after = _as_json(label)
    if before == after:
        return "unchanged"
    label.source, label.updated_at = source, utcnow()
    session.flush()
    session.add(
        LabelAudit(
            label_id=label.id,
            changed_by=r.labelled_by,
            before_json=json.dumps(before) if before else "",
            after_json=json.dumps(after),
            source=source,
        )
    )
    return "added" if before is None else "changed"


def import_labels(sessions: sessionmaker[Any], path: Path) -> ImportResult:
    """Validate ``path`` and write its labels in one transaction, with an audit row per change.

    Raises
    ------
    LabelImportError
        When any row is invalid; then nothing is written.
    """
    rows = read_labels(path)
    outcomes = {"added": 0, "changed": 0, "unchanged": 0}
    with sessions.begin() as session:
        for r in rows:
            outcomes[_write(session, r, f"{path.name} row {r.row}")] += 1
    added, changed, unchanged = outcomes["added"], outcomes["changed"], outcomes["unchanged"]
    logger.info("labels from %s: %d new, %d changed, %d unchanged", path, added, changed, unchanged)
    return ImportResult(added=added, changed=changed, unchanged=unchanged)


def set_series_label(
    sessions: sessionmaker[Any],
    series_instance_uid: str,
    *,
    pneumonia: bool,
    covid: bool | None,
    who: str,
    source: str,
) -> str:
    """One series' label from the web console: by ``who`` (the signed-in user), now.

    Written like an imported row (``labels`` plus a ``label_audit`` row with before and after);
    ``source`` says where and what was agreed with.  Returns "added" or "changed".

    Raises
    ------
    ValueError
        When ``who`` is empty or longer than 64 characters, or the UID is not a DICOM UID.
    """
    if not who.strip() or len(who) > 64:
        raise ValueError("labelled_by: the user name must be 1 to 64 characters")
    if len(series_instance_uid) > 64 or not _UID.match(series_instance_uid):
        raise ValueError(f"series_instance_uid: {series_instance_uid!r} is not a DICOM UID")
    row = LabelRow(
        row=0,
        key_kind="series",
        key_value=series_instance_uid,
        pneumonia=int(pneumonia),
        covid=None if covid is None else int(covid),
        labelled_by=who.strip(),
        labelled_at=utcnow(),
    )
    with sessions.begin() as session:
        outcome = _write(session, row, source)
    logger.info("label for series %s set by the console: %s", series_instance_uid, outcome)
    return outcome


@dataclass(frozen=True)
class LabelView:
    """A label as shown beside a series: its own (kind "series") or its study's."""

    key_kind: str
    pneumonia: bool
    covid: bool | None
    labelled_by: str
    labelled_at: dt.datetime
    source: str


@dataclass(frozen=True)
class AuditEntry:
    id: int
    changed_by: str
    changed_at: dt.datetime
    before: dict[str, Any] | None
    after: dict[str, Any]
    source: str


def _view(label: Label) -> LabelView:
    return LabelView(
        key_kind=label.key_kind,
        pneumonia=bool(label.pneumonia),
        covid=None if label.covid is None else bool(label.covid),
        labelled_by=label.labelled_by,
        labelled_at=label.labelled_at,
        source=label.source,
    )


def labels_for(session: Session, uids: list[tuple[str, str]]) -> dict[str, LabelView]:
    """Series UID -> its label for ``(series UID, study UID)`` pairs: the series' own, else its
    study's (the precedence ``node.performance`` uses)."""
    series_uids = [s for s, _ in uids]
    study_uids = [t for _, t in uids]
    found = {
        (lab.key_kind, lab.key_value): lab
        for lab in session.scalars(
            select(Label).where(
                ((Label.key_kind == "series") & Label.key_value.in_(series_uids))
                | ((Label.key_kind == "study") & Label.key_value.in_(study_uids))
            )
        )
    }
    out = {}
    for series_uid, study_uid in uids:
        label = found.get(("series", series_uid)) or found.get(("study", study_uid))
        if label is not None:
            out[series_uid] = _view(label)
    return out


def label_history(session: Session, keys: list[tuple[str, str]]) -> list[AuditEntry]:
    """The audit rows of the labels with these ``(kind, value)`` keys, newest first."""
    entries = []
    for kind, value in keys:
        rows = session.execute(
            select(LabelAudit)
            .join(Label, Label.id == LabelAudit.label_id)
            .where(Label.key_kind == kind, Label.key_value == value)
        ).scalars()
        entries += [
            AuditEntry(
                id=a.id,
                changed_by=a.changed_by,
                changed_at=a.changed_at,
                before=json.loads(a.before_json) if a.before_json else None,
                after=json.loads(a.after_json),
                source=a.source,
            )
            for a in rows
        ]
    return sorted(entries, key=lambda e: (e.changed_at, e.id), reverse=True)
