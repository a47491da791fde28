"""Cohort validation: every check made on a cohort table before any job runs, and ``atlasflow validate``.

:func:`validate_cohort` checks the table from :func:`atlasflow.cohort.manifest.load_cohort`
against the schema, then the cohort-level rules (duplicate sessions, dates) and finally every image
(:mod:`atlasflow.cohort.images`), and returns the table sorted by subject and time. It writes
nothing. Every problem is one line naming the row (``manifest.csv row 4 (subject 03, session 1)``,
the header being row 1) or the file, and saying what is wrong; all problems of a cohort are raised
together in one :class:`AtlasflowError` (:func:`atlasflow.errors.problems_error`). :func:`add_validate_arguments` and :func:`run_validate` are the ``atlasflow validate``
command (see :mod:`atlasflow.cli.main`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd

from atlasflow.cohort.columns import (
    DEFAULT_REFERENCE,
    IMAGE_COLUMNS,
    ORIGIN_COLUMN,
    fill_mixed_sessions,
    manifest_schema,
    normalise_table,
    required_columns,
    row_validator,
)
from atlasflow.cohort.images import ImageInfo, grid_mismatch, validate_images
from atlasflow.cohort.manifest import choose_reference, load_cohort
from atlasflow.cohort.selection import CHOOSE, BidsOptions, Choice, CohortNotes
from atlasflow.cohort.voxels import SCAN_ROLES as SCAN_COLUMNS
from atlasflow.errors import AtlasflowError, one_line, problems_error
from atlasflow.longitudinal.compartments import TumourLabels


def _natural_key(text: str) -> tuple:
    """'2' sorts before '10'; ties between '01' and '1' are broken by the text itself."""
    parts = re.split(r"(\d+)", text)
    return tuple((0, int(p), p) if p.isdigit() else (1, 0, p) for p in parts if p) + ((2, 0, text),)


def _row_label(origin: str, subject: str, session: str) -> str:
    return (
        f"{origin} (subject {subject or '?'}, {f'session {session}' if session else 'no session'})"
    )


def _schema_problem(error: Any, reference: str = DEFAULT_REFERENCE) -> str:
    """One readable clause from a jsonschema error, using the column's description from the schema."""
    if not error.path:
        return one_line(error.message)
    field = error.path[-1]
    value = error.instance
    if value == "" and field == reference != DEFAULT_REFERENCE:
        return (
            f"{field} is empty, but contrasts.reference is {reference}: every scan session needs "
            f"its {reference} (it anchors the session)"
        )
    if value == "" and field == reference:
        # The T1w anchors the cohort (auto: some session has one): say how to anchor by another.
        return (
            f"{field} is empty, and the T1w anchors every session of this cohort: "
            f"drop the row, or set contrasts.reference to a contrast every session has"
        )
    if value == "":
        return f"{field} is empty"
    description = manifest_schema()["properties"].get(field, {}).get("description", "")
    if error.validator in ("pattern", "format"):
        return f"{field} '{value}' is not valid: expected {one_line(description)}"
    return f"{field}: {one_line(error.message)}"


