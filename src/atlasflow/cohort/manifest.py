"""Cohort input and validation: the manifest CSV or BIDS folder, turned into one checked table.

This module owns what atlasflow accepts as a cohort and every check made on it before any job runs:

* :func:`load_cohort` reads a manifest CSV (columns from ``workflow/schemas/manifest.schema.yaml``,
  paths relative to the manifest's folder) or discovers a BIDS folder
  (``sub-*/[ses-*/]anat/sub-*_T1w.nii[.gz]`` plus ``_dseg`` label maps, ``label-tumor`` and
  ``desc-brain`` / ``label-brain`` masks, dates from ``sub-*_sessions.tsv``) with plain directory
  listings (no pybids, no recursion into ``derivatives/``). Both give the same table: string
  columns ``subject`` (no ``sub-``), ``session`` (no ``ses-``, "1" when not given), absolute image
  paths, ``acq_date`` (ISO date), ``group``, ``origin`` (where the row came from), "" when absent.
* :func:`validate_cohort` checks the table against the schema, then the cohort-level rules
  (duplicate sessions, dates) and finally every image (:func:`validate_image`), and returns the
  table sorted by subject and time. It writes nothing.
* :func:`validate_image` checks one NIfTI file for the role it plays (``t1w``, ``labels``,
  ``tumor_mask``, ``brain_mask``): header checks read only the header; with ``check_data`` the
  voxels are streamed once (one decompression, which also verifies the gzip checksum) to find
  truncation, NaN/Inf, constant images, non-integer labels and non-binary or empty masks. Results
  are cached in memory by (path, size, mtime).

Every problem is an :class:`AtlasflowError` whose one-line message names the row (``manifest.csv
row 4 (subject 03, session 1)``, the header being row 1) or the file, and says what is wrong.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import io
import logging
import math
import os
import re
import sys
import threading
import time
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import yaml

from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Grid, load_header

# ----------------------------------------------------------------------------------- schema

_SCHEMA_NAME = "manifest.schema.yaml"

#: Image columns and the role each plays; the checks per role are in :func:`_role_problem`.
IMAGE_COLUMNS = ("t1w", "labels", "tumor_mask", "brain_mask")
#: Column added by :func:`load_cohort`: where the row came from (manifest row or BIDS file).
ORIGIN_COLUMN = "origin"

MAX_VOXEL_MM = 20.0
_GRID_TOLERANCE_VOXELS = 0.01


def schema_path() -> Path:
    """The manifest schema: ``workflow/schemas`` of a source checkout, else the packaged copy."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (
        here.parents[1] / "workflow" / "schemas" / _SCHEMA_NAME,
        here / "data" / _SCHEMA_NAME,
    ):
        if candidate.is_file():
            return candidate
    raise AtlasflowError(f"manifest schema {_SCHEMA_NAME} not found next to the atlasflow package")


@lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    """The manifest-row JSON-Schema (parsed once)."""
    with open(schema_path(), encoding="utf-8") as fh:
        schema = yaml.safe_load(fh)
    missing = [c for c in IMAGE_COLUMNS if c not in schema["properties"]]
    if missing:  # the code's roles and the schema's columns must agree
        raise AtlasflowError(f"{schema_path()}: image column(s) {missing} not described")
    return schema


@lru_cache(maxsize=1)
def _row_validator():
    import jsonschema

    schema = manifest_schema()
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def known_columns() -> tuple[str, ...]:
    return tuple(manifest_schema()["properties"])


def required_columns() -> tuple[str, ...]:
    return tuple(manifest_schema()["required"])


# ------------------------------------------------------------------------------- small helpers


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _natural_key(text: str) -> tuple:
    """'2' sorts before '10'; ties between '01' and '1' are broken by the text itself."""
    parts = re.split(r"(\d+)", text)
    return tuple((0, int(p), p) if p.isdigit() else (1, 0, p) for p in parts if p) + ((2, 0, text),)


def _row_label(origin: str, subject: str, session: str) -> str:
    return f"{origin} (subject {subject or '?'}, session {session or '?'})"


def _strip_prefix(value: str, prefix: str) -> str:
    return value[len(prefix) :] if value.startswith(prefix) else value


def _parse_iso_date(text: str) -> date | None:
    """An ISO date, or the date of an ISO date-time (BIDS acq_time); None when unparsable."""
    text = text.strip()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?", text):
        return None
    try:
        return datetime.fromisoformat(text).date()
    except ValueError:
        return None


