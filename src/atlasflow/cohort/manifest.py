"""Cohort input: read a manifest CSV, or hand a BIDS folder to :mod:`atlasflow.cohort.bids`.

:func:`load_cohort` turns either into one table (its normal form is
:func:`atlasflow.cohort.columns.normalise_table`'s): string columns ``subject`` (no ``sub-``),
``session`` (no ``ses-``, "" when not given), absolute image paths, ``acq_date`` (ISO date),
``group``, ``origin`` (where the row came from), "" when absent. A manifest CSV has the columns of
``workflow/schemas/manifest.schema.yaml``, with paths relative to the manifest's folder.

Only structural problems are found here (missing file, not a CSV, empty manifest, missing or
misspelt columns); value checks are :func:`atlasflow.cohort.validate.validate_cohort`'s. Every
problem is an :class:`AtlasflowError` whose one-line message names the file and row (the header
being row 1).
"""

from __future__ import annotations

import csv
import difflib
import errno
import io
import os
from pathlib import Path

import pandas as pd

from atlasflow.cohort.bids import bids_session_roles, load_bids
from atlasflow.cohort.columns import (
    DEFAULT_REFERENCE,
    ORIGIN_COLUMN,
    auto_reference,
    known_columns,
    normalise_table,
    required_columns,
)
from atlasflow.cohort.selection import BidsOptions, CohortNotes
from atlasflow.errors import AtlasflowError, problems_error


def load_cohort(
    source: str | os.PathLike,
    notes: CohortNotes | list[tuple[str, str]] | None = None,
    options: BidsOptions | None = None,
    reference: str = DEFAULT_REFERENCE,
) -> pd.DataFrame:
    """Read a manifest CSV or discover a BIDS folder; return the normalised cohort table.

    A manifest must have the ``reference`` column (config ``contrasts.reference``; the ``t1w``
    column is then optional unless it is the reference). A BIDS folder's rows are its sessions
    with a T1w scan, whatever the reference.

    Structural problems (missing file, not a CSV, empty manifest, missing columns, BIDS folder
    without T1w scans) raise :class:`AtlasflowError`; value checks are :func:`validate_cohort`'s.
    For a BIDS folder (read under ``options``, see :mod:`atlasflow.cohort.selection`), what looks
    like an input but is skipped, and the choices among several files, go to ``notes``; given a
    :class:`CohortNotes`, the problems discovery finds stay in it for :func:`validate_cohort` to
    report with its own, otherwise (None, or a plain list that collects the skipped inputs) they
    are raised here.
    """
    if isinstance(notes, list):
        notes = CohortNotes(skipped=notes)
        hand_on = False
    else:
        hand_on = notes is not None
    path = Path(source).expanduser()
    if path.is_dir():
        found = notes if notes is not None else CohortNotes()
        table = load_bids(path, found, options)
        if found.problems and not hand_on:
            raise problems_error(str(path), found.problems)
        return table
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise AtlasflowError(
                    f"{path}: is a symbolic link loop (it links, maybe through others, to itself)"
                ) from None
    if not path.exists():
        raise AtlasflowError(
            f"{path}: no such file or folder (expected a manifest .csv or a BIDS folder)"
        )
    if path.suffix.lower() != ".csv":
        raise AtlasflowError(
            f"{path}: expected a manifest .csv file or a BIDS folder, got a file ending in "
            f"'{''.join(path.suffixes) or path.name}'"
        )
    return _load_csv(path, reference)


def choose_reference(source: str | os.PathLike | None, configured: str | None) -> tuple[str, str | None]:
    """The contrast that anchors every session, and a line saying why when the cohort chose it.

    ``configured`` (config ``contrasts.reference``) other than ``auto``/None is taken as it is.
    Otherwise :func:`~atlasflow.cohort.columns.auto_reference` of the sessions of the cohort (a
    BIDS folder or manifest CSV at ``source``; None: the demo, which has T1w scans): the T1w when
    any session has one, else, for example, the post-contrast T1w of a tumour collection of
    FLAIR and post-contrast T1w scans. A source that cannot be read gives the T1w: reading the
    cohort then says what is wrong with it.
    """
    if configured and configured != "auto":
        return configured, None
    if source is None:
        return DEFAULT_REFERENCE, None
    path = Path(source).expanduser()
    try:
        sessions = bids_session_roles(path) if path.is_dir() else _csv_session_roles(path)
    except (OSError, ValueError, csv.Error, UnicodeDecodeError):
        return DEFAULT_REFERENCE, None
    best = auto_reference(sessions)
    if best == DEFAULT_REFERENCE:
        return best, None
    have = sum(best in roles for roles in sessions)
    return best, (
        f"no session of {path} has a T1w: every session is anchored by its {best} "
        f"({have} of {len(sessions)} sessions have one; config contrasts.reference chooses another)"
    )