def validate_cohort(
    df: pd.DataFrame,
    source: str | os.PathLike,
    check_data: bool = True,
    notes: CohortNotes | None = None,
    tumor_labels: TumourLabels | None = None,
    reference: str = DEFAULT_REFERENCE,
) -> pd.DataFrame:
    """Check a cohort table (from :func:`load_cohort`) before anything runs; return it sorted.

    Order of checks, cheapest first: columns, each row against the manifest schema, duplicate
    sessions and files, the dates of each subject, then every image's header
    (:func:`validate_image`), that masks and labels share the grid of their session's reference
    scan (``reference``, config ``contrasts.reference``: the T1w by default, and every row must
    have it; a tumour mask may instead be on another contrast's grid), and every image's voxels. A missing column or an empty table stops at once; every other problem is
    collected (a row's first table-level problem is its only one: its later checks and its images
    are skipped; images are checked file by file) and all are raised together with those discovery
    left in ``notes``: one :class:`AtlasflowError`, one line per problem, a single problem keeping
    its one-line message. ``tumor_labels`` are the compartment labels a tumour mask may hold
    besides 1 (the config's ``longitudinal.tumor_labels``; None: the BraTS default). Linear in the
    number of rows; writes nothing.

    Scans without a session keep session "" (their outputs have no ``ses-`` level) unless other
    scans of the cohort have sessions: then they are given "1"
    (:func:`atlasflow.cohort.columns.fill_mixed_sessions`), their rows listed in
    ``notes.sessions_filled``, before the duplicate check (so "" beside "1" is a duplicate).
    """
    source = Path(source)
    name = source.name
    where = str(source)
    problems: list[str] = list(notes.problems) if notes is not None else []
    missing = [c for c in required_columns(reference) if c not in df.columns]
    if missing:
        problems.append(f"{name}: missing required column(s) {', '.join(repr(c) for c in missing)}")
        raise problems_error(where, problems)
    if len(df) == 0:
        raise problems_error(where, [*problems, f"{name}: the cohort has no rows"])
    base = source.resolve().parent if not source.is_dir() else source.resolve()
    table = df.copy()
    if ORIGIN_COLUMN not in table.columns:
        table[ORIGIN_COLUMN] = [f"{name} row {i + 2}" for i in range(len(table))]
    table = normalise_table(table, base)
    filled = fill_mixed_sessions(table)
    if notes is not None:
        notes.sessions_filled = [table[ORIGIN_COLUMN].iat[i] for i in filled]
    records = table.to_dict("records")
    labels = [_row_label(r[ORIGIN_COLUMN], r["subject"], r["session"]) for r in records]

    # Table-level checks: a row's first problem is its only one (later checks skip it, so that a
    # duplicated row is not also reported for its file and date).
    validator = row_validator(reference)
    required = set(required_columns(reference))
    bad: set[int] = set()

    def problem(i: int, text: str) -> None:
        problems.append(text)
        bad.add(i)

    for i, (record, label) in enumerate(zip(records, labels, strict=True)):
        instance = {
            k: v for k, v in record.items() if k != ORIGIN_COLUMN and (v != "" or k in required)
        }
        errors = sorted(validator.iter_errors(instance), key=lambda e: (list(e.path), e.validator))
        if errors:
            problem(i, f"{label}: {_schema_problem(errors[0], reference)}")

    first_of_session: dict[tuple[str, str], str] = {}
    first_of_file: dict[str, str] = {}
    for i, (record, label) in enumerate(zip(records, labels, strict=True)):
        key = (record["subject"], record["session"])
        if i in bad:
            continue
        if key in first_of_session:
            hint = (
                ""
                if record["session"]
                else " (neither has a session: give each scan of a subject its session label)"
            )
            problem(
                i,
                f"{label}: same subject and session as {first_of_session[key]}{hint}; each scan "
                "session must appear once",
            )
            continue
        first_of_session[key] = record[ORIGIN_COLUMN]
        for role in SCAN_COLUMNS:
            path = record[role]
            if not path:
                continue
            if path in first_of_file:
                problem(i, f"{label}: {role} {path} is also the {first_of_file[path]}")
                break
            first_of_file[path] = f"{role} of {record[ORIGIN_COLUMN]}"

    good = [i for i in range(len(records)) if i not in bad]
    for j, text in _check_dates([records[i] for i in good], [labels[i] for i in good]):
        if good[j] not in bad:
            problem(good[j], text)
    good = [i for i in good if i not in bad]

    # Headers first (and grids, which need only headers), then the voxels of every file.
    jobs = [
        (records[i][role], role, labels[i], i)
        for i in good
        for role in IMAGE_COLUMNS
        if records[i][role]
    ]
    image_jobs = [job[:3] for job in jobs]
    infos = validate_images(image_jobs, check_data=False, problems=problems)
    by_row: dict[int, dict[str, ImageInfo | None]] = {}
    for (_, role, _, row), info in zip(jobs, infos, strict=True):
        by_row.setdefault(row, {})[role] = info
    for (path, role, label, row), info in zip(jobs, infos, strict=True):
        anchor = by_row[row].get(reference)
        if role in SCAN_COLUMNS or info is None or anchor is None:
            continue  # other contrasts have grids of their own: the workflow aligns them
        problem = grid_mismatch(anchor, info, reference)
        if problem and role == "tumor_mask":
            # a lesion or tumour mask drawn on another contrast (a FLAIR) comes with its grid
            others = [c for c in SCAN_COLUMNS if c != reference]
            own = [c for c in others if by_row[row].get(c) is not None]
            if any(grid_mismatch(by_row[row][c], info) is None for c in own):  # type: ignore[arg-type]
                continue
            if own:
                problem += f", and on none of the grids of its {', '.join(own)}"
        if problem:
            problems.append(f"{label}: {role} {path} is {problem}")
    if check_data:
        readable = [job for job, info in zip(image_jobs, infos, strict=True) if info is not None]
        validate_images(readable, check_data=True, problems=problems, tumor_labels=tumor_labels)
    if problems:
        raise problems_error(where, problems)

    order = sorted(
        range(len(records)),
        key=lambda i: (
            _natural_key(records[i]["subject"]),
            records[i]["acq_date"],
            _natural_key(records[i]["session"]),
        ),
    )
    return table.iloc[order].reset_index(drop=True)


