"""BIDS discovery: a BIDS folder turned into the rows of a cohort table, with plain directory listings.

:func:`load_bids` finds ``sub-*/[ses-*/]anat/sub-*_T1w.nii[.gz]``, the session's other contrasts
(``_T2w``, ``_FLAIR``, ``_PDw``, ``ce-<agent>_T1w``), ``_dseg`` label maps, ``label-tumor`` /
``label-lesion`` and ``desc-brain`` / ``label-brain`` masks (in raw ``anat/`` or under
``derivatives/<pipeline>/``, :mod:`atlasflow.cohort.derivatives`), dates from
``sub-*_sessions.tsv`` and groups from ``participants.tsv``. No pybids (its indexing is slow on big
datasets) and no recursion into ``sourcedata/`` or anything else outside ``sub-*`` and
``derivatives/``. Where a session has several files for one role, :mod:`atlasflow.cohort.selection`
takes one and says why. The table it returns is the same as a manifest CSV's
(:func:`atlasflow.cohort.columns.normalise_table`); ``origin`` is the reference scan's file (the
T1w by default; relative to the root). Problems (file names that disagree with their folder, a subject with both ``anat/`` and
session folders, an unreadable TSV) are collected and raised together, each naming the file.
"""

from __future__ import annotations

import os
import re
from datetime import date, datetime
from pathlib import Path

import pandas as pd

from atlasflow.cohort.columns import (
    AUTO_ORDER,
    IMAGE_COLUMNS,
    ORIGIN_COLUMN,
    normalise_table,
    strip_prefix,
)
from atlasflow.cohort.derivatives import Derived, find_derivatives, is_folder
from atlasflow.cohort.selection import (
    BidsOptions,
    Candidate,
    Choice,
    CohortNotes,
    choose,
    not_an_input,
    parse_name,
    role_of,
)
from atlasflow.errors import AtlasflowError, problems_error

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


_T1W_LIKE = re.compile(r".*t1w\.nii(?:\.gz)?", re.IGNORECASE)
_LOOP = "symbolic link loop (cannot be read)"


def _scan_anat(
    anat: Path, root: Path, subject: str, session: str | None, notes: CohortNotes
) -> tuple[dict[str, list[Candidate]], list[tuple[str, str]]]:
    """The candidate files of one raw anat/ folder per role, and its T1w-like names not taken."""
    folder = anat.relative_to(root).as_posix()
    found: dict[str, list[Candidate]] = {}
    t1w_like: list[tuple[str, str]] = []
    try:
        with os.scandir(anat) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as exc:
        notes.problems.append(f"{folder}: cannot be listed ({exc.strerror or exc})")
        return found, t1w_like
    for entry in entries:
        # Broken symlinks (datalad files not fetched yet) are kept: validation reports them.
        is_dir = is_folder(entry)
        t1w_name = _T1W_LIKE.fullmatch(entry.name) is not None
        if is_dir is None:
            (t1w_like if t1w_name else notes.skipped).append(
                (entry.name if t1w_name else f"{folder}/{entry.name}", _LOOP)
            )
            continue
        if is_dir:
            if t1w_name:
                t1w_like.append((entry.name, "is a folder, not a NIfTI file"))
            continue
        parsed = parse_name(entry.name)
        if parsed is None:
            if t1w_name:
                t1w_like.append(
                    (entry.name, "not a BIDS file name (sub-<label>[_...]_T1w.nii[.gz])")
                )
            continue
        entities, suffix = parsed
        role = role_of(entities, suffix)
        if role is None:
            if suffix.lower() == "t1w":
                t1w_like.append(
                    (entry.name, f"suffix '{suffix}' is not 'T1w' (BIDS is case-sensitive)")
                )
            continue
        reason = not_an_input(entities, suffix)
        if reason is not None:
            notes.skipped.append((f"{folder}/{entry.name}", reason))
            continue
        if entities.get("sub") != subject or entities.get("ses") != session:
            notes.problems.append(
                f"{folder}/{entry.name}: the file name's sub/ses entities do not match its folder "
                f"(sub-{subject}{'' if session is None else '/ses-' + session})"
            )
            continue
        found.setdefault(role, []).append(Candidate(f"{folder}/{entry.name}", entities, suffix))
    return found, [(f"{folder}/{name}", why) for name, why in t1w_like]


def _sources(
    raw: list[Candidate], derived: dict[str, list[Candidate]], options: BidsOptions
) -> list[list[Candidate]]:
    """The candidates of one role grouped by source, in precedence order (raw anat/ first unless
    ``derivatives_first``; pipelines in their order)."""
    by_pipeline: dict[str, list[Candidate]] = {}
    for c in derived:
        by_pipeline.setdefault(c.source, []).append(c)
    groups = list(by_pipeline.values())
    return [g for g in ([*groups, raw] if options.derivatives_first else [raw, *groups]) if g]


