"""What goes wrong, told to the user: the one exception type and failed-scan records.

:class:`AtlasflowError` is the only exception users are meant to meet: its message names the file or
row and the problem, and the command line prints it as one line without a traceback.

Failed-scan records: how one broken scan is skipped instead of stopping the cohort.

Snakemake runs a cohort-wide rule (atlas average, label vote, tumour frequency) only when every one
of its inputs exists, and it has no optional outputs; so with ``--keep-going`` alone, one scan that
fails in a job would leave the atlas unbuilt. Under the config setting ``on_scan_error: skip`` a
per-scan command that meets an error instead writes a *failure record* (a small JSON naming the
step and the reason) in place of each of its outputs and exits 0. Per-scan commands given a record
as input pass it on; cohort-wide commands leave that scan out (:func:`keep_successful`) and stop
with a clear error when fewer than the required number remain.

A record can never be taken for data: it is not NIfTI, :func:`atlasflow.io.images.load_image` rejects it
with a message naming the failed step, and :func:`failure_record` recognises it by its first bytes.
Reports list the scan as failed with that reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from atlasflow.io.atomic import atomic_write_text


class AtlasflowError(Exception):
    """A problem with the user's inputs or configuration, reported as one line without a traceback."""


def one_line(text: str) -> str:
    """A message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(text).split())


#: Problems of a :class:`CohortProblems` listed one per line; the rest are counted.
MAX_PROBLEM_LINES = 20


class CohortProblems(AtlasflowError):
    """Several problems found in one pass over a cohort (one line each), raised together so that
    a user fixes them all before the next run. Its message is a heading line, then the problems
    (at most :data:`MAX_PROBLEM_LINES`, then "... and N more"), one per line."""

    def __init__(self, where: str, problems: Sequence[str]) -> None:
        self.problems = [one_line(p) for p in problems]
        shown = self.problems[:MAX_PROBLEM_LINES]
        more = len(self.problems) - len(shown)
        self.lines = [f"{where}: {len(self.problems)} problems", *shown]
        if more:
            self.lines.append(f"... and {more} more")
        super().__init__("\n".join(self.lines))


def problems_error(where: str, problems: Sequence[str]) -> AtlasflowError:
    """One error for ``problems`` (non-empty): the problem itself when there is one, as always;
    else a :class:`CohortProblems` listing them."""
    if len(problems) == 1:
        return AtlasflowError(problems[0])
    return CohortProblems(where, problems)


def error_lines(exc: AtlasflowError) -> list[str]:
    """The lines the command line prints for ``exc``: one, or a heading and one per problem."""
    if isinstance(exc, CohortProblems):
        return list(exc.lines)
    return [one_line(str(exc))]


MARKER_KEY = "atlasflow_failed_scan"
_HEAD = ('{"' + MARKER_KEY + '"').encode()
ON_ERROR_ENV = "ATLASFLOW_ON_SCAN_ERROR"
MODES = ("fail", "skip")


def set_policy(mode: str) -> None:
    """Make ``mode`` the default of every ``atlasflow`` command started from this process."""
    if mode not in MODES:
        raise AtlasflowError(f"on_scan_error must be one of {', '.join(MODES)}, not {mode!r}")
    os.environ[ON_ERROR_ENV] = mode


def on_error_default() -> str:
    """The mode set by the workflow (environment), else ``fail``."""
    mode = os.environ.get(ON_ERROR_ENV, "fail")
    return mode if mode in MODES else "fail"


def failure_record(path: str | os.PathLike) -> dict | None:
    """The failure record stored at ``path``, or None when it holds anything else (or nothing)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(len(_HEAD)) != _HEAD:
                return None
            fh.seek(0)
            record = json.loads(fh.read(1 << 20))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get(MARKER_KEY) is True else None


def describe(record: dict) -> str:
    """One line: which step failed and why."""
    return f"{record.get('step', '?')} failed: {record.get('reason', 'no reason recorded')}"


def write_failure(
    outputs: Iterable[str | os.PathLike], step: str, reason: str, source: str = ""
) -> list[Path]:
    """Write the failure record (atomically) at every output path; returns the paths written."""
    record = {MARKER_KEY: True, "step": step, "reason": reason}
    if source:
        record["source"] = source
    text = json.dumps(record) + "\n"
    return [atomic_write_text(path, text) for path in outputs]


def first_failed_input(paths: Iterable[str | os.PathLike]) -> tuple[str, dict] | None:
    """The first of ``paths`` that holds a failure record, with the record."""
    for path in paths:
        if os.path.isfile(path):
            record = failure_record(path)
            if record is not None:
                return str(path), record
    return None


def keep_successful(
    columns: Sequence[Sequence[str | os.PathLike]], minimum: int, what: str, setting: str = ""
) -> tuple[list[list[str]], list[str]]:
    """Drop the members (rows across the aligned ``columns``) whose files are failure records.

    Returns the kept columns and one line per dropped member. Raises AtlasflowError when fewer than
    ``minimum`` members remain, naming every failed one.
    """
    lengths = {len(c) for c in columns}
    if len(lengths) > 1:
        raise AtlasflowError(f"{what}: input lists differ in length {sorted(lengths)}")
    kept: list[list[str]] = [[] for _ in columns]
    dropped: list[str] = []
    for member in zip(*columns, strict=True):
        failed = first_failed_input(member)
        if failed is None:
            for column, path in zip(kept, member, strict=True):
                column.append(str(path))
        else:
            dropped.append(f"{failed[0]}: {describe(failed[1])}")
    succeeded = len(kept[0]) if kept else 0
    if succeeded < minimum:
        detail = "; ".join(dropped) if dropped else "none"
        where = f" ({setting})" if setting else ""
        raise AtlasflowError(
            f"{what}: {succeeded} of {succeeded + len(dropped)} scans succeeded, at least {minimum} "
            f"needed{where}; failed: {detail}"
        )
    return kept, dropped
