"""Command-line entry points: ``atlasflow <command>``; each calls one package function.

User-facing problems (:class:`AtlasflowError`) become one line on stderr and exit code 1, never a
traceback. Under ``--on-scan-error skip`` (the workflow's ``on_scan_error``), a per-scan command
that fails writes failure records in place of its outputs and exits 0 instead (see
:mod:`atlasflow.errors`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from atlasflow.errors import (
    AtlasflowError,
    describe,
    failure_record,
    first_failed_input,
    keep_successful,
    on_error_default,
    write_failure,
)
from atlasflow.registration.options import RegistrationOptions


def limit_threads(n: int | None) -> None:
    """Bound every thread pool to the job's share of the machine before heavy imports run."""
    if not n:
        return
    for var in ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------- commands


def cmd_demo_data(args: argparse.Namespace) -> int:
    from atlasflow.synth.demo import make_demo_cohort

    manifest = make_demo_cohort(
        Path(args.out_dir),
        seed=args.seed,
        n_cross=args.n_cross,
        n_long=args.n_long,
        n_timepoints=args.n_timepoints,
        spacing_mm=args.spacing,
    )
    print(f"demo cohort written; manifest: {manifest}")
    return 0


def cmd_template(args: argparse.Namespace) -> int:
    from atlasflow.preprocess.reference import prepare_template

    prepare_template(args.source, args.spacing, args.out_image, args.out_mask, args.mask)
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    import numpy as np

    import atlasflow.preprocess.steps as pp

    if args.step == "reorient":
        pp.reorient(args.input, args.output, dtype=np.float32)
    elif args.step == "n4":
        if args.skip:
            pp.reorient(args.input, args.output)
        else:
            pp.bias_correct(args.input, args.output, args.mask)
    elif args.step == "mask":
        template = template_mask = None
        if args.template:
            from atlasflow.io.images import load_image

            template = load_image(args.template)
            template_mask = load_image(args.template_mask).data > 0
        pp.brain_mask(
            args.input,
            args.output,
            given_mask=args.given_mask,
            labels=args.labels,
            template=template,
            template_mask=template_mask,
        )
    elif args.step == "finalize":
        pp.finalize(args.input, args.mask, args.output, args.out_mask, spacing=args.spacing)
    elif args.step == "carry":
        pp.carry_labels(args.input, args.reference, args.output)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from atlasflow.registration.api import QCThresholds, RegisterOutputs, register_files

    if args.out_dir:
        outputs = RegisterOutputs.in_dir(args.out_dir, labels=bool(args.moving_labels))
    elif args.out_image and args.out_affine and args.out_warp:
        outputs = RegisterOutputs(Path(args.out_image), Path(args.out_affine), Path(args.out_warp))
    else:
        raise AtlasflowError("give --out-dir, or --out-image, --out-affine and --out-warp")
    for name in ("inverse_warp", "warped_labels", "metrics", "velocity"):
        value = getattr(args, f"out_{name}")
        if value:
            setattr(outputs, name, Path(value))
    metrics = register_files(
        args.fixed,
        args.moving,
        outputs,
        moving_labels=args.moving_labels,
        fixed_labels=args.fixed_labels,
        fixed_mask=args.fixed_mask,
        moving_mask=args.moving_mask,
        cost_mask=args.cost_mask,
        thresholds=QCThresholds(args.max_folding, args.min_ncc),
        options=RegistrationOptions.from_args(args),
    )
    flags = "; ".join(metrics["qc_flags"]) or "QC pass"
    print(
        f"registered {args.moving} -> {args.fixed} with {metrics['backend']} in {metrics['seconds']:.2f} s; "
        f"NCC {metrics['ncc_before']:.3f} -> {metrics['ncc_after']:.3f}; "
        f"folding {100 * metrics['folding_fraction']:.4f}%; {flags}"
    )
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from atlasflow.io.images import load_image, save_image
    from atlasflow.io.itk import load_transform
    from atlasflow.transforms import apply_transform

    fixed = load_image(args.fixed)
    labels = args.interpolation in ("nearest", "label")
    moving = load_image(args.moving, dtype=None if labels else __import__("numpy").float32)
    warped = apply_transform(moving, load_transform(args.affine, args.warp), fixed.grid, args.interpolation)
    save_image(warped, args.output)
    return 0


def _successful(args: argparse.Namespace, columns: list[list[str]], what: str) -> list[list[str]]:
    """Under on_scan_error: skip, the members (rows of the aligned lists) whose scans succeeded."""
    if args.on_scan_error != "skip":
        return columns
    kept, dropped = keep_successful(columns, args.min_inputs, what, args.min_inputs_setting)
    for line in dropped:
        print(f"atlasflow: left out {line}")
    return kept