def _check_dates(records: list[dict[str, str]], labels: list[str]) -> list[tuple[int, str]]:
    """Per subject: dates for all sessions or none, no two sessions on one day, none in the future.

    Returns (record index, problem) pairs."""
    problems: list[tuple[int, str]] = []
    today = date.today()
    by_subject: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_subject.setdefault(record["subject"], []).append(i)
        value = record["acq_date"]
        if value and date.fromisoformat(value) > today:
            problems.append((i, f"{labels[i]}: acq_date {value} is in the future"))
    for subject, rows in by_subject.items():
        dated = [i for i in rows if records[i]["acq_date"]]
        if dated and len(dated) < len(rows):
            undated = next(i for i in rows if not records[i]["acq_date"])
            problems.append(
                (
                    undated,
                    f"{labels[undated]}: acq_date is empty, but other sessions of subject {subject} "
                    f"have one (e.g. {records[dated[0]][ORIGIN_COLUMN]}); without it this scan cannot "
                    "be placed in time - give a date for every session of the subject, or for none "
                    "(sessions are then ordered by their labels)",
                )
            )
        seen: dict[str, int] = {}
        for i in dated:
            day = records[i]["acq_date"]
            if day in seen:
                j = seen[day]
                problems.append(
                    (
                        i,
                        f"{labels[i]}: acq_date {day} is also the date of session "
                        f"{records[j]['session']} ({records[j][ORIGIN_COLUMN]}); two scans of one "
                        "subject on one day leave their order and the growth per day undefined - "
                        "correct the date or keep one of the two",
                    )
                )
            else:
                seen[day] = i
    return problems