# ---------------------------------------------------------------------------- loading: CSV


def load_cohort(source: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest CSV or discover a BIDS folder; return the normalised cohort table.

    Structural problems (missing file, not a CSV, empty manifest, missing columns, BIDS folder
    without T1w scans) raise :class:`AtlasflowError`; value checks are :func:`validate_cohort`'s.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_bids(path)
    if not path.exists():
        raise AtlasflowError(
            f"{path}: no such file or folder (expected a manifest .csv or a BIDS folder)"
        )
    if path.suffix.lower() != ".csv":
        raise AtlasflowError(
            f"{path}: expected a manifest .csv file or a BIDS folder, got a file ending in "
            f"'{''.join(path.suffixes) or path.name}'"
        )
    return _load_csv(path)


def _load_csv(path: Path) -> pd.DataFrame:
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
            f"{', '.join(required_columns())} and one row per scan session)"
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
    _check_header(header, name)
    if not rows:
        raise AtlasflowError(
            f"{name}: the manifest has a header but no rows (one row per scan session)"
        )

    table = pd.DataFrame(rows, columns=header, dtype=object)
    table[ORIGIN_COLUMN] = [f"{name} row {n}" for n in row_numbers]
    return _normalise(table, path.resolve().parent)


def _check_header(header: list[str], name: str) -> None:
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
    missing = [c for c in required_columns() if c not in seen]
    if missing:
        hint = ""
        if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
            hint = (
                "; the file seems to use another separator, atlasflow reads comma-separated values"
            )
        raise AtlasflowError(
            f"{name}: missing required column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(c) for c in missing)} (header has: {', '.join(header) or 'nothing'}){hint}"
        )


def _normalise(table: pd.DataFrame, base: Path) -> pd.DataFrame:
    """String ids without BIDS prefixes, session "1" when empty, absolute paths, "" when absent."""
    table = table.copy()
    for col in known_columns():
        if col not in table.columns:
            table[col] = ""
    for col in table.columns:
        table[col] = [
            ("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip())
            for v in table[col]
        ]
    table["subject"] = [_strip_prefix(v, "sub-") for v in table["subject"]]
    table["session"] = [_strip_prefix(v, "ses-") or "1" for v in table["session"]]
    for col in IMAGE_COLUMNS:
        table[col] = [
            os.path.normpath(os.path.join(base, os.path.expanduser(v))) if v else ""
            for v in table[col]
        ]
    ordered = [c for c in known_columns() if c in table.columns]
    ordered += [c for c in table.columns if c not in ordered and c != ORIGIN_COLUMN]
    if ORIGIN_COLUMN in table.columns:
        ordered.append(ORIGIN_COLUMN)
    return table[ordered].reset_index(drop=True)


# --------------------------------------------------------------------------- loading: BIDS

_NIFTI_NAME = re.compile(r"(?P<stem>[^/]+?)\.nii(?:\.gz)?")
_BIDS_KIND = {
    "t1w": "T1w",
    "labels": "_dseg",
    "tumor_mask": "tumour mask",
    "brain_mask": "brain mask",
}


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
        session = _strip_prefix(row["session_id"], "ses-")
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
        _strip_prefix(row["participant_id"], "sub-"): (
            "" if row["group"] == "n/a" else row["group"]
        )
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
    found: dict[str, list[str]] = {"t1w": [], "labels": [], "tumor_mask": [], "brain_mask": []}
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


def _load_bids(root: Path) -> pd.DataFrame:
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
    return _normalise(pd.DataFrame(rows, dtype=object), root)


# ------------------------------------------------------------------------ image validation


@dataclass(frozen=True)
class VoxelStats:
    """What one streaming pass over the voxels (after intensity scaling) found."""

    finite: bool  # no NaN / Inf, and within float32 range (what load_image produces)
    minimum: float
    maximum: float
    integer_valued: bool
    non_integer_example: float | None
    nonzero: int


@dataclass(frozen=True, eq=False)
class ImageInfo:
    """Header facts of one checked NIfTI file (plus voxel statistics when data were checked)."""

    path: Path
    shape: tuple[int, int, int]  # spatial shape (a trailing singleton dimension dropped)
    affine: np.ndarray  # voxel -> world (RAS mm), as nibabel/load_image sees it
    dtype: np.dtype  # on-disk voxel type
    header: nib.Nifti1Header
    data_offset: int  # byte where the voxels start (in the decompressed stream)
    scaling: tuple[float, float]  # (slope, intercept) applied to the stored values, as nibabel does
    stats: VoxelStats | None = None

    @property
    def grid(self) -> Grid:
        return Grid(self.shape, self.affine)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.grid.spacing)


class _Invalid(Exception):
    """A problem with one file, message without the row/file prefix."""


# (absolute path, size, mtime_ns) -> ImageInfo; bounded, in memory only.
_CACHE: OrderedDict[tuple[str, int, int], ImageInfo] = OrderedDict()
_CACHE_SIZE = 20000
_CACHE_LOCK = threading.Lock()


def clear_image_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def _cache_key(path: Path, st: os.stat_result) -> tuple[str, int, int]:
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _remember(key: tuple[str, int, int], info: ImageInfo) -> None:
    with _CACHE_LOCK:
        _CACHE[key] = info
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)


def validate_image(
    path: str | os.PathLike,
    role: str,
    row_label: str = "",
    check_data: bool = True,
) -> ImageInfo:
    """Check one NIfTI file for its role; return its header facts or raise AtlasflowError.

    ``role`` is one of :data:`IMAGE_COLUMNS`. Header checks: readable NIfTI, 3-D (a trailing
    singleton dimension is fine), real-valued voxel type, voxel size in (0, 20] mm in both the raw
    header and the affine, a non-degenerate affine, valid intensity scaling, an uncompressed file
    long enough for its data. ``check_data`` adds one streaming pass over the voxels: complete gzip
    stream with a valid checksum, enough data, finite values, and per role: t1w not constant;
    labels whole, non-negative numbers with some label; masks 0/1 only; brain mask not empty.
    """
    if role not in IMAGE_COLUMNS:
        raise ValueError(f"unknown image role {role!r}; expected one of {IMAGE_COLUMNS}")
    path = Path(path)
    prefix = f"{row_label}: {role} {path}" if row_label else f"{role} {path}"
    try:
        info = _image_facts(path, check_data)
        problem = _role_problem(info, role, check_data)
    except _Invalid as exc:
        raise AtlasflowError(f"{prefix}: {_one_line(str(exc))}") from None
    if problem:
        raise AtlasflowError(f"{prefix}: {problem}")
    return info


def _image_facts(path: Path, check_data: bool) -> ImageInfo:
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise _Invalid("expected a NIfTI file ending in .nii or .nii.gz")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _Invalid("file not found") from None
    except OSError as exc:
        raise _Invalid(f"cannot be read ({exc.strerror or exc})") from None
    if not os.path.isfile(path):
        raise _Invalid("is a folder, expected a NIfTI file")
    key = _cache_key(path, st)
    with _CACHE_LOCK:
        info = _CACHE.get(key)
    if info is None:
        info = _header_facts(path, st.st_size)
    if check_data and info.stats is None:
        info = dataclasses.replace(info, stats=_voxel_stats(path, info))
    _remember(key, info)
    return info


def _workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def validate_images(
    jobs: list[tuple[str | os.PathLike, str, str]],
    check_data: bool = True,
) -> list[ImageInfo]:
    """:func:`validate_image` for many ``(path, role, row_label)`` jobs; the first problem in job
    order is raised, whatever order the work finished in.

    Headers are read one after the other (nibabel, cheap); the voxel passes of distinct files run
    in a few threads, since zlib and numpy release the GIL while they work.
    """
    infos = [validate_image(path, role, label, check_data=False) for path, role, label in jobs]
    if not check_data:
        return infos
    # One voxel pass per distinct file, from the header facts just read (no nibabel in threads).
    todo = {Path(path): info for (path, _, _), info in zip(jobs, infos, strict=True)}

    def scan(item: tuple[Path, ImageInfo]) -> ImageInfo | _Invalid:
        path, info = item
        if info.stats is not None:
            return info
        try:
            key = _cache_key(path, os.stat(path))
            info = dataclasses.replace(info, stats=_voxel_stats(path, info))
        except (_Invalid, OSError) as exc:
            return exc if isinstance(exc, _Invalid) else _Invalid(f"cannot be read ({exc})")
        _remember(key, info)
        return info

    workers = min(_workers(), len(todo))
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            outcome = dict(zip(todo, pool.map(scan, todo.items()), strict=True))
    else:
        outcome = {path: scan(item) for path, item in zip(todo, todo.items(), strict=True)}
    for i, (path, role, label) in enumerate(jobs):
        result = outcome[Path(path)]
        prefix = f"{label}: {role} {path}" if label else f"{role} {path}"
        if isinstance(result, _Invalid):
            raise AtlasflowError(f"{prefix}: {_one_line(str(result))}")
        problem = _role_problem(result, role, check_data=True)
        if problem:
            raise AtlasflowError(f"{prefix}: {problem}")
        infos[i] = result
    return infos


@contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """nibabel logs (and fixes) odd header fields on stderr; we report them ourselves, in one line."""
    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _header_facts(path: Path, file_size: int) -> ImageInfo:
    try:
        with _quiet_nibabel():
            img = load_header(path)
    except AtlasflowError as exc:
        text = str(exc)
        raise _Invalid(text[len(f"{path}: ") :] if text.startswith(f"{path}: ") else text) from None
    header = img.header
    shape = tuple(int(s) for s in header.get_data_shape())
    if len(shape) < 3:
        raise _Invalid(f"is a {len(shape)}-D image (shape {shape}); expected a 3-D volume")
    if min(shape) <= 0:
        raise _Invalid(f"has a zero or negative dimension (shape {shape})")
    extra = math.prod(shape[3:])
    if extra != 1:
        raise _Invalid(
            f"is {len(shape)}-D with {extra} volumes (shape {shape}); expected one 3-D volume "
            "(a 4th dimension of size 1 is fine)"
        )
    if 1 in shape[:3]:
        raise _Invalid(f"is a single slice (shape {shape[:3]}); expected a 3-D volume")
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "iuf":
        raise _Invalid(
            f"has voxel type {dtype} ({'RGB' if dtype.fields else dtype.kind}); expected real numbers"
        )

    raw_pixdim = _raw_pixdim(path, type(header))
    if not (
        np.all(np.isfinite(raw_pixdim))
        and np.all(raw_pixdim > 0)
        and np.all(raw_pixdim <= MAX_VOXEL_MM)
    ):
        raise _Invalid(
            f"implausible voxel size {_fmt_mm(raw_pixdim)} mm in the header (pixdim); expected each "
            f"size > 0 and <= {MAX_VOXEL_MM:g} mm"
        )
    try:
        space_unit = header.get_xyzt_units()[0]
    except (KeyError, ValueError):
        space_unit = "unknown"
    if space_unit in ("meter", "micron"):
        raise _Invalid(f"spatial units are {space_unit}s; atlasflow expects millimetres")

    affine = np.asarray(img.affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise _Invalid("the voxel-to-world affine (qform/sform) is not finite")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(spacing <= 0) or np.any(spacing > MAX_VOXEL_MM):
        raise _Invalid(
            f"implausible voxel size {_fmt_mm(spacing)} mm in the affine (qform/sform); expected "
            f"each size > 0 and <= {MAX_VOXEL_MM:g} mm"
        )
    # |det| / product of column norms is 1 for orthogonal axes and 0 for a flat (degenerate) grid.
    if abs(np.linalg.det(affine[:3, :3])) < 1e-3 * float(np.prod(spacing)):
        raise _Invalid(
            "the voxel-to-world affine (qform/sform) is degenerate (axes nearly parallel)"
        )

    proxy = img.dataobj  # nibabel has moved scl_slope / scl_inter from the header to here
    if not (np.isfinite(proxy.slope) and np.isfinite(proxy.inter)):
        raise _Invalid(
            f"invalid intensity scaling (scl_slope {proxy.slope}, scl_inter {proxy.inter})"
        )
    need = int(proxy.offset) + math.prod(shape) * dtype.itemsize
    if not path.name.lower().endswith(".gz") and file_size < need:
        raise _Invalid(
            f"is truncated: the header describes {need} bytes (data from byte {int(proxy.offset)}) "
            f"but the file has {file_size}"
        )
    scaling = (float(proxy.slope), float(proxy.inter))
    return ImageInfo(path, tuple(shape[:3]), affine, dtype, header, int(proxy.offset), scaling)


def _raw_pixdim(path: Path, header_class: type) -> np.ndarray:
    """pixdim[1:4] as written: nibabel silently replaces 0 by 1 and negatives by their absolute value."""
    try:
        with nib.openers.ImageOpener(str(path)) as fh:
            raw = fh.read(header_class.template_dtype.itemsize)
        header = header_class(raw, check=False)
        return np.asarray(header["pixdim"][1:4], dtype=float)
    except Exception as exc:  # already parsed once by load_header; this only guards odd files
        raise _Invalid(f"header cannot be read ({type(exc).__name__}: {exc})") from None


def _fmt_mm(values: np.ndarray) -> str:
    return "x".join(f"{float(v):.4g}" for v in values)


# Decompressed bytes handed to numpy per step: bounded memory whatever the image size.
_CHUNK = 1 << 22


def _decompressed_chunks(fh) -> Iterator[bytes]:
    """Stream a (possibly multi-member) gzip file; zlib verifies each member's CRC and length."""
    inflater: Any = zlib.decompressobj(31)
    pending = b""
    while True:
        if inflater is None:  # between gzip members: another member, zero padding, or the end
            if len(pending) < 2:
                more = fh.read(1 << 20)
                if more:
                    pending += more
                    continue
                if pending.strip(b"\x00"):
                    raise _Invalid("unexpected bytes after the end of the gzip stream")
                return
            if pending.startswith(b"\x1f\x8b"):
                inflater = zlib.decompressobj(31)
            elif pending[0] == 0:
                pending = pending.lstrip(b"\x00")
                continue
            else:
                raise _Invalid("unexpected bytes after the end of the gzip stream")
        if not pending:
            pending = fh.read(1 << 20)
            if not pending:
                tail = inflater.flush()
                if tail:
                    yield tail
                if not inflater.eof:
                    raise _Invalid(
                        "is truncated: the gzip stream ends early (incomplete download or copy?)"
                    )
                return
        try:
            out = inflater.decompress(pending, _CHUNK)
        except zlib.error as exc:
            raise _Invalid(f"compressed data are corrupt (zlib: {exc})") from None
        pending = inflater.unconsumed_tail
        if out:
            yield out
        if inflater.eof:
            pending = inflater.unused_data + pending
            inflater = None


def _plain_chunks(fh) -> Iterator[bytes]:
    while block := fh.read(_CHUNK):
        yield block


class _StatsAccumulator:
    """Running min/max/finite/integer/non-zero statistics over chunks of raw voxels.

    Each chunk costs a few vectorised reductions: NaN/Inf show up as a non-finite minimum or
    maximum; integer voxels are reduced as stored and the intensity scaling is applied to the
    results (it is monotonic), so they are converted to floating point only in the rare case
    where a non-integer scaling could still give whole numbers.
    """

    def __init__(self, dtype: np.dtype, slope: float, inter: float):
        self.slope, self.inter = slope, inter
        self.scaled = (slope, inter) != (1.0, 0.0)
        self.stored_integers = dtype.kind in "iu"
        # Scaled integers are whole numbers for sure when slope and intercept are.
        self.check_integers = not self.stored_integers or not (
            slope.is_integer() and inter.is_integer()
        )
        zero = -inter / slope if slope else math.nan
        self.raw_zero = (
            zero if self.stored_integers and self.scaled and float(zero).is_integer() else None
        )
        self.finite = True
        self.integer_valued = True
        self.non_integer_example: float | None = None
        self.minimum = math.inf
        self.maximum = -math.inf
        self.nonzero = 0

    def _scale(self, value: float) -> float:
        return value * self.slope + self.inter if self.scaled else value

    def _note_fraction(self, values: np.ndarray) -> None:
        fractional = values != np.round(values)
        if fractional.any():
            self.integer_valued = False
            self.non_integer_example = float(values[np.argmax(fractional)])

    def add(self, raw: np.ndarray) -> None:
        if self.stored_integers:
            ends = sorted((self._scale(float(raw.min())), self._scale(float(raw.max()))))
            self.minimum, self.maximum = min(self.minimum, ends[0]), max(self.maximum, ends[1])
            if self.integer_valued and self.check_integers:
                self._note_fraction(np.array(ends))
                if self.integer_valued:  # both ends whole: look at every value
                    self._note_fraction(raw.astype(np.float64) * self.slope + self.inter)
            if not self.scaled:
                self.nonzero += int(np.count_nonzero(raw))
            elif self.raw_zero is None:
                self.nonzero += raw.size
            else:
                self.nonzero += raw.size - int(np.count_nonzero(raw == self.raw_zero))
            return
        values = raw.astype(np.float64) * self.slope + self.inter if self.scaled else raw
        low, high = float(values.min()), float(values.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            self.finite = False
            return
        self.minimum, self.maximum = min(self.minimum, low), max(self.maximum, high)
        if self.integer_valued:
            self._note_fraction(values)
        self.nonzero += int(np.count_nonzero(values))

    def result(self) -> VoxelStats:
        limit = float(np.finfo(np.float32).max)
        within = self.finite and max(abs(self.minimum), abs(self.maximum)) <= limit
        return VoxelStats(
            within,
            self.minimum,
            self.maximum,
            self.integer_valued,
            self.non_integer_example,
            self.nonzero,
        )


def _voxel_stats(path: Path, info: ImageInfo) -> VoxelStats:
    """One pass over the voxels, decompressing once; stops early at the first NaN/Inf."""
    slope, inter = info.scaling  # nibabel moves scl_slope/scl_inter from the header to the proxy
    dtype = info.dtype  # carries the header's byte order
    offset = info.data_offset
    itemsize = dtype.itemsize
    need = math.prod(info.shape) * itemsize
    acc = _StatsAccumulator(dtype, slope, inter)
    gz = path.name.lower().endswith(".gz")
    skip, got, carry = offset, 0, b""
    with np.errstate(all="ignore"):
        try:
            with open(path, "rb") as fh:
                for block in _decompressed_chunks(fh) if gz else _plain_chunks(fh):
                    if skip:
                        if len(block) <= skip:
                            skip -= len(block)
                            continue
                        block, skip = block[skip:], 0
                    if got < need:
                        take = block[: need - got]
                        got += len(take)
                        data = carry + take if carry else take
                        whole = len(data) - len(data) % itemsize
                        if whole:
                            acc.add(np.frombuffer(data, dtype=dtype, count=whole // itemsize))
                        carry = data[whole:]
                        if not acc.finite:
                            break  # the error is certain; no need to read further
                    elif not gz:
                        break  # plain file: nothing left to verify
        except OSError as exc:
            raise _Invalid(f"cannot be read ({exc.strerror or exc})") from None
    if acc.finite and got < need:
        raise _Invalid(
            f"is truncated: {got} of the {need} bytes of image data are present "
            "(incomplete download or copy?)"
        )
    return acc.result()


def _role_problem(info: ImageInfo, role: str, check_data: bool) -> str | None:
    """What is wrong with these voxels for this role (None when fine or data were not read)."""
    stats = info.stats
    if not check_data or stats is None:
        return None
    if not stats.finite:
        return "image contains NaN or infinite voxels (or values beyond the float32 range)"
    if role == "t1w":
        if stats.maximum <= stats.minimum:
            return f"image is constant (every voxel is {stats.minimum:g}): nothing to register"
        return None
    if role == "labels":
        if not stats.integer_valued:
            return (
                f"label map has non-integer values (e.g. {stats.non_integer_example:g}); labels must "
                "be whole numbers (was it resampled with linear interpolation?)"
            )
        if stats.minimum < 0:
            return f"label map has negative values (minimum {stats.minimum:g})"
        if stats.nonzero == 0:
            return "label map is empty (every voxel is 0)"
        return None
    # Masks: 0 outside, 1 inside. Anything else (0/255, a BraTS 1/2/4 label map, a probability
    # map) is ambiguous about what counts as inside, so it is rejected rather than guessed.
    what = "tumour mask" if role == "tumor_mask" else "brain mask"
    if not stats.integer_valued:
        return (
            f"{what} is not binary: it has non-integer values (e.g. {stats.non_integer_example:g}); "
            "a mask holds only 0 and 1"
        )
    if stats.minimum < 0 or stats.maximum > 1:
        return (
            f"{what} is not binary: values range from {stats.minimum:g} to {stats.maximum:g}; "
            "a mask holds only 0 and 1"
        )
    if role == "brain_mask" and stats.nonzero == 0:
        return "brain mask is empty (no voxel is 1)"
    return None  # an empty tumour mask means no visible tumour at this session


def grid_mismatch(image: ImageInfo, other: ImageInfo) -> str | None:
    """Why ``other`` does not sample the same voxel centres as ``image`` (None when it does).

    The same grid stored with axes flipped or permuted (RAS vs LPS storage) is the same grid:
    preprocessing reorients both to RAS, so no interpolation happens.
    """
    try:
        to_image = np.linalg.solve(image.affine, other.affine)  # other's voxel -> image's voxel
    except np.linalg.LinAlgError:
        return "its affine cannot be related to the t1w image's"
    linear = to_image[:3, :3]
    perm = np.round(linear)
    is_signed_perm = (
        np.abs(linear - perm).max() <= _GRID_TOLERANCE_VOXELS / max(max(other.shape), 1)
        and np.all(np.abs(perm).sum(axis=0) == 1)
        and np.all(np.abs(perm).sum(axis=1) == 1)
    )
    if is_signed_perm:
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in other.shape], indexing="ij")).reshape(
            3, -1
        )
        mapped = linear @ corners + to_image[:3, 3:4]
        low, high = mapped.min(axis=1), mapped.max(axis=1)
        target = np.array(image.shape) - 1
        if (
            np.abs(low).max() <= _GRID_TOLERANCE_VOXELS
            and np.abs(high - target).max() <= _GRID_TOLERANCE_VOXELS
        ):
            return None
    if sorted(image.shape) != sorted(other.shape):
        return f"not on the grid of the t1w image: shape {other.shape} vs {image.shape}"
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in image.shape], indexing="ij")).reshape(
        3, -1
    )
    corners_h = np.vstack([corners, np.ones((1, corners.shape[1]))])
    distance = np.linalg.norm((other.affine - image.affine)[:3] @ corners_h, axis=0).max()
    return (
        f"not on the grid of the t1w image: same shape, but the voxel-to-world affines differ "
        f"(corner voxels up to {distance:.3g} mm apart)"
    )