def _csv_session_roles(path: Path) -> list[set[str]]:
    """The scan columns filled in each row of a manifest CSV (a quick read, no checks)."""
    if path.suffix.lower() != ".csv" or not path.is_file():
        return []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [
        {k.strip().lower() for k, v in row.items() if k and isinstance(v, str) and v.strip()}
        for row in rows
    ]


def _load_csv(path: Path, reference: str = DEFAULT_REFERENCE) -> pd.DataFrame:
    name = path.name
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AtlasflowError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if b"\x00" in raw[:65536]:
        raise AtlasflowError(f"{path}: is a binary file, not a CSV text manifest")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AtlasflowError(
            f"{path}: is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save the manifest as a UTF-8 CSV"
        ) from None
    if not text.strip():
        raise AtlasflowError(
            f"{path}: the manifest is empty (expected a header row with columns "
            f"{', '.join(required_columns(reference))} and one row per scan session)"
        )

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_row = 0
    rows: list[list[str]] = []
    row_numbers: list[int] = []
    last_line = 0
    try:
        for fields in reader:
            # First physical line of this record (a quoted field may span lines).
            start = last_line + 1
            last_line = reader.line_num
            if not any(f.strip() for f in fields):
                continue
            if header is None:
                header, header_row = [f.strip().lower() for f in fields], start
                continue
            if len(fields) != len(header):
                raise AtlasflowError(
                    f"{name} row {start}: has {len(fields)} values but the header (row {header_row}) "
                    f"has {len(header)} columns"
                )
            rows.append([f.strip() for f in fields])
            row_numbers.append(start)
    except csv.Error as exc:
        raise AtlasflowError(f"{name} row {reader.line_num}: not valid CSV ({exc})") from None
    assert header is not None

    # Trailing separators ("subject,session,t1w,") give unnamed, empty columns: drop those.
    keep = [i for i, col in enumerate(header) if col or any(r[i] for r in rows)]
    for i, col in enumerate(header):
        if not col and i in keep:
            raise AtlasflowError(f"{name}: column {i + 1} has values but no name in the header")
    header = [header[i] for i in keep]
    rows = [[r[i] for i in keep] for r in rows]
    _check_header(header, name, reference)
    if not rows:
        raise AtlasflowError(
            f"{name}: the manifest has a header but no rows (one row per scan session)"
        )

    table = pd.DataFrame(rows, columns=header, dtype=object)
    table[ORIGIN_COLUMN] = [f"{name} row {n}" for n in row_numbers]
    return normalise_table(table, path.resolve().parent)


def _check_header(header: list[str], name: str, reference: str = DEFAULT_REFERENCE) -> None:
    """Duplicate, misspelt and missing columns, each named."""
    seen: set[str] = set()
    for col in header:
        if col in seen:
            raise AtlasflowError(f"{name}: column '{col}' appears twice in the header")
        seen.add(col)
    if ORIGIN_COLUMN in seen:
        raise AtlasflowError(
            f"{name}: column '{ORIGIN_COLUMN}' is reserved by atlasflow; rename it"
        )
    known = known_columns()
    absent = [c for c in known if c not in seen]
    for col in header:
        if col not in known:
            # Extra columns (age, sex, ...) are allowed, but a near-miss of a column that is not
            # there is almost always a typo that would silently drop, e.g., every tumour mask.
            close = difflib.get_close_matches(col, absent, n=1, cutoff=0.75)
            if close:
                raise AtlasflowError(f"{name}: unknown column '{col}'; did you mean '{close[0]}'?")
    missing = [c for c in required_columns(reference) if c not in seen]
    if missing:
        hint = ""
        if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
            hint = (
                "; the file seems to use another separator, atlasflow reads comma-separated values"
            )
        if reference in missing and reference != DEFAULT_REFERENCE:
            hint += f"; contrasts.reference is {reference}: it anchors every session"
        raise AtlasflowError(
            f"{name}: missing required column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(c) for c in missing)} (header has: {', '.join(header) or 'nothing'}){hint}"
        )
