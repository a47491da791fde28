"""The cohort-wide step commands: ``atlas`` (init, iteration, vote, gather) and ``longitudinal``
(pair, table, to-atlas, frequency).

As in :mod:`atlasflow.cli.commands`: ``add_X_arguments(parser)`` declares a command's flags and
``run_X(args)`` runs it. Under ``--on-scan-error skip`` a step over many scans leaves out the
members whose inputs are failure records (``--min-inputs`` of them must remain) and passes their
records on to the outputs that stood for them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from atlasflow.errors import (
    AtlasflowError,
    describe,
    failure_record,
    first_failed_input,
    keep_successful,
    write_failure,
)
from atlasflow.registration.options import RegistrationOptions, add_qc_arguments


def _add_min_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--min-inputs", type=int, default=1, help="skip mode: fewest successful scans to go on"
    )
    p.add_argument(
        "--min-inputs-setting", default="", help="config key of that minimum, for the message"
    )


def _successful(args: argparse.Namespace, columns: list[list[str]], what: str) -> list[list[str]]:
    """Under on_scan_error: skip, the members (rows of the aligned lists) whose scans succeeded."""
    if args.on_scan_error != "skip":
        return columns
    kept, dropped = keep_successful(columns, args.min_inputs, what, args.min_inputs_setting)
    for line in dropped:
        print(f"atlasflow: left out {line}")
    return kept


def _member(image: str, mask: str | None, affine: str | None = None, velocity: str | None = None):
    """An atlas member named after its scan (``sub-X_ses-Y``; ``sub-X`` without a session).

    ``velocity`` (its field of the previous iteration) is carried only when it is one: a member
    that failed there (its velocity file is a failure record) starts afresh."""
    from atlasflow.atlas.build import Member

    carried = velocity if velocity and failure_record(velocity) is None else None
    return Member(
        Path(image).name.split("_desc-")[0].replace(".nii.gz", ""), image, mask, affine, carried
    )


def add_atlas_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("step", choices=["init", "iteration", "register", "vote", "gather"])
    p.add_argument("--output", help="init/iteration: the template; vote/gather: the table or map")
    p.add_argument("--images", nargs="*", help="init/iteration: preprocessed images")
    p.add_argument("--masks", nargs="*", help="init/iteration: their brain masks")
    p.add_argument(
        "--affines",
        nargs="*",
        help="iteration: their affines to the reference template (from init)",
    )
    p.add_argument("--out-affines", nargs="*", help="init: where to write the members' affines")
    p.add_argument("--out-members", help="init/iteration: per-member registration metrics (TSV)")
    p.add_argument(
        "--velocities",
        nargs="*",
        help="iteration: the members' velocities of the previous iteration, to continue from (deep)",
    )
    p.add_argument(
        "--mean-velocity",
        help="iteration: the previous iteration's mean velocity (with --velocities)",
    )
    p.add_argument(
        "--out-velocities", nargs="*", help="iteration: where to write the members' velocities"
    )
    p.add_argument("--out-mean-velocity", help="iteration: where to write their mean")
    RegistrationOptions.add_arguments(p, "atlas")
    p.add_argument("--template", help="init: reference template (grid and pose)")
    p.add_argument("--template-mask", help="init: its brain mask")
    p.add_argument(
        "--init",
        choices=["mean", "template"],
        default="mean",
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
    for flag in ("--out-images", "--out-member-affines", "--out-warps", "--out-inverse-warps", "--out-metrics-files"):
        p.add_argument(flag, nargs="*", help="register: per member, what `atlasflow register` writes")
    add_qc_arguments(p)
    p.add_argument("--out-probseg", help="vote: 4-D probability maps")
    _add_min_inputs(p)


def run_atlas(args: argparse.Namespace) -> int:
    import atlasflow.atlas.build as atlas

    options = RegistrationOptions.from_args(args)
    if args.step != "register" and not args.output:
        raise AtlasflowError(f"atlas {args.step}: --output is required")
    if args.step == "init":
        images, masks, out_affines = args.images or [], args.masks or [], args.out_affines or []
        if not len(images) == len(masks) == len(out_affines):
            raise AtlasflowError(
                "atlas init: --images, --masks and --out-affines must list the same members"
            )
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
            workers=args.job_threads or 1,
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
            raise AtlasflowError(
                "atlas iteration: --out-velocities and --out-mean-velocity go together"
            )
        kept_images, *_ = _successful(
            args, [images, masks, affines], f"atlas iteration {args.iteration}"
        )
        members, kept_out = [], []
        for image, mask, affine, velocity, out_velocity in zip(
            images, masks, affines, velocities, out_velocities, strict=True
        ):
            if image not in kept_images:
                if out_velocity:  # failed upstream: its velocity output passes the record on
                    _, record = first_failed_input([image, mask, affine])
                    write_failure(
                        [out_velocity], f"atlas iteration {args.iteration}", describe(record), image
                    )
                continue
            members.append(_member(image, mask, affine, velocity))
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
            workers=args.job_threads or 1,
            skip_failed=args.on_scan_error == "skip",
            min_members=args.min_inputs,
            previous_mean_velocity=args.mean_velocity,
            out_velocities=kept_out if args.out_velocities else None,
            out_mean_velocity=args.out_mean_velocity,
        )
    elif args.step == "register":
        _register_members(args, options)
    elif args.step == "vote":
        (labels,) = _successful(args, [args.labels or []], "atlas label vote")
        from atlasflow.atlas.labels import label_vote

        label_vote(labels, args.output, args.out_probseg)
    elif args.step == "gather":
        atlas.gather_metrics(args.metrics, args.output)
    return 0


def _register_members(args: argparse.Namespace, options: RegistrationOptions) -> None:
    """``atlas register``: every member to the final atlas (--previous), each from its last
    velocity (--velocities, shifted by --mean-velocity), with what ``atlasflow register`` writes."""
    import atlasflow.atlas.final as final
    from atlasflow.registration.qc import QCThresholds

    images, masks, affines = args.images or [], args.masks or [], args.affines or []
    velocities = args.velocities or [None] * len(images)
    outs = [
        args.out_images or [],
        args.out_member_affines or [],
        args.out_warps or [],
        args.out_inverse_warps or [],
        args.out_metrics_files or [],
    ]
    if not args.previous or not all(
        len(column) == len(images) for column in (masks, affines, velocities, *outs)
    ):
        raise AtlasflowError(
            "atlas register: give --previous (the atlas) and, for the same members, --images, "
            "--masks, --affines, --out-images, --out-member-affines, --out-warps, "
            "--out-inverse-warps and --out-metrics-files (and --velocities, if any)"
        )
    members, targets = [], []
    for image, mask, affine, velocity, *paths in zip(
        images, masks, affines, velocities, *outs, strict=True
    ):
        out = final.MemberOutputs(*paths)
        failed = first_failed_input([image, mask, affine])
        if failed:  # failed upstream (skip mode): its outputs pass the record on
            write_failure(out.paths(), "registration to the atlas", describe(failed[1]), image)
            continue
        members.append(_member(image, mask, affine, velocity))
        targets.append(out)
    final.register_to_atlas(
        members,
        targets,
        args.previous,
        args.mask,
        options=options,
        thresholds=QCThresholds.from_mapping(vars(args)),
        gradient_step=args.gradient_step,
        last_mean_velocity=args.mean_velocity,
        workers=args.job_threads or 1,
        skip_failed=args.on_scan_error == "skip",
    )


def add_longitudinal_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("step", choices=["pair", "table", "to-atlas", "frequency"])
    p.add_argument("--baseline")
    p.add_argument("--followup")
    p.add_argument("--baseline-mask")
    p.add_argument("--followup-mask")
    p.add_argument("--baseline-tumor")
    p.add_argument("--followup-tumor")
    for name in (
        "image",
        "affine",
        "warp",
        "log-jacobian",
        "difference",
        "displacement",
        "metrics",
        "tumor-mask",
    ):
        p.add_argument(f"--out-{name}")
    RegistrationOptions.add_arguments(p, "longitudinal")
    p.add_argument(
        "--session",
        nargs=3,
        action="append",
        metavar=("ID", "DATE", "MASK"),
        help="table: one per session, '-' when empty",
    )
    p.add_argument("--pair-sessions", nargs="*")
    p.add_argument("--pair-metrics", nargs="*")
    p.add_argument(
        "--tumor-labels",
        nargs="*",
        metavar="NAME=LABEL[,LABEL]",
        help="table: tumour-mask compartments (default: necrosis=1 oedema=2 enhancing=3,4)",
    )
    p.add_argument("--input")
    p.add_argument("--atlas")
    p.add_argument("--affine")
    p.add_argument("--warp")
    p.add_argument("--interpolation", choices=["linear", "nearest"], default="linear")
    p.add_argument("--masks", nargs="*")
    p.add_argument("--output")
    _add_min_inputs(p)


def run_longitudinal(args: argparse.Namespace) -> int:
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
        from atlasflow.longitudinal.compartments import TumourLabels

        labels = TumourLabels.parse(args.tumor_labels)
        lg.write_tumour_table(sessions, args.output, pair_metrics, labels)
    elif args.step == "to-atlas":
        lg.to_atlas(args.input, args.atlas, args.affine, args.warp, args.output, args.interpolation)
    elif args.step == "frequency":
        (masks,) = _successful(args, [args.masks or []], "tumour frequency map")
        lg.tumour_frequency(masks, args.output)
    return 0