# ------------------------------------------------------------------------ cohort validation


def _schema_problem(error) -> str:
    """One readable clause from a jsonschema error, using the column's description from the schema."""
    if not error.path:
        return _one_line(error.message)
    field = error.path[-1]
    value = error.instance
    if value == "":
        return f"{field} is empty"
    description = manifest_schema()["properties"].get(field, {}).get("description", "")
    if error.validator in ("pattern", "format"):
        return f"{field} '{value}' is not valid: expected {_one_line(description)}"
    return f"{field}: {_one_line(error.message)}"


def validate_cohort(
    df: pd.DataFrame,
    source: str | os.PathLike,
    check_data: bool = True,
) -> pd.DataFrame:
    """Check a cohort table (from :func:`load_cohort`) before anything runs; return it sorted.

    Order of checks, cheapest first so that a table-level mistake is reported without reading
    images: columns, each row against the manifest schema, duplicate sessions and T1w files, the
    dates of each subject, then every image (:func:`validate_image`) and that masks and labels
    share the grid of their T1w scan. Raises :class:`AtlasflowError` at the first problem.
    Linear in the number of rows; writes nothing.
    """
    source = Path(source)
    name = source.name
    missing = [c for c in required_columns() if c not in df.columns]
    if missing:
        raise AtlasflowError(
            f"{name}: missing required column(s) {', '.join(repr(c) for c in missing)}"
        )
    if len(df) == 0:
        raise AtlasflowError(f"{name}: the cohort has no rows")
    base = source.resolve().parent if not source.is_dir() else source.resolve()
    table = df.copy()
    if ORIGIN_COLUMN not in table.columns:
        table[ORIGIN_COLUMN] = [f"{name} row {i + 2}" for i in range(len(table))]
    table = _normalise(table, base)
    records = table.to_dict("records")
    labels = [_row_label(r[ORIGIN_COLUMN], r["subject"], r["session"]) for r in records]

    validator = _row_validator()
    required = set(required_columns())
    for record, label in zip(records, labels, strict=True):
        instance = {
            k: v for k, v in record.items() if k != ORIGIN_COLUMN and (v != "" or k in required)
        }
        errors = sorted(validator.iter_errors(instance), key=lambda e: (list(e.path), e.validator))
        if errors:
            raise AtlasflowError(f"{label}: {_schema_problem(errors[0])}")

    first_of_session: dict[tuple[str, str], str] = {}
    first_of_file: dict[str, str] = {}
    for record, label in zip(records, labels, strict=True):
        key = (record["subject"], record["session"])
        if key in first_of_session:
            raise AtlasflowError(
                f"{label}: same subject and session as {first_of_session[key]}; each scan session "
                "must appear once"
            )
        first_of_session[key] = record[ORIGIN_COLUMN]
        t1w = record["t1w"]
        if t1w in first_of_file:
            raise AtlasflowError(f"{label}: t1w {t1w} is also the t1w of {first_of_file[t1w]}")
        first_of_file[t1w] = record[ORIGIN_COLUMN]

    _check_dates(records, labels)

    # Headers first (and grids, which need only headers), then the voxels of every file.
    jobs = [
        (r[role], role, label)
        for r, label in zip(records, labels, strict=True)
        for role in IMAGE_COLUMNS
        if r[role]
    ]
    infos = validate_images(jobs, check_data=False)
    t1w_info: ImageInfo | None = None
    for (path, role, label), info in zip(jobs, infos, strict=True):
        if role == "t1w":
            t1w_info = info
            continue
        assert t1w_info is not None  # every row's t1w job precedes its other images
        problem = grid_mismatch(t1w_info, info)
        if problem:
            raise AtlasflowError(f"{label}: {role} {path} is {problem}")
    if check_data:
        validate_images(jobs, check_data=True)

    order = sorted(
        range(len(records)),
        key=lambda i: (
            _natural_key(records[i]["subject"]),
            records[i]["acq_date"],
            _natural_key(records[i]["session"]),
        ),
    )
    return table.iloc[order].reset_index(drop=True)


