"""The cohort table's columns and its normal form: the one place the column list is read from.

The column names, which are required and the rules for their values live in the manifest schema
(``workflow/schemas/manifest.schema.yaml``, packaged as ``atlasflow/data``); this module reads it
and spells the two things the code adds to it: the image columns and the role each plays
(:data:`IMAGE_COLUMNS`) and the :data:`ORIGIN_COLUMN` that says where a row came from.
:func:`normalise_table` gives a table read from a manifest CSV or a BIDS folder its normal form.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from atlasflow.errors import AtlasflowError

_SCHEMA_NAME = "manifest.schema.yaml"

#: Scans of a session beside its T1w, each on its own grid: the workflow aligns them to the
#: session's reference (the T1w by default). Their output names are in
#: :data:`atlasflow.layout.CONTRASTS`.
CONTRAST_COLUMNS = ("t2w", "flair", "t1ce", "pdw")
#: Every scan column: one of them is the session's reference (config ``contrasts.reference``).
SCAN_COLUMNS = ("t1w", *CONTRAST_COLUMNS)
#: The reference unless the config says otherwise (the schema's required ``t1w`` stands for it).
DEFAULT_REFERENCE = "t1w"
#: ``contrasts.reference: auto`` (the default) when no session has a T1w: the contrast most sessions
#: have, ties going to the first here. A post-contrast T1w looks like the T1w template (registered
#: to it as one contrast); the others go the engine's contrast-independent way.
AUTO_ORDER = ("t1ce", "flair", "t2w", "pdw")


def auto_reference(sessions: list[set[str]]) -> str:
    """The reference ``contrasts.reference: auto`` means for sessions holding these scan columns:
    the T1w when any session has one (or none has any scan), else the one of :data:`AUTO_ORDER`
    that most sessions have."""
    counts = {c: sum(c in roles for roles in sessions) for c in SCAN_COLUMNS}
    if counts[DEFAULT_REFERENCE] or not any(counts.values()):
        return DEFAULT_REFERENCE
    return max(AUTO_ORDER, key=lambda c: (counts[c], -AUTO_ORDER.index(c)))


#: Columns whose images are on the reference scan's grid (label map and masks; the T1w's by
#: default; a tumour mask may also be on another contrast's).
T1W_GRID_COLUMNS = ("labels", "tumor_mask", "brain_mask")
#: Image columns and the role each plays; the checks per role are in :mod:`atlasflow.cohort.voxels`.
IMAGE_COLUMNS = ("t1w", *T1W_GRID_COLUMNS, *CONTRAST_COLUMNS)
#: Column added by :func:`atlasflow.cohort.manifest.load_cohort`: where the row came from
#: (manifest row or BIDS file).
ORIGIN_COLUMN = "origin"


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


@lru_cache(maxsize=8)
def row_validator(reference: str = DEFAULT_REFERENCE) -> Any:
    """A jsonschema validator of one manifest row whose session is anchored by the ``reference``
    column (:func:`required_columns`; built once per reference, jsonschema imported on first use)."""
    import jsonschema

    schema = {**manifest_schema(), "required": list(required_columns(reference))}
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def known_columns() -> tuple[str, ...]:
    """Every column the schema describes, in its order."""
    return tuple(manifest_schema()["properties"])


def required_columns(reference: str = DEFAULT_REFERENCE) -> tuple[str, ...]:
    """The columns a manifest's header must have when the sessions are anchored by the
    ``reference`` column (config ``contrasts.reference``): the schema's, whose ``t1w`` (the
    default reference) stands for the reference."""
    if reference not in SCAN_COLUMNS:
        raise AtlasflowError(
            f"contrasts.reference {reference!r} is not a scan column; choose one of "
            f"{', '.join(SCAN_COLUMNS)}"
        )
    return tuple(reference if c == DEFAULT_REFERENCE else c for c in manifest_schema()["required"])


def optional_columns() -> tuple[str, ...]:
    """The described columns a manifest may leave out (empty when absent), in the schema's order."""
    required = required_columns()
    return tuple(c for c in known_columns() if c not in required)


def strip_prefix(value: str, prefix: str) -> str:
    """``value`` without a leading ``prefix`` (BIDS's ``sub-`` / ``ses-``)."""
    return value[len(prefix) :] if value.startswith(prefix) else value


#: The session given to the scans without one in a cohort whose other scans have sessions
#: (:func:`fill_mixed_sessions`).
MIXED_COHORT_SESSION = "1"


def normalise_table(table: pd.DataFrame, base: Path) -> pd.DataFrame:
    """String ids without BIDS prefixes, absolute paths, "" when absent (a scan without a session
    keeps session "": see :func:`fill_mixed_sessions` for a cohort that mixes the two)."""
    table = table.copy()
    for col in known_columns():
        if col not in table.columns:
            table[col] = ""
    for col in table.columns:
        table[col] = [
            ("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip())
            for v in table[col]
        ]
    table["subject"] = [strip_prefix(v, "sub-") for v in table["subject"]]
    table["session"] = [strip_prefix(v, "ses-") for v in table["session"]]
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


def fill_mixed_sessions(table: pd.DataFrame) -> list[int]:
    """Give the scans without a session :data:`MIXED_COHORT_SESSION` when other scans of the
    cohort have one; return the positions of the rows filled (none: the cohort is all of one kind).

    A cohort whose scans have no sessions keeps them so, and its outputs have no ``ses-`` level
    (:mod:`atlasflow.layout`). One that mixes the two is written with sessions throughout: the
    workflow's rules name a scan's files either with a session or without, for the whole cohort.
    """
    empty = [i for i, v in enumerate(table["session"]) if v == ""]
    if not empty or len(empty) == len(table):
        return []
    column = table.columns.get_loc("session")
    for i in empty:
        table.iat[i, column] = MIXED_COHORT_SESSION
    return empty