def _outranked(loser: str, winner: str, options: BidsOptions) -> str:
    if "anat" in (loser, winner):
        setting = f"bids.derivatives_first: {str(options.derivatives_first).lower()}"
        first = "raw anat/" if winner == "anat" else f"derivatives/{winner}"
        return f"{first} has one and takes precedence ({setting})"
    return f"derivatives/{winner} comes first (bids.derivatives order)"


def _pick(
    folder: str,
    role: str,
    groups: list[list[Candidate]],
    options: BidsOptions,
    notes: CohortNotes,
) -> Candidate | None:
    """The file taken for ``role`` from its candidate groups; the choice goes to ``notes``."""
    picked = choose(groups[0], options)
    if picked is None:
        names = ", ".join(c.name for c in groups[0])
        notes.problems.append(
            f"{folder}: {len(groups[0])} {_BIDS_KIND[role]} files ({names}) and bids.choose is "
            "error - set bids.prefer (e.g. acq-<label>, run-<n>) or bids.choose last-run / "
            "first-run, or edit the manifest that `atlasflow validate --table` writes"
        )
        return None
    chosen, others = picked
    passed = [(c.path, why) for c, why in others]
    passed += [
        (c.path, _outranked(c.source, chosen.source, options)) for g in groups[1:] for c in g
    ]
    if passed:
        notes.choices.append(Choice(folder, role, chosen.path, tuple(passed)))
    return chosen


def _bids_anat(
    anat: Path,
    root: Path,
    subject: str,
    session: str | None,
    notes: CohortNotes,
    options: BidsOptions,
    derived: dict[str, list[Candidate]],
) -> dict[str, str] | None:
    """One row from one anat/ folder (None when it holds no scan of the reference contrast,
    ``options.reference``: the T1w by default)."""
    folder = anat.relative_to(root).as_posix()
    raw, t1w_like = _scan_anat(anat, root, subject, session, notes)
    notes.skipped.extend(t1w_like)
    anchor = options.reference
    if not raw.get(anchor):
        if anchor != "t1w":
            notes.skipped.append((folder, f"no {_BIDS_KIND[anchor]} scan (contrasts.reference)"))
        elif not t1w_like:
            others = [_BIDS_KIND[c] for c in AUTO_ORDER if raw.get(c)]
            hint = (
                f" (it has a {' and a '.join(others)}: config contrasts.reference anchors every "
                "session by another contrast)"
                if others
                else ""
            )
            notes.skipped.append((folder, f"no sub-*_T1w.nii[.gz] file{hint}"))
        return None
    row = {"subject": subject, "session": session or ""}
    for role in IMAGE_COLUMNS:
        groups = _sources(raw.get(role, []), derived.get(role, []), options)
        chosen = _pick(folder, role, groups, options, notes) if groups else None
        row[role] = str(root / chosen.path) if chosen else ""
        if role == anchor:
            if chosen is None:
                return None
            row[ORIGIN_COLUMN] = chosen.path
    return row


def _subject_rows(
    subject_dir: Path,
    root: Path,
    subject: str,
    groups: dict[str, str],
    notes: CohortNotes,
    options: BidsOptions,
    derived: Derived,
) -> list[dict[str, str]]:
    """The rows of one sub-* folder; what looks like an input but is not used goes to notes."""
    rel = subject_dir.name
    dates: dict[str, str] = {}
    sessions_tsv = subject_dir / f"sub-{subject}_sessions.tsv"
    if sessions_tsv.is_file():
        try:
            dates = _bids_session_dates(sessions_tsv, root)
        except AtlasflowError as exc:
            notes.problems.append(str(exc))
    children: list[str] = []
    try:
        with os.scandir(subject_dir) as listing:
            for child in sorted(listing, key=lambda c: c.name):
                is_dir = is_folder(child)
                if is_dir is None:
                    notes.skipped.append((f"{rel}/{child.name}", _LOOP))
                elif is_dir:
                    children.append(child.name)
    except OSError as exc:
        notes.problems.append(f"{rel}: cannot be listed ({exc.strerror or exc})")
    rows: list[dict[str, str]] = []
    for child in children:
        session = child[4:] if child.startswith("ses-") else None
        if child == "anat":
            anat = subject_dir / "anat"
        elif (subject_dir / child / "anat").is_dir():
            if session is None:
                notes.skipped.append(
                    (
                        f"{rel}/{child}",
                        "has anat/ but is not named ses-<label> (not a BIDS session)",
                    )
                )
                continue
            anat = subject_dir / child / "anat"
        else:
            if session is not None:
                notes.skipped.append((f"{rel}/{child}", "session without an anat/ folder"))
            continue
        row = _bids_anat(
            anat, root, subject, session, notes, options, derived.get((subject, session), {})
        )
        if row is None:
            continue
        derived.pop((subject, session), None)  # what is left over is listed as skipped
        row["acq_date"] = dates.get(session or "", "")
        row["group"] = groups.get(subject, "")
        rows.append(row)
    sessions = [f"ses-{r['session']}" for r in rows if r["session"]]
    if sessions and len(sessions) < len(rows):
        notes.problems.append(
            f"{rel}: has scans both in anat/ and in session folders ({', '.join(sessions)}); a BIDS "
            f"subject keeps them either in anat/ (no sessions) or in ses-<label>/anat/ - move "
            f"{rel}/anat/ into a ses-<label>/ folder"
        )
        rows = [r for r in rows if r["session"]]
    if not rows and not any(path.startswith(f"{rel}/") for path, _ in notes.skipped):
        notes.skipped.append((rel, "no anat/ or ses-*/anat/ folder"))
    return rows


