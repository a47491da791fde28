"""What a report reads: the workflow outputs it depends on, and readers for its tables and logs.

:func:`subject_report_inputs` and :func:`cohort_report_inputs` are the report rules' inputs (the
workflow imports them when it plans, so this module stays light: standard library,
:mod:`atlasflow.layout` and the torch-free :mod:`atlasflow.contrasts.plan`). The readers never raise on a file the workflow may have left half-done,
except :func:`read_tumor_table`, whose error names the file.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from atlasflow.contrasts.plan import ContrastFiles
from atlasflow.errors import AtlasflowError
from atlasflow.layout import DEFAULT_REFERENCE, CohortFiles, atlas_contrast, session_entity

ERROR_PREFIX = "atlasflow: error:"

# ------------------------------------------------------------------------- rule inputs


def subject_report_inputs(
    outdir: str | Path,
    subject: str,
    sessions: Sequence[str],
    *,
    baseline: str | None = None,
    longitudinal: bool | None = None,
    labels: Collection[str] = (),
    tumour: Collection[str] = (),
    contrasts: Mapping[str, Collection[str]] | None = None,
    reference: str = DEFAULT_REFERENCE,
) -> list[str]:
    """Every workflow output a subject's report reads: the report rule's inputs, so that a change to
    any of them (and only them) reruns the report.

    ``sessions`` in acquisition order; ``labels`` and ``tumour``: the sessions for which the
    manifest gives a label map / a tumour mask; ``contrasts``: session -> the other contrasts the
    workflow processes for it (cohort columns such as ``flair``). A follow-up's contrast in
    baseline space and its difference map are included where the baseline has that contrast too.
    The raw inputs (manifest paths) are not included. ``reference``: the session's reference
    contrast (config ``contrasts.reference``), whose files are the scan's own.
    """
    outdir = Path(outdir)
    files = CohortFiles(outdir, reference)
    contrasts = contrasts or {}
    cfiles = ContrastFiles(str(outdir), reference=reference)
    longitudinal = len(sessions) > 1 if longitudinal is None else longitudinal
    baseline = baseline or (sessions[0] if sessions else None)
    paths: list[Path] = [files.template, files.atlas]
    if labels:
        paths.append(files.atlas_dseg)
    if longitudinal:
        paths.append(files.tumor_table(subject))
    for session in sessions:
        scan = files.scan(subject, session)
        paths += [scan.preproc, scan.brain_mask]
        for stage in ("template", "atlas"):
            paths += [scan.warped(stage), scan.warp(stage), scan.qc_json(stage)]
        if session in labels:
            paths.append(scan.atlas_dseg)
        if longitudinal and session == baseline and session in tumour:
            paths.append(scan.tumor_mask)
        if longitudinal and session != baseline:
            paths += [
                scan.qc_json("baseline"),
                scan.warped("baseline"),
                scan.log_jacobian,
                scan.difference,
                scan.displacement,
            ]
            if session in tumour:
                paths.append(scan.tumor_in_baseline)
        for c in contrasts.get(session, ()):
            paths += [
                cfiles.native(c, subject, session),
                cfiles.preproc(c, subject, session),
                cfiles.session_qc(c, subject, session),
                cfiles.in_space(c, "template", subject, session),
                cfiles.in_space(c, "atlas", subject, session),
            ]
            if longitudinal and session != baseline and c in contrasts.get(baseline or "", ()):
                paths += [
                    cfiles.in_space(c, "baseline", subject, session),
                    cfiles.difference(c, "baseline", subject, session),
                ]
    return [str(p) for p in paths]


def cohort_report_inputs(
    outdir: str | Path,
    iterations: int,
    *,
    tumour: bool = False,
    contrasts: Collection[str] = (),
    reference: str = DEFAULT_REFERENCE,
) -> list[str]:
    """The cohort-wide outputs the cohort report reads (besides the subjects' ``sub-S_qc.json``);
    ``contrasts``: the cohort columns whose per-contrast atlas (``atlas/atlas_<C>``) it shows;
    ``reference``: the contrast of the atlas iterations."""
    files = CohortFiles(Path(outdir), reference)
    paths = [files.iteration(i) for i in range(iterations + 1)] + [files.metrics]
    if tumour:
        paths.append(files.tumor_frequency)
    paths += [Path(atlas_contrast(outdir, c)) for c in contrasts]
    return [str(p) for p in paths]


# ------------------------------------------------------------------------------- values


def strip_prefix(name: str, prefix: str) -> str:
    """A label given with or without its BIDS prefix: ``strip_prefix("sub-01", "sub-") == "01"``."""
    name = str(name).strip()
    return name[len(prefix) :] if name.startswith(prefix) else name


def session_prefix(session: str, sep: str = " ") -> str:
    """``ses-T`` and ``sep``, put before a label of one of a scan's files or checks ("" for a scan
    without a session: its labels carry no ``ses-``, as its files)."""
    return f"{session_entity(session)}{sep}" if session else ""


def session_name(session: str) -> str:
    """A scan's section of the subject page (heading, link, anchor): ``ses-T``, or ``scan`` for a
    subject's one scan without a session."""
    return session_entity(session) or "scan"


def relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when under it (how the pages name files), else as given."""
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)


def as_number(value: object) -> float | None:
    """A float from a JSON or table value; None for anything else (booleans included)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------- tables


#: Columns of the tumour table that hold text; the others are numbers.
TEXT_COLUMNS = ("session", "acq_date", "response", "response_compartment", "jacobian_mask_flag")


def read_tumor_table(path: Path) -> list[dict]:
    """Rows of ``sub-S_tumor.tsv`` (numbers as floats, 'n/a' and blanks as None)."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise AtlasflowError(f"{path}: not a readable table ({exc})") from None
    if rows and not {"session", "volume_mm3"} <= set(rows[0]):
        raise AtlasflowError(f"{path}: needs columns session and volume_mm3, has {sorted(rows[0])}")
    out = []
    for row in rows:
        clean = {}
        for key, value in row.items():
            if key in TEXT_COLUMNS:
                clean[key] = (
                    strip_prefix(value or "", "ses-") if key == "session" else (value or "")
                )
            else:
                number = as_number(value) if value not in (None, "", "n/a", "NA") else None
                clean[key] = (
                    number
                    if number is None or math.isfinite(number) or key == "doubling_time_days"
                    else None
                )
        out.append(clean)
    return out


def read_metrics(path: Path) -> list[dict]:
    """Rows of the atlas metrics.tsv (numbers as floats) by iteration; [] when absent or unreadable."""
    if not path.exists():
        return []
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
    out = [{k: as_number(v) for k, v in r.items()} for r in rows]
    return sorted((r for r in out if r.get("iteration") is not None), key=lambda r: r["iteration"])


def read_skipped_inputs(path: Path) -> list[dict[str, str]]:
    """Rows (path, status, reason) of ``provenance/skipped_inputs.tsv``; [] when absent or unreadable."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
    return [
        {k: (r.get(k) or "") for k in ("path", "status", "reason")} for r in rows if r.get("path")
    ]


def failed_member(table: Path, member: str) -> str | None:
    """The reason a member's registration failed in an atlas iteration (None: it did not)."""
    import pandas as pd

    try:
        rows = pd.read_csv(table, sep="\t", dtype=str).fillna("")
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None
    hit = (
        rows[(rows.get("member") == member) & (rows.get("status") == "failed")]
        if "member" in rows
        else rows[:0]
    )
    return str(hit.iloc[0].get("reason", "")) if len(hit) else None


# --------------------------------------------------------------------------------- logs


def last_error_line(log: Path) -> str | None:
    """The last non-empty line of a log that starts with 'atlasflow: error:' (None if none)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.strip().startswith(ERROR_PREFIX):
            return line.strip()[len(ERROR_PREFIX) :].strip()
    return None


def logged_errors(logs: Path, name_prefixes: Sequence[str]) -> list[dict]:
    """Error lines of the logs named ``<prefix>.log`` / ``<prefix>_*.log`` anywhere under ``logs``."""
    found = []
    if not logs.is_dir():
        return found
    for log in sorted(logs.rglob("*.log")):
        stem = log.name[: -len(".log")]
        if not any(stem == p or stem.startswith(p + "_") for p in name_prefixes):
            continue
        message = last_error_line(log)
        if message:
            rule = str(log.parent.relative_to(logs)) if log.parent != logs else log.stem
            found.append(
                {"rule": rule, "log": str(log.relative_to(logs.parent)), "message": message}
            )
    return found


def cohort_errors(outdir: Path) -> list[dict]:
    """Errors in the cohort-wide logs (not per subject): template, atlas iterations, final atlas."""
    logs = CohortFiles(outdir).logs
    if not logs.is_dir():
        return []
    found = []
    for log in sorted(logs.rglob("*.log")):
        if log.name.startswith("sub-"):
            continue
        message = last_error_line(log)
        if message:
            found.append({"log": str(log.relative_to(outdir)), "message": message})
    return found