def _member(image: str, mask: str | None, affine: str | None = None, velocity: str | None = None):
    """An atlas member named after its scan (``sub-X_ses-Y``)."""
    from atlasflow.atlas.build import Member

    return Member(Path(image).name.split("_desc-")[0].replace(".nii.gz", ""), image, mask, affine, velocity)


def cmd_atlas(args: argparse.Namespace) -> int:
    import atlasflow.atlas.build as atlas

    options = RegistrationOptions.from_args(args)
    if args.step == "init":
        images, masks, out_affines = args.images or [], args.masks or [], args.out_affines or []
        if not len(images) == len(masks) == len(out_affines):
            raise AtlasflowError("atlas init: --images, --masks and --out-affines must list the same members")
        kept_images, kept_masks = _successful(args, [images, masks], "atlas iteration 0")
        kept_affines = []
        for image, mask, out_affine in zip(images, masks, out_affines, strict=True):
            if image in kept_images:
                kept_affines.append(out_affine)
            else:  # failed upstream: its affine output passes the record on
                _, record = first_failed_input([image, mask])
                write_failure([out_affine], "atlas affine", describe(record), image)
        atlas.run_init(
            [_member(image, mask) for image, mask in zip(kept_images, kept_masks, strict=True)],
            args.template,
            args.template_mask,
            args.output,
            kept_affines,
            args.out_members,
            options=replace(options, affine_steps=None),  # --affine-steps is the iterations'
            mean=args.init == "mean",
            workers=args.threads or 1,
            skip_failed=args.on_scan_error == "skip",
            min_members=args.min_inputs,
        )
    elif args.step == "iteration":
        images, masks, affines = args.images or [], args.masks or [], args.affines or []
        velocities = args.velocities or [None] * len(images)
        out_velocities = args.out_velocities or [None] * len(images)
        if not len(images) == len(masks) == len(affines) == len(velocities) == len(out_velocities):
            raise AtlasflowError(
                "atlas iteration: --images, --masks, --affines, --velocities and --out-velocities must list the same members"
            )
        if bool(args.out_velocities) != bool(args.out_mean_velocity):
            raise AtlasflowError("atlas iteration: --out-velocities and --out-mean-velocity go together")
        kept_images, *_ = _successful(args, [images, masks, affines], f"atlas iteration {args.iteration}")
        members, kept_out = [], []
        for image, mask, affine, velocity, out_velocity in zip(
            images, masks, affines, velocities, out_velocities, strict=True
        ):
            if image not in kept_images:
                if out_velocity:  # failed upstream: its velocity output passes the record on
                    _, record = first_failed_input([image, mask, affine])
                    write_failure([out_velocity], f"atlas iteration {args.iteration}", describe(record), image)
                continue
            # A member that failed in the previous iteration starts afresh.
            carried = velocity if velocity and failure_record(velocity) is None else None
            members.append(_member(image, mask, affine, carried))
            kept_out.append(out_velocity)
        atlas.run_iteration(
            members,
            args.previous,
            args.mask,
            args.output,
            args.out_metrics,
            args.out_members,
            options=options,
            iteration=args.iteration,
            gradient_step=args.gradient_step,
            do_sharpen=not args.no_sharpen,
            workers=args.threads or 1,
            skip_failed=args.on_scan_error == "skip",
            min_members=args.min_inputs,
            previous_mean_velocity=args.mean_velocity,
            out_velocities=kept_out if args.out_velocities else None,
            out_mean_velocity=args.out_mean_velocity,
        )
    elif args.step == "vote":
        (labels,) = _successful(args, [args.labels or []], "atlas label vote")
        from atlasflow.atlas.labels import label_vote

        label_vote(labels, args.output, args.out_probseg)
    elif args.step == "gather":
        atlas.gather_metrics(args.metrics, args.output)
    return 0


def cmd_longitudinal(args: argparse.Namespace) -> int:
    import atlasflow.longitudinal.change as lg

    if args.step == "pair":
        outputs = lg.PairOutputs(
            warped=Path(args.out_image),
            affine=Path(args.out_affine),
            warp=Path(args.out_warp),
            log_jacobian=Path(args.out_log_jacobian),
            difference=Path(args.out_difference),
            displacement=Path(args.out_displacement),
            metrics=Path(args.out_metrics),
            tumor_mask=Path(args.out_tumor_mask) if args.out_tumor_mask else None,
        )
        metrics = lg.register_followup(
            args.baseline,
            args.followup,
            outputs,
            baseline_mask=args.baseline_mask,
            followup_mask=args.followup_mask,
            baseline_tumor=args.baseline_tumor,
            followup_tumor=args.followup_tumor,
            options=RegistrationOptions.from_args(args),
        )
        print(json.dumps(metrics))
    elif args.step == "table":
        sessions = [
            {"session": s, "acq_date": "" if d == "-" else d, "tumor_mask": "" if m == "-" else m}
            for s, d, m in args.session
        ]
        pair_metrics = dict(zip(args.pair_sessions or [], args.pair_metrics or [], strict=True))
        lg.write_tumour_table(sessions, args.output, pair_metrics)
    elif args.step == "to-atlas":
        lg.to_atlas(args.input, args.atlas, args.affine, args.warp, args.output, args.interpolation)
    elif args.step == "frequency":
        (masks,) = _successful(args, [args.masks or []], "tumour frequency map")
        lg.tumour_frequency(masks, args.output)
    return 0


