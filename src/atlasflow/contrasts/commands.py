"""``atlasflow contrast <step>``: the multi-contrast steps of one scan (align, warp, change) and
the per-contrast atlas average; each calls one function of :mod:`atlasflow.contrasts`."""

from __future__ import annotations

import argparse

from atlasflow.contrasts.qc import MAX_SESSION_SHIFT_MM, MIN_SESSION_NMI


def add_contrast_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("step", choices=["align", "warp", "change", "average"])
    p.add_argument("--input", help="align: the contrast as given; warp/change: its normalised own-grid image")
    p.add_argument("--reference", help="align: the session's preprocessed reference scan (its T1w by default)")
    p.add_argument("--reference-mask", help="align: the reference's brain mask")
    p.add_argument("--dof", choices=["rigid", "affine"], default="rigid", help="align: transform kind")
    p.add_argument("--no-n4", action="store_true", help="align: skip the bias-field correction")
    p.add_argument("--min-nmi", type=float, default=MIN_SESSION_NMI, help="align: QC floor of the mutual information")
    p.add_argument("--max-shift-mm", type=float, default=MAX_SESSION_SHIFT_MM, help="align: QC ceiling of the movement")
    p.add_argument("--session-affine", help="warp/change: the contrast's from-<contrast>_to-<reference> transform")
    p.add_argument("--affine", help="warp/change: the reference's ITK affine into the space")
    p.add_argument("--warp", help="warp/change: the reference's displacement field into the space")
    p.add_argument("--fixed", help="warp: an image on the space's grid")
    p.add_argument("--baseline", help="change: the baseline's contrast in baseline space")
    p.add_argument("--baseline-native", help="change: the baseline's contrast on its own grid")
    p.add_argument("--baseline-session-affine", help="change: the baseline contrast's from-<contrast>_to-<reference> transform")
    p.add_argument(
        "--deformable", action="store_true", help="change: keep the reference's registration deformation (default: affine)"
    )
    p.add_argument("--inputs", nargs="*", default=[], help="average: the members' images in atlas space")
    p.add_argument("--out-native")
    p.add_argument("--out-affine")
    p.add_argument("--out-preproc")
    p.add_argument("--out-metrics")
    p.add_argument("--out-difference")
    p.add_argument("--output")


def run_contrast(args: argparse.Namespace) -> int:
    from atlasflow.contrasts import session, spaces

    if args.step == "align":
        session.run_align(
            args.input,
            args.reference,
            args.reference_mask,
            args.out_native,
            args.out_affine,
            args.out_preproc,
            args.out_metrics,
            rigid=args.dof == "rigid",
            n4=not args.no_n4,
            min_nmi=args.min_nmi,
            max_shift_mm=args.max_shift_mm,
        )
    elif args.step == "warp":
        spaces.run_warp(args.input, args.session_affine, args.affine, args.warp, args.fixed, args.output)
    elif args.step == "change":
        info = spaces.run_change(
            args.input,
            args.session_affine,
            args.baseline_native,
            args.baseline_session_affine,
            args.affine,
            args.warp,
            args.baseline,
            args.output,
            args.out_difference,
            deformable=args.deformable,
        )
        print(info)
    else:
        inputs = args.inputs
        if getattr(args, "on_scan_error", None) == "skip":
            # members whose scan failed hold failure records: average the others (at least one)
            from atlasflow.errors import keep_successful

            (inputs,), dropped = keep_successful([inputs], 1, "contrast atlas")
            for line in dropped:
                print(f"atlasflow: left out {line}")
        spaces.run_average(inputs, args.output)
    return 0