def _check_dates(records: list[dict[str, str]], labels: list[str]) -> None:
    """Per subject: dates for all sessions or none, no two sessions on one day, none in the future."""
    today = date.today()
    by_subject: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_subject.setdefault(record["subject"], []).append(i)
        value = record["acq_date"]
        if value and date.fromisoformat(value) > today:
            raise AtlasflowError(f"{labels[i]}: acq_date {value} is in the future")
    for subject, rows in by_subject.items():
        dated = [i for i in rows if records[i]["acq_date"]]
        if dated and len(dated) < len(rows):
            undated = next(i for i in rows if not records[i]["acq_date"])
            raise AtlasflowError(
                f"{labels[undated]}: acq_date is empty, but other sessions of subject {subject} have "
                f"one (e.g. {records[dated[0]][ORIGIN_COLUMN]}); without it this scan cannot be placed "
                "in time - give a date for every session of the subject, or for none (sessions are "
                "then ordered by their labels)"
            )
        seen: dict[str, int] = {}
        for i in dated:
            day = records[i]["acq_date"]
            if day in seen:
                j = seen[day]
                raise AtlasflowError(
                    f"{labels[i]}: acq_date {day} is also the date of session {records[j]['session']} "
                    f"({records[j][ORIGIN_COLUMN]}); two scans of one subject on one day leave their "
                    "order and the growth per day undefined - correct the date or keep one of the two"
                )
            seen[day] = i


