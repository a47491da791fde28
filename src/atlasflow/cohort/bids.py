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
    "t2w": "T2w",
    "flair": "FLAIR",
    "t1ce": "contrast-enhanced T1w (ce-)",
    "pdw": "PDw",
}
#: BIDS suffixes of the other contrasts of a session (a ``ce-`` T1w is the ``t1ce`` one).
_CONTRAST_SUFFIXES = {"T2w": "t2w", "FLAIR": "flair", "PDw": "pdw"}


_ISO_DATE_TIME = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[T ](?P<time>\d{2}:\d{2}(?::\d{2})?)(?:\.\d+)?(?:Z|[+-]\d{2}(?::?\d{2})?)?)?"
)


def _parse_iso_date(text: str) -> date | None:
    """An ISO date, or the date of an ISO date-time (BIDS acq_time, fractional seconds and a ``Z``
    or ``+hh:mm`` zone allowed); None when unparsable."""
    match = _ISO_DATE_TIME.fullmatch(text.strip())
    if not match:
        return None
    try:  # fromisoformat checks the ranges; zone and fraction are left out (Python 3.10 refuses Z)
        return datetime.fromisoformat(f"{match['date']}T{match['time'] or '00:00'}").date()
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
    while header and not header[-1]:  # stray trailing tabs: unnamed, empty columns
        header.pop()
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        values = line.split("\t")
        while len(values) > len(header) and not values[-1].strip():
            values.pop()
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


#: (path relative to the BIDS root, reason) of an entry that looks like an input but is skipped.
Skipped = list[tuple[str, str]]

_T1W_LIKE = re.compile(r".*t1w\.nii(?:\.gz)?", re.IGNORECASE)


def _is_dir(entry: os.DirEntry) -> bool | None:
    """Whether a directory entry is a folder (following links); None for a link loop or another
    entry that cannot be looked at (``Too many levels of symbolic links``)."""
    try:
        return entry.is_dir()
    except OSError:
        return None


def _bids_anat(
    anat: Path, root: Path, subject: str, session: str | None, skipped: Skipped
) -> dict[str, str] | None:
    """One row from one anat/ folder (None when it holds no T1w)."""
    folder = str(anat.relative_to(root))
    found: dict[str, list[str]] = {role: [] for role in IMAGE_COLUMNS}
    t1w_like: list[tuple[str, str]] = []
    with os.scandir(anat) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            # Broken symlinks (datalad files not fetched yet) are kept: validation reports them.
            is_dir = _is_dir(entry)
            t1w_name = _T1W_LIKE.fullmatch(entry.name) is not None
            if is_dir is None:
                if t1w_name:
                    t1w_like.append((entry.name, "symbolic link loop (cannot be read)"))
                else:
                    skipped.append(
                        (f"{folder}/{entry.name}", "symbolic link loop (cannot be read)")
                    )
                continue
            if is_dir:
                if t1w_name:
                    t1w_like.append((entry.name, "is a folder, not a NIfTI file"))
                continue
            parsed = _bids_entities(entry.name)
            if parsed is None:
                if t1w_name:
                    t1w_like.append(
                        (entry.name, "not a BIDS file name (sub-<label>[_...]_T1w.nii[.gz])")
                    )
                continue
            entities, suffix = parsed
            if suffix == "T1w":
                role = "t1ce" if "ce" in entities else "t1w"
            elif suffix in _CONTRAST_SUFFIXES:
                role = _CONTRAST_SUFFIXES[suffix]
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
                if suffix.lower() == "t1w":
                    t1w_like.append(
                        (entry.name, f"suffix '{suffix}' is not 'T1w' (BIDS is case-sensitive)")
                    )
                continue
            if entities.get("sub") != subject or entities.get("ses") != session:
                raise AtlasflowError(
                    f"{folder}/{entry.name}: the file name's sub/ses entities do not match its folder "
                    f"(sub-{subject}{'' if session is None else '/ses-' + session})"
                )
            found[role].append(entry.name)
    skipped.extend((f"{folder}/{name}", reason) for name, reason in t1w_like)
    if not found["t1w"]:
        if not t1w_like:
            skipped.append((folder, "no sub-*_T1w.nii[.gz] file"))
        return None
    row = {"subject": subject, "session": session or ""}
    for role, files in found.items():
        name = _pick_one(files, _BIDS_KIND[role], folder)
        row[role] = str(anat / name) if name else ""
    row[ORIGIN_COLUMN] = f"{folder}/{found['t1w'][0]}"
    return row


