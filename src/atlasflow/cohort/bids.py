"""BIDS discovery: a BIDS folder turned into the rows of a cohort table, with plain directory listings.

:func:`load_bids` finds ``sub-*/[ses-*/]anat/sub-*_T1w.nii[.gz]`` plus ``_dseg`` label maps,
``label-tumor`` and ``desc-brain`` / ``label-brain`` masks, dates from ``sub-*_sessions.tsv`` and
groups from ``participants.tsv``. No pybids (its indexing is slow on big datasets) and no recursion
into ``derivatives/``, ``sourcedata/`` or anything else outside ``sub-*``. The table it returns is
the same as a manifest CSV's (:func:`atlasflow.cohort.columns.normalise_table`); ``origin`` is the
T1w file. Ambiguities (two T1w scans in one session, file names that disagree with their folder)
raise :class:`AtlasflowError` naming the folder or file.
"""

from __future__ import annotations

import os
import re
from datetime import date, datetime
from pathlib import Path

import pandas as pd

from atlasflow.cohort.columns import IMAGE_COLUMNS, ORIGIN_COLUMN, normalise_table, strip_prefix
from atlasflow.errors import AtlasflowError

_NIFTI_NAME = re.compile(r"(?P<stem>[^/]+?)\.nii(?:\.gz)?")
_BIDS_KIND = {
    "t1w": "T1w",
    "labels": "_dseg",
    "tumor_mask": "tumour mask",
    "brain_mask": "brain mask",
}


def _parse_iso_date(text: str) -> date | None:
    """An ISO date, or the date of an ISO date-time (BIDS acq_time); None when unparsable."""
    text = text.strip()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?", text):
        return None
    try:
        return datetime.fromisoformat(text).date()
    except ValueError:
        return None


def _bids_entities(filename: str) -> tuple[dict[str, str], str] | None:
    """('sub-01_ses-2_T1w.nii.gz') -> ({'sub': '01', 'ses': '2'}, 'T1w'); None if not BIDS-like."""
    match = _NIFTI_NAME.fullmatch(filename)
    if not match:
        return None
    *pairs, suffix = match["stem"].split("_")
    entities: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep or not key or not value:
            return None
        entities[key] = value
    return entities, suffix