# ----------------------------------------------------------------------------- command line


def summarise(table: pd.DataFrame) -> str:
    """A short human summary of a validated cohort table."""
    sessions = table.groupby("subject").size()
    longitudinal = int((sessions > 1).sum())
    parts = [
        f"{len(table)} scan session{'s' if len(table) != 1 else ''} of {len(sessions)} "
        f"subject{'s' if len(sessions) != 1 else ''}",
        f"{longitudinal} with follow-up (up to {int(sessions.max())} sessions)"
        if longitudinal
        else "no follow-up",
    ]
    for col, what in (
        ("labels", "label maps"),
        ("tumor_mask", "tumour masks"),
        ("brain_mask", "brain masks"),
        ("acq_date", "dates"),
    ):
        parts.append(f"{what} {int((table[col] != '').sum())}")
    groups = table.drop_duplicates("subject")["group"]
    groups = groups[groups != ""]
    if len(groups):
        parts.append(
            "groups " + ", ".join(f"{g} {n}" for g, n in groups.value_counts().sort_index().items())
        )
    return "; ".join(parts)


def main_validate(argv: list[str] | None = None) -> int:
    """``atlasflow validate COHORT``: print a summary (exit 0) or one error line (exit 1)."""
    parser = argparse.ArgumentParser(
        prog="atlasflow validate",
        description="Check a cohort manifest CSV or BIDS folder before running the workflow; writes nothing.",
    )
    parser.add_argument("cohort", help="manifest .csv or BIDS folder")
    parser.add_argument(
        "--headers-only",
        action="store_true",
        help="read image headers only (skip the voxel checks: faster, less thorough)",
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="also print the normalised cohort table (CSV) on standard output",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        table = validate_cohort(
            load_cohort(args.cohort), args.cohort, check_data=not args.headers_only
        )
    except AtlasflowError as exc:
        print(f"atlasflow validate: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    checked = "headers" if args.headers_only else "headers and voxels"
    print(f"{args.cohort}: OK - {summarise(table)} ({checked} checked in {seconds:.2f} s)")
    if args.table:
        table.to_csv(sys.stdout, index=False)
    return 0