def _subject_rows(
    subject_dir: Path, root: Path, subject: str, groups: dict[str, str], skipped: Skipped
) -> list[dict[str, str]]:
    """The rows of one sub-* folder; what looks like an input but is not used goes to skipped."""
    rel = subject_dir.name
    dates: dict[str, str] = {}
    sessions_tsv = subject_dir / f"sub-{subject}_sessions.tsv"
    if sessions_tsv.is_file():
        dates = _bids_session_dates(sessions_tsv, root)
    folders: list[str] = []
    with os.scandir(subject_dir) as children:
        for child in sorted(children, key=lambda c: c.name):
            is_dir = _is_dir(child)
            if is_dir is None:
                skipped.append((f"{rel}/{child.name}", "symbolic link loop (cannot be read)"))
            elif is_dir:
                folders.append(child.name)
    rows: list[dict[str, str]] = []
    for child in folders:
        session = child[4:] if child.startswith("ses-") else None
        if child == "anat":
            anat = subject_dir / "anat"
        elif (subject_dir / child / "anat").is_dir():
            if session is None:
                skipped.append(
                    (
                        f"{rel}/{child}",
                        "has anat/ but is not named ses-<label> (not a BIDS session)",
                    )
                )
                continue
            anat = subject_dir / child / "anat"
        else:
            if session is not None:
                skipped.append((f"{rel}/{child}", "session without an anat/ folder"))
            continue
        row = _bids_anat(anat, root, subject, session, skipped)
        if row is None:
            continue
        row["acq_date"] = dates.get(session or "", "")
        row["group"] = groups.get(subject, "")
        rows.append(row)
    if not rows and not any(path.startswith(f"{rel}/") for path, _ in skipped):
        skipped.append((rel, "no anat/ or ses-*/anat/ folder"))
    return rows


def load_bids(root: Path, skipped: Skipped | None = None) -> pd.DataFrame:
    """The cohort table of a BIDS folder (one row per session with a T1w scan).

    Folders and files that look like inputs but are not used (a subject without ``anat/``, a
    session folder without the ``ses-`` prefix, a ``_t1w`` in lower case, a T1w name that is a
    folder, a symbolic link loop) are appended to ``skipped`` as (path relative to the root,
    reason) when a list is given.
    """
    root = Path(os.path.abspath(root))
    skipped = [] if skipped is None else skipped
    groups = _bids_groups(root)
    rows: list[dict[str, str]] = []
    csv_here: list[str] = []
    with os.scandir(root) as top:
        entries = sorted(top, key=lambda e: e.name)
    for entry in entries:
        is_dir = _is_dir(entry)
        if is_dir is None:
            if entry.name.startswith("sub-") or entry.name.lower().endswith(".csv"):
                skipped.append((entry.name, "symbolic link loop (cannot be read)"))
            continue
        if entry.name.lower().endswith(".csv") and not is_dir and entry.is_file():
            csv_here.append(entry.name)
        # Only sub-* folders at the top are looked at: derivatives/, sourcedata/, code/ never are.
        if not entry.name.startswith("sub-") or not is_dir:
            continue
        rows += _subject_rows(Path(entry.path), root, entry.name[4:], groups, skipped)
    if not rows:
        hint = (
            f"; to use the manifest {csv_here[0]} in it, give that file instead" if csv_here else ""
        )
        raise AtlasflowError(
            f"{root}: no T1w scans found (looked for sub-*/anat/sub-*_T1w.nii[.gz] and "
            f"sub-*/ses-*/anat/sub-*_T1w.nii[.gz]){hint}"
        )
    return normalise_table(pd.DataFrame(rows, dtype=object), root)