def summarise(table: pd.DataFrame, reference: str = DEFAULT_REFERENCE) -> str:
    """A short human summary of a validated cohort table (its sessions anchored by ``reference``)."""
    sessions = table.groupby("subject").size()
    longitudinal = int((sessions > 1).sum())
    parts = [
        f"{len(table)} scan session{'s' if len(table) != 1 else ''} of {len(sessions)} "
        f"subject{'s' if len(sessions) != 1 else ''}",
        f"{longitudinal} with follow-up (up to {int(sessions.max())} sessions)"
        if longitudinal
        else "no follow-up",
    ]
    if not (table["session"] != "").any():
        parts.append("no sessions (outputs without a ses- level)")
    for col, what in (
        ("labels", "label maps"),
        ("tumor_mask", "tumour masks"),
        ("brain_mask", "brain masks"),
        ("acq_date", "dates"),
    ):
        parts.append(f"{what} {int((table[col] != '').sum())}")
    if reference != DEFAULT_REFERENCE:
        parts.append(f"reference {reference}")
    others = [c for c in SCAN_COLUMNS if c != reference]
    contrasts = [(c, int((table[c] != "").sum())) for c in others if c in table]
    if any(n for _, n in contrasts):
        parts.append("other contrasts " + ", ".join(f"{c} {n}" for c, n in contrasts if n))
    groups = table.drop_duplicates("subject")["group"]
    groups = groups[groups != ""]
    if len(groups):
        parts.append(
            "groups " + ", ".join(f"{g} {n}" for g, n in groups.value_counts().sort_index().items())
        )
    return "; ".join(parts)


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``atlasflow validate COHORT``."""
    parser.description = (
        "Check a cohort manifest CSV or BIDS folder before running the workflow; writes nothing."
    )
    parser.add_argument("cohort", help="manifest .csv or BIDS folder")
    parser.add_argument(
        "--headers-only",
        action="store_true",
        help="read image headers only (skip the voxel checks: faster, less thorough)",
    )
    parser.add_argument(
        "--tumor-labels",
        nargs="*",
        metavar="NAME=LABEL[,LABEL]",
        help="tumour-mask compartments as in the config's longitudinal.tumor_labels "
        "(default: necrosis=1 oedema=2 enhancing=3,4; none given: binary 0/1 masks only)",
    )
    parser.add_argument(
        "--reference",
        choices=[*SCAN_COLUMNS, "auto"],
        default=None,
        help="the column that anchors every session, as the config's contrasts.reference "
        "(default: the --configfile's, else auto: t1w, or when no session has a T1w the "
        "contrast most sessions have, t1ce first); every row must have it, label maps and brain "
        "masks must be on its grid",
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="print the normalised cohort table on standard output as a manifest CSV that "
        "atlasflow accepts as it is (the summary then goes to standard error)",
    )
    bids = parser.add_argument_group(
        "BIDS folders", "which file a session's role takes among several (config bids:)"
    )
    bids.add_argument(
        "--configfile",
        default=None,
        help="read the bids: section of this workflow config (the flags below override it)",
    )
    bids.add_argument(
        "--prefer",
        default=None,
        metavar="ENTITY-VALUE[,...]",
        help="entity-value pairs preferred in this order (default: rec-norm,part-mag; '' = none)",
    )
    bids.add_argument(
        "--choose",
        choices=CHOOSE,
        default=None,
        help="among runs left tied: last-run (default), first-run, or error (refuse to choose)",
    )
    bids.add_argument(
        "--derivatives",
        default=None,
        metavar="PIPELINE[,...]",
        help="derivatives/ pipelines read for label maps and masks, in precedence order "
        "(default: all, in name order; 'none' = none)",
    )
    bids.add_argument(
        "--derivatives-first",
        action="store_true",
        default=None,
        help="a derivatives/ file wins over one in raw anat/ (default: raw anat/ wins)",
    )


def bids_options(args: argparse.Namespace) -> BidsOptions:
    """The :class:`BidsOptions` of ``atlasflow validate``'s flags (over ``--configfile``'s)."""
    config: dict = {}
    if args.configfile:
        import yaml

        try:
            with open(args.configfile, encoding="utf-8") as fh:
                config = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise AtlasflowError(f"{args.configfile}: cannot be read as YAML ({exc})") from None
    section = dict(config.get("bids") or {}) if isinstance(config, dict) else {}
    if args.prefer is not None:
        section["prefer"] = [p.strip() for p in args.prefer.split(",") if p.strip()]
    if args.choose is not None:
        section["choose"] = args.choose
    if args.derivatives is not None:
        names = [p.strip() for p in args.derivatives.split(",") if p.strip()]
        section["derivatives"] = [] if names == ["none"] else names
    if args.derivatives_first:
        section["derivatives_first"] = True
    return BidsOptions.from_config({"bids": section})


def _config_reference(configfile: str | None) -> str:
    """``contrasts.reference`` of a workflow config file (the default: auto)."""
    if not configfile:
        return "auto"
    import yaml

    try:
        with open(configfile, encoding="utf-8") as fh:
            config = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise AtlasflowError(f"{configfile}: cannot be read as YAML ({exc})") from None
    contrasts = config.get("contrasts") if isinstance(config, dict) else None
    return (contrasts or {}).get("reference") or "auto"


#: Skipped inputs (and choices) listed one per line by ``atlasflow validate``; the rest are counted.
MAX_SKIPPED_LINES = 50


def skipped_lines(skipped: list[tuple[str, str]], source: str | os.PathLike) -> list[str]:
    """The warning lines of ``atlasflow validate`` for inputs that were skipped, capped."""
    lines = [
        f"atlasflow validate: warning: skipped {os.path.join(str(source), path)}: {reason}"
        for path, reason in skipped[:MAX_SKIPPED_LINES]
    ]
    if len(skipped) > MAX_SKIPPED_LINES:
        lines.append(
            f"atlasflow validate: warning: ... and {len(skipped) - MAX_SKIPPED_LINES} more skipped"
        )
    return lines


def choice_lines(choices: list[Choice]) -> list[str]:
    """The note lines of ``atlasflow validate`` for files taken among several, capped."""
    lines = [f"atlasflow validate: note: {c.line()}" for c in choices[:MAX_SKIPPED_LINES]]
    if len(choices) > MAX_SKIPPED_LINES:
        lines.append(
            f"atlasflow validate: note: ... and {len(choices) - MAX_SKIPPED_LINES} more choices"
        )
    return lines


def run_validate(args: argparse.Namespace) -> int:
    """``atlasflow validate COHORT``: print a summary (exit 0); problems raise AtlasflowError.

    The summary goes to standard output, or to standard error under ``--table``, whose standard
    output is the manifest CSV alone (without the ``origin`` column, which a manifest may not
    have). For a BIDS folder, the files taken among several (notes) and the inputs that were
    skipped (warnings) follow on standard error.
    """
    start = time.perf_counter()
    notes = CohortNotes()
    reference, why = choose_reference(args.cohort, args.reference or _config_reference(args.configfile))
    if why:
        print(f"atlasflow validate: note: {why}", file=sys.stderr)
    options = replace(bids_options(args), reference=reference)
    table = load_cohort(args.cohort, notes, options, reference)
    table = validate_cohort(
        table,
        args.cohort,
        check_data=not args.headers_only,
        notes=notes,
        tumor_labels=TumourLabels.parse(args.tumor_labels),
        reference=reference,
    )
    seconds = time.perf_counter() - start
    checked = "headers" if args.headers_only else "headers and voxels"
    chosen = (
        f"; {len(notes.choices)} file{'s' if len(notes.choices) != 1 else ''} taken among several"
        if notes.choices
        else ""
    )
    filled = f"; {notes.sessions_filled_line()}" if notes.sessions_filled else ""
    print(
        f"{args.cohort}: OK - {summarise(table, reference)}{filled}{chosen} ({checked} checked in "
        f"{seconds:.2f} s)",
        file=sys.stderr if args.table else sys.stdout,
    )
    if notes.choices or notes.skipped:
        sys.stdout.flush()
        lines = choice_lines(notes.choices) + skipped_lines(notes.skipped, args.cohort)
        print("\n".join(lines), file=sys.stderr)
    if args.table:
        table.drop(columns=[ORIGIN_COLUMN]).to_csv(sys.stdout, index=False)
    return 0
