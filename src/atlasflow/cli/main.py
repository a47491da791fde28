"""Command-line entry points: ``atlasflow <command>``; each calls one package function.

One parser tree: :data:`COMMANDS` names every command and the module that owns it; that module
declares the command's flags in ``add_X_arguments(parser)`` and runs it in ``run_X(args)`` (``X``
the command's name, ``-`` as ``_``), and is imported only when its command is used, so a job's
``--threads`` bounds the thread pools before torch or ITK is loaded.

One error wrapper (:func:`main`): user-facing problems (:class:`AtlasflowError`) become one line on
stderr (several problems of a cohort found in one pass: a heading line, then one indented line
each) and exit code 1, never a traceback. Under ``--on-scan-error skip`` (the workflow's
``on_scan_error``), a per-scan command that fails writes failure records in place of its outputs
and exits 0 instead (see :mod:`atlasflow.errors`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NamedTuple

from atlasflow.errors import (
    AtlasflowError,
    describe,
    first_failed_input,
    on_error_default,
    write_failure,
)


class Command(NamedTuple):
    name: str
    module: str  # defines add_<name>_arguments(parser) and run_<name>(args) -> int
    help: str


COMMANDS = [
    Command("demo-data", "atlasflow.cli.commands", "generate the embedded demo cohort"),
    Command(
        "template", "atlasflow.cli.commands", "write the template and its mask on the working grid"
    ),
    Command("preprocess", "atlasflow.cli.commands", "one preprocessing step of one scan"),
    Command("register", "atlasflow.cli.commands", "register one pair (moving -> fixed)"),
    Command("atlas", "atlasflow.cli.steps", "atlas building steps (init, iteration, vote, gather)"),
    Command(
        "longitudinal", "atlasflow.cli.steps", "follow-up -> baseline change maps, tumour tables"
    ),
    Command(
        "apply", "atlasflow.cli.commands", "apply a written transform ([warp, affine]) to an image"
    ),
    Command("validate", "atlasflow.cohort.validate", "validate a cohort manifest or BIDS folder"),
    Command(
        "train", "atlasflow.training.commands", "train the registration networks on synthetic pairs"
    ),
    Command("finetune", "atlasflow.training.commands", "fine-tune the networks on a cohort"),
    Command("report", "atlasflow.reports.report", "write the HTML reports (subject, cohort)"),
    Command(
        "estimate",
        "atlasflow.runtime.estimate",
        "predict wall time and core-hours of a run on a cluster",
    ),
    Command(
        "provenance",
        "atlasflow.runtime.provenance",
        "record versions, config, input and model checksums of a run",
    ),
]

# Commands whose error line has always named them: "atlasflow validate: error: ...".
NAMED_IN_ERRORS = {"validate", "train", "finetune"}

# Per-scan commands: under on_scan_error: skip their failures are recorded instead of raised.
PER_SCAN_COMMANDS = {
    ("preprocess", None),
    ("register", None),
    ("apply", None),
    ("longitudinal", "pair"),
    ("longitudinal", "table"),
    ("longitudinal", "to-atlas"),
}


def limit_threads(n: int | None) -> None:
    """Bound every thread pool to the job's share of the machine before heavy imports run."""
    if not n:
        return
    for var in ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------ parser


class CommandParser(argparse.ArgumentParser):
    """A command's parser; its flags are declared by the command's module, imported on first use
    (parsing its arguments or showing its help)."""

    def __init__(self, *args: Any, command: Command | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._command = command

    def load(self) -> None:
        if self._command is None:
            return
        module = importlib.import_module(self._command.module)
        name = self._command.name.replace("-", "_")
        self._command = None
        getattr(module, f"add_{name}_arguments")(self)
        self.set_defaults(func=getattr(module, f"run_{name}"))

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self.load()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.load()
        return super().format_help()

    def format_usage(self) -> str:
        self.load()
        return super().format_usage()


def build_parser() -> argparse.ArgumentParser:
    """The whole ``atlasflow`` parser: global options, then one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="atlasflow", description=__doc__.splitlines()[0])
    # dest differs from the commands' own --threads (train, finetune, provenance), whose
    # defaults would otherwise overwrite it
    parser.add_argument(
        "--threads",
        dest="job_threads",
        metavar="THREADS",
        type=int,
        default=None,
        help="CPU threads (default: all)",
    )
    parser.add_argument(
        "--on-scan-error",
        choices=["fail", "skip"],
        default=on_error_default(),
        help="skip: a per-scan command that fails writes a failure record in place of its outputs and "
        "exits 0; cohort steps leave that scan out (default: $ATLASFLOW_ON_SCAN_ERROR, else fail)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for command in COMMANDS:
        sub.add_parser(command.name, help=command.help, command=command)
    return parser


# ------------------------------------------------------------------------------ error wrapper


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    outputs, inputs = _scan_files(args) if args.on_scan_error == "skip" else ([], [])
    step = " ".join(str(x) for x in (args.command, getattr(args, "step", None)) if x)
    try:
        limit_threads(args.job_threads)
        failed = first_failed_input(inputs) if outputs else None
        if failed is not None:  # an upstream job of this scan failed: pass its record on
            path, record = failed
            write_failure(
                outputs,
                record.get("step", "?"),
                record.get("reason", ""),
                record.get("source", path),
            )
            print(
                f"atlasflow: skipped: {path} records a failed scan ({describe(record)})",
                file=sys.stderr,
            )
            return 0
        return int(args.func(args) or 0)
    except AtlasflowError as exc:
        from atlasflow.errors import error_lines

        prefix = f"atlasflow {args.command}" if args.command in NAMED_IN_ERRORS else "atlasflow"
        first, *rest = error_lines(exc)  # one line, or a heading and one line per problem
        print(
            "\n".join([f"{prefix}: error: {first}", *(f"  {line}" for line in rest)]),
            file=sys.stderr,
        )
        return _skip(outputs, step, str(exc))
    except KeyboardInterrupt:
        print("atlasflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not outputs:
            raise
        # Under skip, an unforeseen failure (e.g. inside ITK) also costs only this scan; the
        # traceback stays in the job's log for a bug report.
        traceback.print_exc()
        print(f"atlasflow: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return _skip(outputs, step, f"unexpected {type(exc).__name__}: {exc}")


def _scan_files(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(outputs, inputs) named on a per-scan command line; ([], []) for other commands."""
    keys = {(args.command, None), (args.command, getattr(args, "step", None))}
    if not keys & PER_SCAN_COMMANDS:
        return [], []
    outputs: list[str] = []
    inputs: list[str] = []
    for name, value in vars(args).items():
        if name in ("func", "command", "step", "out_dir", "on_scan_error"):
            continue
        flat = []
        for item in value if isinstance(value, list) else [value]:
            flat += item if isinstance(item, list) else [item]
        strings = [v for v in flat if isinstance(v, str)]
        (outputs if name == "output" or name.startswith("out_") else inputs).extend(strings)
    return outputs, inputs


def _skip(outputs: list[str], step: str, reason: str) -> int:
    if not outputs:
        return 1
    write_failure(outputs, step, reason)
    print(
        f"atlasflow: skipped: on_scan_error is skip; failure recorded in {len(outputs)} output(s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