def _read_tsv(path: Path, root: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    rel = path.relative_to(root)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise AtlasflowError(f"{rel}: cannot be read as UTF-8 text ({exc})") from None
    lines = text.splitlines()
    if not lines:
        return [], []
    header = [h.strip() for h in lines[0].split("\t")]
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        values = line.split("\t")
        if len(values) != len(header):
            raise AtlasflowError(
                f"{rel} row {number}: has {len(values)} values, the header has {len(header)}"
            )
        rows.append((number, {h: v.strip() for h, v in zip(header, values, strict=True)}))
    return header, rows


def _bids_session_dates(path: Path, root: Path) -> dict[str, str]:
    """session label -> ISO date from a sub-*_sessions.tsv (acq_time column, 'n/a' = unknown)."""
    header, rows = _read_tsv(path, root)
    if "acq_time" not in header:
        return {}
    if "session_id" not in header:
        raise AtlasflowError(f"{path.relative_to(root)}: has acq_time but no session_id column")
    dates = {}
    for number, row in rows:
        session = strip_prefix(row["session_id"], "ses-")
        value = row["acq_time"]
        if value in ("", "n/a"):
            continue
        parsed = _parse_iso_date(value)
        if parsed is None:
            raise AtlasflowError(
                f"{path.relative_to(root)} row {number} (session {session}): acq_time '{value}' is "
                "not an ISO date or date-time (YYYY-MM-DD or YYYY-MM-DDThh:mm:ss)"
            )
        dates[session] = parsed.isoformat()
    return dates


def _bids_groups(root: Path) -> dict[str, str]:
    path = root / "participants.tsv"
    if not path.is_file():
        return {}
    header, rows = _read_tsv(path, root)
    if "participant_id" not in header or "group" not in header:
        return {}
    return {
        strip_prefix(row["participant_id"], "sub-"): ("" if row["group"] == "n/a" else row["group"])
        for _, row in rows
    }


def _pick_one(files: list[str], what: str, folder: str) -> str:
    if len(files) > 1:
        raise AtlasflowError(
            f"{folder}: {len(files)} {what} files ({', '.join(sorted(files))}); atlasflow takes one "
            "per session - remove the extra ones or list the scans in a manifest CSV"
        )
    return files[0] if files else ""


def _bids_anat(anat: Path, root: Path, subject: str, session: str | None) -> dict[str, str] | None:
    """One row from one anat/ folder (None when it holds no T1w)."""
    folder = str(anat.relative_to(root))
    found: dict[str, list[str]] = {role: [] for role in IMAGE_COLUMNS}
    with os.scandir(anat) as entries:
        for entry in entries:
            # Broken symlinks (datalad files not fetched yet) are kept: validation reports them.
            if entry.is_dir():
                continue
            parsed = _bids_entities(entry.name)
            if parsed is None:
                continue
            entities, suffix = parsed
            if suffix == "T1w":
                role = "t1w"
            elif suffix == "dseg":
                role = "labels"
            elif suffix == "mask" and entities.get("label", "").lower() in ("tumor", "tumour"):
                role = "tumor_mask"
            elif suffix == "mask" and "brain" in (
                entities.get("desc", "").lower(),
                entities.get("label", "").lower(),
            ):
                role = "brain_mask"
            else:
                continue
            if entities.get("sub") != subject or entities.get("ses") != session:
                raise AtlasflowError(
                    f"{folder}/{entry.name}: the file name's sub/ses entities do not match its folder "
                    f"(sub-{subject}{'' if session is None else '/ses-' + session})"
                )
            found[role].append(entry.name)
    if not found["t1w"]:
        return None
    row = {"subject": subject, "session": session or ""}
    for role, files in found.items():
        name = _pick_one(files, _BIDS_KIND[role], folder)
        row[role] = str(anat / name) if name else ""
    row[ORIGIN_COLUMN] = f"{folder}/{found['t1w'][0]}"
    return row


def load_bids(root: Path) -> pd.DataFrame:
    """The cohort table of a BIDS folder (one row per session with a T1w scan)."""
    root = Path(os.path.abspath(root))
    groups = _bids_groups(root)
    rows: list[dict[str, str]] = []
    csv_here: list[str] = []
    with os.scandir(root) as top:
        entries = sorted(top, key=lambda e: e.name)
    for entry in entries:
        if entry.name.lower().endswith(".csv") and entry.is_file():
            csv_here.append(entry.name)
        # Only sub-* folders at the top are looked at: derivatives/, sourcedata/, code/ never are.
        if not entry.name.startswith("sub-") or not entry.is_dir():
            continue
        subject = entry.name[4:]
        subject_dir = Path(entry.path)
        dates: dict[str, str] = {}
        sessions_tsv = subject_dir / f"sub-{subject}_sessions.tsv"
        if sessions_tsv.is_file():
            dates = _bids_session_dates(sessions_tsv, root)
        with os.scandir(subject_dir) as children:
            child_names = sorted(c.name for c in children if c.is_dir())
        for child in child_names:
            session = child[4:] if child.startswith("ses-") else None
            if child == "anat":
                anat = subject_dir / "anat"
            elif session is not None and (subject_dir / child / "anat").is_dir():
                anat = subject_dir / child / "anat"
            else:
                continue
            row = _bids_anat(anat, root, subject, session)
            if row is None:
                continue
            row["acq_date"] = dates.get(session or "", "")
            row["group"] = groups.get(subject, "")
            rows.append(row)
    if not rows:
        hint = (
            f"; to use the manifest {csv_here[0]} in it, give that file instead" if csv_here else ""
        )
        raise AtlasflowError(
            f"{root}: no T1w scans found (looked for sub-*/anat/sub-*_T1w.nii[.gz] and "
            f"sub-*/ses-*/anat/sub-*_T1w.nii[.gz]){hint}"
        )
    return normalise_table(pd.DataFrame(rows, dtype=object), root)