def _delegate(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(f"atlasflow.{module}"), func)(args.rest) or 0)

    return run


# ------------------------------------------------------------------------------------ parser


def _add_min_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-inputs", type=int, default=1, help="skip mode: fewest successful scans to go on")
    p.add_argument("--min-inputs-setting", default="", help="config key of that minimum, for the message")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlasflow", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument(
        "--on-scan-error",
        choices=["fail", "skip"],
        default=on_error_default(),
        help="skip: a per-scan command that fails writes a failure record in place of its outputs and "
        "exits 0; cohort steps leave that scan out (default: $ATLASFLOW_ON_SCAN_ERROR, else fail)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="generate the embedded demo cohort")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-cross", type=int, default=8)
    p.add_argument("--n-long", type=int, default=3)
    p.add_argument("--n-timepoints", type=int, default=3)
    p.add_argument("--spacing", type=float, default=2.0)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("template", help="write the template and its mask on the working grid")
    p.add_argument("--source", default="mni152")
    p.add_argument("--mask", default=None)
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--out-image", required=True)
    p.add_argument("--out-mask", required=True)
    p.set_defaults(func=cmd_template)

    p = sub.add_parser("preprocess", help="one preprocessing step of one scan")
    p.add_argument("step", choices=["reorient", "n4", "mask", "finalize", "carry"])
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--mask", help="brain/head mask (n4: optional; finalize: required)")
    p.add_argument("--skip", action="store_true", help="n4: copy instead of correcting")
    p.add_argument("--given-mask")
    p.add_argument("--labels")
    p.add_argument("--template")
    p.add_argument("--template-mask")
    p.add_argument("--out-mask")
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--reference", help="carry: image whose grid the labels are resampled onto")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("register", help="register one pair (moving -> fixed)")
    p.add_argument("--fixed", required=True)
    p.add_argument("--moving", required=True)
    p.add_argument("--out-dir")
    p.add_argument("--out-image")
    p.add_argument("--out-affine")
    p.add_argument("--out-warp")
    p.add_argument("--out-inverse-warp")
    p.add_argument("--out-warped-labels")
    p.add_argument("--out-metrics")
    p.add_argument("--out-velocity")
    p.add_argument("--moving-labels")
    p.add_argument("--fixed-labels", help="score Dice of the warped moving labels against these")
    p.add_argument("--fixed-mask")
    p.add_argument("--moving-mask")
    p.add_argument("--cost-mask", help="fixed-grid mask of voxels excluded from the similarity")
    RegistrationOptions.add_arguments(p, "register")
    p.add_argument("--max-folding", type=float, default=0.001, help="QC: flag above this folding fraction")
    p.add_argument("--min-ncc", type=float, default=0.5, help="QC: flag below this NCC after registration")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("atlas", help="atlas building steps (init, iteration, vote, gather)")
    p.add_argument("step", choices=["init", "iteration", "vote", "gather"])
    p.add_argument("--output", required=True)
    p.add_argument("--images", nargs="*", help="init/iteration: preprocessed images")
    p.add_argument("--masks", nargs="*", help="init/iteration: their brain masks")
    p.add_argument("--affines", nargs="*", help="iteration: their affines to the reference template (from init)")
    p.add_argument("--out-affines", nargs="*", help="init: where to write the members' affines")
    p.add_argument("--out-members", help="init/iteration: per-member registration metrics (TSV)")
    p.add_argument(
        "--velocities", nargs="*",
        help="iteration: the members' velocities of the previous iteration, to continue from (deep)",
    )
    p.add_argument("--mean-velocity", help="iteration: the previous iteration's mean velocity (with --velocities)")
    p.add_argument("--out-velocities", nargs="*", help="iteration: where to write the members' velocities")
    p.add_argument("--out-mean-velocity", help="iteration: where to write their mean")
    RegistrationOptions.add_arguments(p, "atlas")
    p.add_argument("--template", help="init: reference template (grid and pose)")
    p.add_argument("--template-mask", help="init: its brain mask")
    p.add_argument(
        "--init", choices=["mean", "template"], default="mean",
        help="init: iteration 0 is the mean of the aligned members, or the reference template itself",
    )
    p.add_argument("--metrics", nargs="*", help="gather: metrics JSON files")
    p.add_argument("--previous", help="iteration: previous template")
    p.add_argument("--mask", help="iteration: template brain mask")
    p.add_argument("--out-metrics", help="iteration: metrics JSON of this iteration")
    p.add_argument("--iteration", type=int, default=1)
    p.add_argument("--gradient-step", type=float, default=1.0)
    p.add_argument("--no-sharpen", action="store_true")
    p.add_argument("--labels", nargs="*", help="vote: label maps in atlas space")
    p.add_argument("--out-probseg", help="vote: 4-D probability maps")
    _add_min_inputs(p)
    p.set_defaults(func=cmd_atlas)

    p = sub.add_parser("longitudinal", help="follow-up -> baseline change maps, tumour tables")
    p.add_argument("step", choices=["pair", "table", "to-atlas", "frequency"])
    p.add_argument("--baseline")
    p.add_argument("--followup")
    p.add_argument("--baseline-mask")
    p.add_argument("--followup-mask")
    p.add_argument("--baseline-tumor")
    p.add_argument("--followup-tumor")
    for name in ("image", "affine", "warp", "log-jacobian", "difference", "displacement", "metrics", "tumor-mask"):
        p.add_argument(f"--out-{name}")
    RegistrationOptions.add_arguments(p, "longitudinal")
    p.add_argument("--session", nargs=3, action="append", metavar=("ID", "DATE", "MASK"), help="table: one per session, '-' when empty")
    p.add_argument("--pair-sessions", nargs="*")
    p.add_argument("--pair-metrics", nargs="*")
    p.add_argument("--input")
    p.add_argument("--atlas")
    p.add_argument("--affine")
    p.add_argument("--warp")
    p.add_argument("--interpolation", choices=["linear", "nearest"], default="linear")
    p.add_argument("--masks", nargs="*")
    p.add_argument("--output")
    _add_min_inputs(p)
    p.set_defaults(func=cmd_longitudinal)

    p = sub.add_parser("apply", help="apply a written transform ([warp, affine]) to an image")
    p.add_argument("--fixed", required=True, help="image defining the output grid")
    p.add_argument("--moving", required=True)
    p.add_argument("--affine", required=True)
    p.add_argument("--warp", default=None)
    p.add_argument("--interpolation", choices=["linear", "nearest", "label"], default="linear")
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_apply)

    for name, module, func, text in [
        ("validate", "cohort.validate", "main_validate", "validate a cohort manifest or BIDS folder"),
        ("train", "training.commands", "train_main", "train the registration networks on synthetic pairs"),
        ("finetune", "training.commands", "finetune_main", "fine-tune the networks on a cohort"),
        ("report", "reports.report", "report_main", "write the HTML reports (subject, cohort)"),
        ("estimate", "runtime.estimate", "main", "predict wall time and core-hours of a run on a cluster"),
        ("provenance", "runtime.provenance", "main", "record versions, config, input and model checksums of a run"),
    ]:
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_delegate(module, func))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # argparse's REMAINDER drops a delegated command's leading "--option"s, so those commands
    # get every token after their name verbatim.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "rest", None) is None:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        tokens = list(sys.argv[1:] if argv is None else argv)
        args.rest = tokens[tokens.index(args.command) + 1 :]
    outputs, inputs = _scan_files(args) if args.on_scan_error == "skip" else ([], [])
    step = " ".join(str(x) for x in (args.command, getattr(args, "step", None)) if x)
    try:
        limit_threads(args.threads)
        failed = first_failed_input(inputs) if outputs else None
        if failed is not None:  # an upstream job of this scan failed: pass its record on
            path, record = failed
            write_failure(outputs, record.get("step", "?"), record.get("reason", ""), record.get("source", path))
            print(f"atlasflow: skipped: {path} records a failed scan ({describe(record)})", file=sys.stderr)
            return 0
        return args.func(args)
    except AtlasflowError as exc:
        print(f"atlasflow: error: {exc}", file=sys.stderr)
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


# Per-scan commands: under on_scan_error: skip their failures are recorded instead of raised.
PER_SCAN_COMMANDS = {
    ("preprocess", None),
    ("register", None),
    ("apply", None),
    ("longitudinal", "pair"),
    ("longitudinal", "table"),
    ("longitudinal", "to-atlas"),
}


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
    print(f"atlasflow: skipped: on_scan_error is skip; failure recorded in {len(outputs)} output(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
