"""The ``atlasflow report`` command: one subject's page or the cohort page.

:func:`add_report_arguments` declares its sub-commands (``subject``, ``cohort``) and their flags,
:func:`run_report` writes the page (see :mod:`atlasflow.cli.main`).

The names importers used before the reports package was split (see its docstring for the map)
stay importable from here.
"""

from __future__ import annotations

import argparse

from atlasflow.cohort.columns import DEFAULT_REFERENCE, SCAN_COLUMNS
from atlasflow.errors import AtlasflowError
from atlasflow.layout import Scan
from atlasflow.registration.options import add_qc_arguments
from atlasflow.registration.qc import QCThresholds
from atlasflow.reports.cohort import write_cohort_report
from atlasflow.reports.inputs import (
    cohort_report_inputs,
    last_error_line,
    read_tumor_table,
    strip_prefix,
    subject_report_inputs,
)
from atlasflow.reports.panels import jacobian_on_views
from atlasflow.reports.qc import STATUS_RANK, cohort_verdicts, subject_qc
from atlasflow.reports.subject import write_subject_report

__all__ = [
    "QCThresholds",
    "Scan",
    "add_report_arguments",
    "cohort_report_inputs",
    "cohort_verdicts",
    "jacobian_on_views",
    "last_error_line",
    "read_tumor_table",
    "run_report",
    "subject_qc",
    "subject_report_inputs",
    "write_cohort_report",
    "write_subject_report",
]


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``subject`` and ``cohort`` sub-commands of ``atlasflow report`` and their flags."""
    parser.description = (
        "``atlasflow report subject|cohort ...``: write one subject's report or the cohort report."
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("subject", help="one subject's report (sub-S.html + sub-S_qc.json)")
    p.add_argument("--outdir", required=True, help="the workflow's output folder")
    p.add_argument("--subject", required=True)
    p.add_argument(
        "--sessions",
        nargs="+",
        required=True,
        help="in acquisition order (first = baseline); '' for a scan without a session",
    )
    p.add_argument("--baseline", default=None)
    p.add_argument(
        "--raw",
        nargs="*",
        default=[],
        metavar="SESSION=PATH",
        help="the manifest's reference scan (the T1w by default) per session (=PATH without a session)",
    )
    p.add_argument(
        "--reference",
        choices=SCAN_COLUMNS,
        default=DEFAULT_REFERENCE,
        help="the sessions' reference contrast (config contrasts.reference)",
    )
    p.add_argument(
        "--contrasts",
        nargs="*",
        default=None,
        metavar="SESSION=C1,C2",
        help=f"the other contrasts of each session ({', '.join(SCAN_COLUMNS)}); "
        "default: those whose alignment left a file or a log",
    )
    p.add_argument(
        "--cross-sectional",
        action="store_true",
        help="no longitudinal part even with several sessions",
    )
    p.add_argument("--out", required=True, help="HTML page to write")
    p.add_argument("--qc-json", default=None, help="default: sub-S_qc.json next to the page")
    p.add_argument("--figures-dir", default=None, help="also write the figures here as PNGs")
    p.add_argument(
        "--no-viewer",
        action="store_true",
        help="leave out the interactive viewer (its embedded volumes): static figures only",
    )
    add_qc_arguments(p)
    p = sub.add_parser("cohort", help="the cohort report (cohort.html)")
    p.add_argument("--outdir", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--subjects", nargs="+", help="subject labels (sessions discovered)")
    group.add_argument(
        "--scans",
        nargs="+",
        metavar="SUBJECT:SESSION",
        help="every scan of the cohort (SUBJECT: for a scan without a session)",
    )
    p.add_argument("--iterations", type=int, default=None, help="configured atlas iterations")
    p.add_argument(
        "--reference",
        choices=SCAN_COLUMNS,
        default=DEFAULT_REFERENCE,
        help="the sessions' reference contrast, that of the atlas (config contrasts.reference)",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--figures-dir", default=None)
    add_qc_arguments(p)


def parse_contrasts(items: list[str]) -> dict[str, list[str]]:
    """``["1=t2w,flair", "2=flair"]`` -> ``{"1": ["t2w", "flair"], "2": ["flair"]}`` (``=flair``:
    the contrasts of a scan without a session, ``{"": ["flair"]}``)."""
    found: dict[str, list[str]] = {}
    for item in items:
        session, sep, names = item.partition("=")
        columns = [c.strip().lower() for c in names.split(",") if c.strip()]
        unknown = [c for c in columns if c not in SCAN_COLUMNS]
        if not sep or unknown:
            raise AtlasflowError(
                f"--contrasts {item!r}: expected SESSION=C1,C2 with contrasts among "
                f"{', '.join(SCAN_COLUMNS)}"
            )
        found.setdefault(strip_prefix(session, "ses-"), []).extend(columns)
    return found


def run_report(args: argparse.Namespace) -> int:
    """``atlasflow report subject|cohort ...``: write one subject's report or the cohort report."""
    thresholds = QCThresholds.from_mapping(vars(args))
    if args.kind == "subject":
        raw = {}
        for item in args.raw:
            session, sep, path = item.partition("=")
            if not sep or not path:
                raise AtlasflowError(f"--raw {item!r}: expected SESSION=PATH")
            raw[strip_prefix(session, "ses-")] = path
        contrasts = None if args.contrasts is None else parse_contrasts(args.contrasts)
        summary = write_subject_report(
            args.outdir,
            args.subject,
            args.sessions,
            args.out,
            raw_inputs=raw,
            thresholds=thresholds,
            baseline=args.baseline,
            longitudinal=False if args.cross_sectional else None,
            figures_dir=args.figures_dir,
            qc_json=args.qc_json,
            with_viewer=not args.no_viewer,
            contrasts=contrasts,
            reference=args.reference,
        )
        print(f"sub-{summary['subject']}: {summary['status']}; report {args.out}")
        return 0
    if args.scans:
        sessions: dict[str, list[str]] = {}
        for item in args.scans:
            subject, sep, session = item.partition(":")
            if not sep or not subject:  # SUBJECT: is a scan without a session
                raise AtlasflowError(f"--scans {item!r}: expected SUBJECT:SESSION")
            sessions.setdefault(strip_prefix(subject, "sub-"), []).append(
                strip_prefix(session, "ses-")
            )
        subjects = list(sessions)
    else:
        subjects, sessions = args.subjects, {}
    verdicts = write_cohort_report(
        args.outdir,
        subjects,
        args.out,
        thresholds=thresholds,
        sessions=sessions,
        iterations=args.iterations,
        figures_dir=args.figures_dir,
        reference=args.reference,
    )
    counts = {s: sum(v.status == s for v in verdicts) for s in STATUS_RANK}
    print(f"cohort report {args.out}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0
