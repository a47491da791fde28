"""The per-scan imaging commands: ``demo-data``, ``template``, ``preprocess``, ``register``, ``apply``.

Each command ``X`` is a pair: ``add_X_arguments(parser)`` declares its flags, ``run_X(args)``
calls one package function and returns the exit code (see :mod:`atlasflow.cli.main`, which builds
the parser tree and turns errors into one line). The heavy modules are imported inside ``run_X``,
after ``--threads`` has bounded the thread pools.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from atlasflow.errors import AtlasflowError
from atlasflow.registration.options import RegistrationOptions, add_qc_arguments


def add_demo_data_arguments(p: argparse.ArgumentParser) -> None:
    from atlasflow.synth.plan import DEMO_CONTRASTS, SYNTH_CONTRASTS

    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-cross", type=int, default=8)
    p.add_argument("--n-long", type=int, default=3)
    p.add_argument("--n-timepoints", type=int, default=3)
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument(
        "--contrasts",
        nargs="*",
        choices=SYNTH_CONTRASTS,
        default=list(DEMO_CONTRASTS),
        help="contrasts written beside every T1w, each on its own grid (none: T1w only)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="subjects rendered at once, each in its own process (same files for any number)",
    )


def run_demo_data(args: argparse.Namespace) -> int:
    from atlasflow.synth.demo import make_demo_cohort

    manifest = make_demo_cohort(
        Path(args.out_dir),
        seed=args.seed,
        n_cross=args.n_cross,
        n_long=args.n_long,
        n_timepoints=args.n_timepoints,
        spacing_mm=args.spacing,
        contrasts=args.contrasts,
        workers=args.workers,
    )
    print(f"demo cohort written; manifest: {manifest}")
    return 0


def add_template_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="mni152")
    p.add_argument("--mask", default=None)
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--out-image", required=True)
    p.add_argument("--out-mask", required=True)


def run_template(args: argparse.Namespace) -> int:
    from atlasflow.preprocess.reference import prepare_template

    prepare_template(args.source, args.spacing, args.out_image, args.out_mask, args.mask)
    return 0


def add_preprocess_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("step", choices=["reorient", "n4", "mask", "finalize", "carry"])
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--mask", help="brain/head mask (n4: optional; finalize: required)")
    p.add_argument("--skip", action="store_true", help="n4: copy instead of correcting")
    p.add_argument("--given-mask")
    p.add_argument("--labels")
    p.add_argument("--template")
    p.add_argument("--template-mask")
    p.add_argument("--lesion-mask", help="mask: the session's tumour or lesion mask, added to the brain mask")
    p.add_argument(
        "--lesion", action="store_true", help="carry: the input is a tumour or lesion mask (it must land on the grid)"
    )
    p.add_argument("--out-mask")
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--reference", help="carry: image whose grid the labels are resampled onto")
    p.add_argument("--t1w", help="carry: the session's reference scan as given (its T1w unless contrasts.reference says otherwise; a mask on another grid is on a contrast's)")
    p.add_argument(
        "--contrast-grid",
        nargs=2,
        action="append",
        default=[],
        metavar=("IMAGE", "AFFINE"),
        help="carry: another contrast of the session as given and its from-<contrast>_to-<reference> transform",
    )


def run_preprocess(args: argparse.Namespace) -> int:
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
            lesion_mask=args.lesion_mask,
        )
    elif args.step == "finalize":
        pp.finalize(args.input, args.mask, args.output, args.out_mask, spacing=args.spacing)
    elif args.step == "carry":
        pp.carry_labels(
            args.input,
            args.reference,
            args.output,
            t1w_path=args.t1w,
            contrast_grids=args.contrast_grid,
            lesion=args.lesion,
        )
    return 0


def add_register_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--find-masks",
        choices=["brain", "head"],
        default="brain",
        help="a scan without a mask file: its brain found through the MNI152 template (brain, "
        "~6 s per scan, and its contrast class) or the head the engine finds (head: faster, less "
        "accurate on whole heads)",
    )
    p.add_argument("--cost-mask", help="fixed-grid mask of voxels excluded from the similarity")
    RegistrationOptions.add_arguments(p, "register")
    add_qc_arguments(p)


def run_register(args: argparse.Namespace) -> int:
    from atlasflow.preprocess.reference import find_brain
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
        thresholds=QCThresholds.from_mapping(vars(args)),
        options=RegistrationOptions.from_args(args),
        find_mask=find_brain if args.find_masks == "brain" else None,
    )
    flags = "; ".join(metrics["qc_flags"]) or "QC pass"
    for side in ("fixed", "moving"):
        if f"{side}_mask" in metrics:
            contrast = metrics.get(f"{side}_contrast")
            read = f" ({contrast})" if contrast else ""
            print(f"{side} mask: {metrics[f'{side}_mask']}{read}")
    if metrics.get("cross_contrast"):
        # the NCC of two contrasts says little: the QC judged the mutual information
        similarity = f"NMI {metrics['nmi_before']:.3f} -> {metrics['nmi_after']:.3f} (two contrasts)"
    else:
        similarity = f"NCC {metrics['ncc_before']:.3f} -> {metrics['ncc_after']:.3f}"
    print(
        f"registered {args.moving} -> {args.fixed} with {metrics['backend']} in {metrics['seconds']:.2f} s; "
        f"{similarity}; folding {100 * metrics['folding_fraction']:.4f}%; {flags}"
    )
    return 0


def add_apply_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed", required=True, help="image defining the output grid")
    p.add_argument("--moving", required=True)
    p.add_argument("--affine", required=True)
    p.add_argument("--warp", default=None)
    p.add_argument("--interpolation", choices=["linear", "nearest", "label"], default="linear")
    p.add_argument("--output", required=True)


def run_apply(args: argparse.Namespace) -> int:
    from atlasflow.io.images import load_image, save_image
    from atlasflow.io.itk import load_transform
    from atlasflow.transforms import apply_transform

    fixed = load_image(args.fixed)
    labels = args.interpolation in ("nearest", "label")
    moving = load_image(args.moving, dtype=None if labels else __import__("numpy").float32)
    warped = apply_transform(
        moving, load_transform(args.affine, args.warp), fixed.grid, args.interpolation
    )
    save_image(warped, args.output)
    return 0