def load_bids(
    root: Path, notes: CohortNotes | None = None, options: BidsOptions | None = None
) -> pd.DataFrame:
    """The cohort table of a BIDS folder (one row per session with a T1w scan, or with a scan of
    ``options.reference`` when another contrast anchors the sessions).

    Which file fills a role when a session has several, and which files are never inputs, is
    :mod:`atlasflow.cohort.selection`'s rule under ``options``; label maps and masks may also come
    from ``derivatives/`` (:mod:`atlasflow.cohort.derivatives`). Folders and files that look like
    inputs but are not used (a subject without ``anat/``, a session folder without the ``ses-``
    prefix, a ``_t1w`` in lower case, a T1w name that is a folder, a symbolic link loop, a
    derivative in raw ``anat/``) go to ``notes.skipped`` as (path relative to the root, reason),
    choices among several files to ``notes.choices``. Problems (a file name that disagrees with
    its folder, an unreadable ``sessions.tsv``) go to ``notes.problems`` when ``notes`` is given, for
    the caller to raise with the others (:func:`atlasflow.cohort.validate.validate_cohort` does);
    without ``notes`` they are raised here, all in one error.
    """
    root = Path(os.path.abspath(root))
    own = notes is None
    notes = CohortNotes() if notes is None else notes
    options = options or BidsOptions()
    try:
        groups = _bids_groups(root)
    except AtlasflowError as exc:
        notes.problems.append(str(exc))
        groups = {}
    derived = find_derivatives(root, options, notes)
    rows: list[dict[str, str]] = []
    csv_here: list[str] = []
    with os.scandir(root) as top:
        entries = sorted(top, key=lambda e: e.name)
    for entry in entries:
        is_dir = is_folder(entry)
        if is_dir is None:
            if entry.name.startswith("sub-") or entry.name.lower().endswith(".csv"):
                notes.skipped.append((entry.name, _LOOP))
            continue
        if entry.name.lower().endswith(".csv") and not is_dir and entry.is_file():
            csv_here.append(entry.name)
        # Only sub-* folders at the top are raw data: derivatives/ is read for label maps and
        # masks only, sourcedata/, code/ and the rest never.
        if not entry.name.startswith("sub-") or not is_dir:
            continue
        rows += _subject_rows(
            Path(entry.path), root, entry.name[4:], groups, notes, options, derived
        )
    for (subject, session), roles in derived.items():
        where = f"sub-{subject}" + ("" if session is None else f"/ses-{session}")
        for candidates in roles.values():
            notes.skipped += [
                (c.path, f"no raw session {where} with a {_BIDS_KIND[options.reference]} scan to go with")
                for c in candidates
            ]
    if not rows:
        hint = (
            f"; to use the manifest {csv_here[0]} in it, give that file instead" if csv_here else ""
        )
        if options.reference != "t1w":
            hint = f" (contrasts.reference is {options.reference}){hint}"
            notes.problems.append(f"{root}: no {_BIDS_KIND[options.reference]} scans found{hint}")
        else:
            notes.problems.append(
                f"{root}: no T1w scans found (looked for sub-*/anat/sub-*_T1w.nii[.gz] and "
                f"sub-*/ses-*/anat/sub-*_T1w.nii[.gz]){hint}"
            )
        raise problems_error(str(root), notes.problems)
    if own and notes.problems:
        raise problems_error(str(root), notes.problems)
    return normalise_table(pd.DataFrame(rows, dtype=object), root)


def bids_session_roles(root: Path) -> list[set[str]]:
    """The scan roles (manifest columns) each raw ``sub-*/[ses-*/]anat/`` folder of a BIDS folder
    holds, one set per folder: a quick listing (:func:`_scan_anat`, its notes dropped) for
    choosing the reference contrast; :func:`load_bids` reads the folder for real afterwards."""
    root = Path(os.path.abspath(root))
    roles: list[set[str]] = []
    for subject in sorted(root.glob("sub-*")):
        if not subject.is_dir():
            continue
        for anat in [subject / "anat", *sorted(subject.glob("ses-*/anat"))]:
            if anat.is_dir():
                session = None if anat.parent == subject else anat.parent.name[4:]
                found, _ = _scan_anat(anat, root, subject.name[4:], session, CohortNotes())
                roles.append(set(found))
    return roles
