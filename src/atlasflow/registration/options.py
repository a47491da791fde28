"""Registration options: the one place where an engine setting is named, defaulted and flagged.

A setting travels config -> workflow rule -> command line -> function. :class:`RegistrationOptions`
holds it on every leg: :meth:`~RegistrationOptions.from_config` reads the workflow config,
:meth:`~RegistrationOptions.flags` renders the command-line flags a rule passes,
:meth:`~RegistrationOptions.add_arguments` declares those flags on a command's parser,
:meth:`~RegistrationOptions.from_args` reads them back, and the registration functions
(:func:`atlasflow.registration.api.register`, :func:`atlasflow.registration.engine.register_deep`,
the atlas and longitudinal steps) take the dataclass itself.

:func:`add_qc_arguments` declares the QC thresholds (config ``qc``) that the ``register`` and
``report`` commands both take, under one spelling.

Torch-free (the workflow plans with it).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

BACKENDS = ("deep", "ants")
DEVICES = ("cpu", "cuda")


def _flag(name: str, group: str, **argparse_kwargs: Any) -> dict:
    """Field metadata: the command-line flag, the commands that take it (``group``) and the rest
    of its ``add_argument`` call."""
    return {"flag": name, "group": group, "argparse": argparse_kwargs}


@dataclass(frozen=True)
class RegistrationOptions:
    """How a pair is registered (not what: images, masks and labels are the functions' arguments).

    Field names are the keyword arguments :func:`~atlasflow.registration.api.register` has always
    taken, so ``register(fixed, moving, backend="ants")`` still reads as before.
    """

    # every command that registers ("engine")
    backend: str = field(
        default="deep", metadata=_flag("--backend", "engine", choices=list(BACKENDS))
    )
    refine_steps: int = field(
        default=0,
        metadata=_flag("--refine", "engine", type=int, help="instance-optimisation steps (deep)"),
    )
    model_path: str | None = field(
        default=None, metadata=_flag("--model", "engine", help="weights file (default: shipped)")
    )
    device: str = field(default="cpu", metadata=_flag("--device", "engine", choices=list(DEVICES)))
    ants_type: str = field(
        default="SyN",
        metadata=_flag("--ants-type", "engine", help="antspyx type_of_transform (ants backend)"),
    )
    seed: int = field(default=0, metadata=_flag("--seed", "engine", type=int))
    cross_contrast: bool = field(
        default=False,
        metadata=_flag(
            "--cross-contrast",
            "engine",
            action="store_true",
            help="the pair shows two contrasts (a FLAIR onto a T1w template): the deep backend "
            "starts from the contrast-independent alignment (mutual information), as for raw "
            "scans, skips the refinement (--refine: a one-contrast similarity) and keeps the "
            "networks' deformation only where it raises the mutual information",
        ),
    )
    # one command each
    affine_steps: int | None = field(  # None: the engine's default (engine.AFFINE_STEPS)
        default=None,
        metadata=_flag(
            "--affine-steps", "atlas", type=int, help="iteration: test-time affine steps (deep)"
        ),
    )
    affine_only: bool = field(
        default=False, metadata=_flag("--affine-only", "register", action="store_true")
    )
    exclusion_margin_mm: float = field(
        default=4.0,
        metadata=_flag(
            "--exclusion-margin",
            "longitudinal",
            type=float,
            help="pair: mm around the tumours left out of the similarity",
        ),
    )
    tumor_weight: float = field(
        default=1.0,
        metadata=_flag(
            "--tumor-weight",
            "longitudinal",
            type=float,
            help="pair: weight of the tumour-region term (signed distances to the tumour edges; 0 = off)",
        ),
    )
    # set by the calling code, never on a command line
    inverse: bool = True  # deep: compute the inverse field
    full_velocity: bool = True  # deep: the velocity on the fixed grid (else only on the network's)
    label_weight: float = 1.0  # weight of the label term (with fixed and moving labels)
    # "dice" (per label) or "distance" (signed distance to one region's edge)
    label_term: str = "dice"
    # deep: runs of the velocity network (None: the engine's rule, engine.NETWORK_PASSES)
    network_passes: int | None = None
    # deep: squarings of the exponential in the refinement's full-resolution steps (None: as in
    # its half-resolution ones, refine.REFINE_SQUARINGS)
    fine_squarings: int | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def of(
        cls, options: RegistrationOptions | Mapping[str, Any] | None = None, **changes: Any
    ) -> RegistrationOptions:
        """``options`` (a dataclass, a mapping of field names, or None for the defaults) with
        ``changes``; an unknown name is a TypeError, as a wrong keyword argument would be."""
        if options is None:
            base = cls()
        elif isinstance(options, RegistrationOptions):
            base = options
        else:
            base = cls(**options)
        return replace(base, **changes) if changes else base

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RegistrationOptions:
        """The options a parsed command line gives (fields without a flag on it keep defaults)."""
        values = {}
        for f in _flagged():
            dest = _dest(f)
            if hasattr(args, dest):
                values[f.name] = getattr(args, dest)
        return cls(**values)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], stage: str = "register") -> RegistrationOptions:
        """The options a workflow ``stage`` (see :data:`STAGE_FLAGS`) registers with.

        Values are taken as the config holds them (not converted), so the flags rendered from
        them read exactly as the config's YAML does.
        """
        reg = config["registration"]
        values: dict[str, Any] = {
            "backend": reg["backend"],
            "refine_steps": reg["refine_steps"],
            "model_path": reg["model"] or None,
            "device": reg["device"],
            "ants_type": reg["ants_type"],
            "seed": reg["seed"],
        }
        if stage == "atlas_init":
            values["refine_steps"] = 0  # affines only
        elif stage == "atlas":
            values["refine_steps"] = config["atlas"]["refine_steps"]
            values["affine_steps"] = config["atlas"]["affine_steps"]
        elif stage == "longitudinal":
            lg = config["longitudinal"]
            values["refine_steps"] = lg["refine_steps"]
            values["tumor_weight"] = lg["tumor_weight"]
            values["exclusion_margin_mm"] = lg["exclusion_margin_mm"]
        elif stage != "register":
            raise ValueError(
                f"unknown registration stage {stage!r}; choose one of {', '.join(STAGE_FLAGS)}"
            )
        return cls(**values)

    # ------------------------------------------------------------------ command line

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, command: str = "register") -> None:
        """Declare the engine flags and those of ``command`` (register, atlas, longitudinal)."""
        for f in _flagged():
            if f.metadata["group"] in ("engine", command):
                parser.add_argument(f.metadata["flag"], default=f.default, **f.metadata["argparse"])

    def flags(self, extras: Sequence[str] = ()) -> str:
        """The command-line flags of the engine settings, then of the fields named in ``extras``.

        The spelling is frozen: workflow rules pass this string as a param, and Snakemake reruns
        a job whose params changed (hence the empty item, and the double space it makes, where
        no model is given).
        """
        model = f"--model {self.model_path}" if self.model_path else ""
        parts = [
            f"--backend {self.backend}",
            f"--refine {self.refine_steps}",
            f"--device {self.device}",
            f"--ants-type {self.ants_type}",
            f"--seed {self.seed}",
            model,
        ]
        by_name = {f.name: f for f in _flagged()}
        for name in extras:
            parts.append(f"{by_name[name].metadata['flag']} {getattr(self, name)}")
        return " ".join(parts)


#: Workflow stages: the settings their rules pass beyond the engine's (:meth:`RegistrationOptions.flags`).
STAGE_FLAGS: dict[str, tuple[str, ...]] = {
    "register": (),
    "atlas_init": (),
    "atlas": ("affine_steps",),
    "longitudinal": ("tumor_weight", "exclusion_margin_mm"),
}


def workflow_flags(config: Mapping[str, Any], stage: str = "register") -> str:
    """The registration flags the rules of a workflow ``stage`` pass to ``atlasflow``."""
    return RegistrationOptions.from_config(config, stage).flags(STAGE_FLAGS[stage])


def _flagged() -> list:
    return [f for f in fields(RegistrationOptions) if "flag" in f.metadata]


def _dest(f) -> str:
    return f.metadata["flag"].lstrip("-").replace("-", "_")


#: QC thresholds on the command line: config key -> (flag, former ``register`` spelling, help).
QC_FLAGS: dict[str, tuple[str, str | None, str]] = {
    "max_folding_fraction": (
        "--max-folding-fraction",
        "--max-folding",
        "QC: flag above this folding fraction",
    ),
    "min_ncc_after": ("--min-ncc-after", "--min-ncc", "QC: flag below this NCC after registration"),
    "min_dice": ("--min-dice", None, "QC: flag below this mean Dice of the labels"),
}


def add_qc_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the QC thresholds as flags named after their config keys (``--max-folding-fraction``).

    Unset flags stay None, so ``QCThresholds.from_mapping(vars(args))`` gives the defaults (kept
    in :class:`~atlasflow.registration.qc.QCThresholds` alone, which this torch- and numpy-free
    module does not import). ``register``'s former spellings (``--max-folding``, ``--min-ncc``)
    still work, hidden from the help: the workflow's register rule passes them.
    """
    for key, (flag, former, text) in QC_FLAGS.items():
        parser.add_argument(flag, dest=key, type=float, default=None, help=text)
        if former:
            parser.add_argument(
                former, dest=key, type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )
