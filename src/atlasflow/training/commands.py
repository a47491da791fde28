"""The ``atlasflow train`` and ``atlasflow finetune`` commands.

Owns their flags (names and defaults: ``add_train_arguments``, ``add_finetune_arguments``) and
turns the parsed flags into a :class:`~atlasflow.training.train.TrainSettings` or
:class:`~atlasflow.training.finetune.FinetuneSettings` (``run_train``, ``run_finetune``). torch
is imported when a command runs, not when its flags are declared (the parser is built before
``atlasflow --threads`` bounds the thread pools); errors are turned into one line by
:mod:`atlasflow.cli.main`.

``atlasflow train --resume`` takes the settings of the training state and only the flags given on
its command line (``train``'s flags note which were given), so both the original command with
``--resume`` added and ``--out X --resume`` alone continue the run.
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path


class _NoteGiven(argparse.Action):
    """Store a flag's value and note the flag as given (in ``namespace.given``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Train the deep registration networks on synthetic pairs."
    p.register("action", None, _NoteGiven)  # every flag below: store, and note it was given
    p.add_argument(
        "--out",
        required=True,
        help="output weights (.safetensors); a .json sidecar is written next to it, and the "
        "training state (for --resume) as <out>.train-state.safetensors",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="STATE",
        help="continue a stopped run from its training state (default: the one beside --out); "
        "flags not given keep the state's values, and only the number of steps, --time-budget, "
        "--checkpoint-every, --log-every, --threads, --device and the label/cache folders may "
        "change",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="train on this device (cuda: the CUDA build of torch and a GPU)",
    )
    p.add_argument(
        "--label-dir",
        default=None,
        help="folder of label maps (default: ../shared/data/synthseg_label_maps if present, else nilearn MNI152)",
    )
    p.add_argument("--cache-dir", default=None, help="folder for the resampled label-map cache")
    p.add_argument("--affine-steps", type=int, default=1000)
    p.add_argument("--flow-steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--diffusion-weight", type=float, default=0.5)
    p.add_argument("--lncc-weight", type=float, default=1.0)
    p.add_argument("--dice-weight", type=float, default=1.0)
    p.add_argument(
        "--flow-target-weight",
        type=float,
        default=0.1,
        help="weight of the end-point error against the known displacement of 'same' pairs",
    )
    p.add_argument(
        "--holdout-maps",
        type=int,
        default=4,
        help="last N label maps: validation only, never trained on",
    )
    p.add_argument(
        "--affine-fraction",
        type=float,
        default=0.2,
        help="share of --time-budget for the affine phase",
    )
    p.add_argument(
        "--max-std",
        type=float,
        default=4.0,
        help="largest random velocity standard deviation (voxels)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=200,
        help="every N steps: held-out validation, then the weights and the training state",
    )
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--init", default=None, help="start from these weights")
    p.add_argument("--limit-maps", type=int, default=None)
    p.add_argument(
        "--crop",
        type=int,
        nargs=3,
        default=None,
        help="train the U-Net on random crops of this size (voxels)",
    )
    p.add_argument(
        "--t1-probability",
        type=float,
        default=0.8,
        help="share of pairs with a T1-like contrast (rest: random contrasts)",
    )
    p.add_argument(
        "--same-probability",
        type=float,
        default=0.4,
        help="share of pairs drawn from one label map (known displacement); rest: two maps",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: all cores; 1 is faster on a busy machine)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop after this many seconds of training, those before a --resume included "
        "(affine phase: --affine-fraction of it)",
    )


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Fine-tune the velocity network on a cohort (unsupervised, LNCC + diffusion)."
    p.add_argument("--images", nargs="+", required=True, help="preprocessed images (NIfTI)")
    p.add_argument("--masks", nargs="+", default=None, help="brain masks, same order as --images")
    p.add_argument(
        "--fixed",
        default=None,
        help="fixed image (default: the first image), e.g. the current template",
    )
    p.add_argument(
        "--fixed-mask", default=None, help="brain mask of --fixed (similarity only inside)"
    )
    p.add_argument("--init", default=None, help="starting weights (default: the shipped model)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--diffusion-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)


def _settings(cls: type, args: argparse.Namespace, **changes: object):
    """``cls`` (a settings dataclass) from the flags of the same names; the rest keep defaults."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **changes})


def run_train(args: argparse.Namespace) -> int:
    """``atlasflow train``: returns a process exit code (128 + the signal when one stopped it)."""
    import sys

    from atlasflow.training.interrupt import TrainingStopped
    from atlasflow.training.state import read_state_meta, state_path
    from atlasflow.training.train import (
        DEFAULT_LABEL_DIR,
        TrainSettings,
        settings_from_dict,
        train,
    )

    crop = tuple(args.crop) if args.crop else None
    resume = None
    if args.resume is None:
        label_dir = args.label_dir
        if label_dir is None and DEFAULT_LABEL_DIR.is_dir():
            label_dir = str(DEFAULT_LABEL_DIR)
        settings = _settings(TrainSettings, args, label_dir=label_dir, crop=crop)
    else:
        resume = state_path(args.out) if args.resume is True else Path(args.resume)
        recorded = settings_from_dict(read_state_meta(resume)["settings"])
        given = getattr(args, "given", set()) & {f.name for f in fields(TrainSettings)}
        settings = replace(
            recorded, **{name: crop if name == "crop" else getattr(args, name) for name in given}
        )
    try:
        train(args.out, settings, resume=resume)
    except TrainingStopped as stopped:
        print(
            f"atlasflow train: {stopped}; continue with: atlasflow train --out {args.out} "
            f"--resume {stopped.state}",
            file=sys.stderr,
        )
        return stopped.exit_code
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    """``atlasflow finetune``: returns a process exit code."""
    from atlasflow.training.finetune import FinetuneSettings, finetune

    finetune(
        args.out,
        args.images,
        _settings(FinetuneSettings, args),
        fixed=args.fixed,
        masks=args.masks,
        fixed_mask=args.fixed_mask,
    )
    return 0
