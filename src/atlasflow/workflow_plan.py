"""What the Snakemake workflow plans from its config and cohort: rule inputs, targets, option strings.

``workflow/rules/common.smk`` builds one :class:`WorkflowPlan` when Snakemake parses the workflow
and the rules call its methods as input and params functions (their ``wildcards`` carry
``subject``, ``session`` and ``iteration``). Every path comes from :mod:`atlasflow.layout`; every
option string the rules pass on is rendered here, so it can be unit-tested without Snakemake.

A cohort without sessions (session "" in every row; validation leaves no cohort mixed) is planned
without a ``{session}`` wildcard: ``OUT/sub-{subject}/anat/sub-{subject}_...``.

Every scan is anchored by its session's reference contrast (config ``contrasts.reference``, the
T1w by default): that image is preprocessed, registered to the template, built into the atlas and
registered to its baseline, and its files carry its name (:meth:`WorkflowPlan.ref`:
``desc-preproc_T1w``, or ``desc-preproc_FLAIR`` with the FLAIR as reference). The longitudinal
part of the plan is :class:`atlasflow.longitudinal.plan.LongitudinalPlan`, the other contrasts'
:class:`atlasflow.contrasts.plan.ContrastPlan`.

Params that a rule takes as plain values or as functions of the wildcards only are compared with
the last run's when Snakemake plans (functions of ``input`` / ``output`` are not): a changed
setting reruns exactly the jobs it reaches. The strings rendered here are therefore part of every
finished run's record; changing their text reruns jobs.

Planning imports this module every time Snakemake parses the workflow: no torch, no numpy.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from atlasflow import layout
from atlasflow.cohort.columns import IMAGE_COLUMNS, SCAN_COLUMNS
from atlasflow.cohort.manifest import choose_reference
from atlasflow.cohort.planning import (
    SHIPPED_MODEL,
    atlas_members,
    cohort_source,
    resolve_cohort,
    session_order,
)
from atlasflow.cohort.selection import CohortNotes
from atlasflow.contrasts.plan import T1_LIKE, ContrastPlan, reference_of
from atlasflow.errors import AtlasflowError
from atlasflow.longitudinal.plan import LongitudinalPlan
from atlasflow.registration.options import workflow_flags
from atlasflow.reports.inputs import cohort_report_inputs, subject_report_inputs

_MASK_FLAGS = {
    "given": "--given-mask",
    "labels": "--labels",
    "template": "--template",
    "template_mask": "--template-mask",
    "lesion": "--lesion-mask",
}


def image_files(cohort: pd.DataFrame) -> list[str]:
    """Every image file of a cohort table (its :data:`~atlasflow.cohort.columns.IMAGE_COLUMNS`)."""
    files: list[str] = []
    for column in IMAGE_COLUMNS:
        if column in cohort:
            files += [v for v in cohort[column] if isinstance(v, str) and v]
    return files


# --------------------------------------------------------------- how rules run `atlasflow`


def atlasflow_command(python: str) -> str:
    """``atlasflow`` as the interpreter ``python`` runs it (``python -m atlasflow``, shell-quoted)."""
    return f"{shlex.quote(python)} -m atlasflow"


def shell_prefix(python: str, conda: bool) -> str:
    """What every rule's ``shell:`` command starts with (Snakemake's ``shell.prefix``).

    Bash's strict mode, as Snakemake's default prefix, and -- unless the rules run in their conda
    environment (``--sdm conda``, where the activated environment provides ``atlasflow``) -- a
    shell function ``atlasflow`` that runs the package with ``python``, the interpreter running
    Snakemake: the rules then work without that environment's ``bin`` on ``PATH`` (a venv
    not activated, a cluster job started as ``python -m snakemake``). The rules' command text
    stays ``atlasflow ...``: Snakemake records it and reruns a job whose text changed.
    """
    prefix = "set -euo pipefail; "
    if conda:
        return prefix
    return prefix + f'atlasflow() {{ {atlasflow_command(python)} "$@"; }}; '


# ------------------------------------------------------------------------------ the plan


class WorkflowPlan(LongitudinalPlan):
    """The workflow's cohort (a table of string columns) and config, and what its rules derive
    from them. ``outdir`` is the config's ``outdir``, joined as given (see :mod:`atlasflow.layout`).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        cohort: pd.DataFrame,
        members: list[tuple[str, str]],
        workdir: Path | None = None,
    ) -> None:
        self.config = config
        self.cohort = cohort
        # What reading a BIDS cohort skipped or chose (set by from_config; printed at planning).
        self.notes = CohortNotes()
        # Why the cohort chose the reference (``contrasts.reference: auto`` without T1w scans).
        self.reference_note: str | None = None
        self.workdir = workdir
        self.out = config["outdir"]
        self.scans = list(zip(cohort["subject"], cohort["session"], strict=True))
        # The session's reference contrast: the scan every other one is aligned to.
        self.reference = reference_of(
            config, [{c for c in SCAN_COLUMNS if row.get(c)} for row in cohort.to_dict("records")]
        )
        self.ref_label = layout.TRANSFORM_LABELS[self.reference]
        # The template is a T1w (MNI152, or a user's T1w): another reference is registered to it
        # by the engine's contrast-independent path.
        self.cross_contrast = self.reference not in T1_LIKE
        # The per-scan rules' session placeholder: "" (no ses- level) in a cohort without sessions.
        if len({bool(t) for _, t in self.scans}) > 1:  # validate_cohort names such scans ses-1
            raise AtlasflowError("the cohort mixes scans with and without a session")
        self.session_wildcard = "{session}" if any(t for _, t in self.scans) else ""
        # Rows by (subject, session): input functions look a row up per job, so a table scan per
        # lookup would make planning quadratic in the cohort size.
        self.rows = {(r["subject"], r["session"]): r for r in cohort.to_dict("records")}
        self._check_reference(config)
        ordered = session_order(cohort)
        self.sessions = {s: list(g["session"]) for s, g in ordered.groupby("subject", sort=True)}
        self.baseline = {s: sessions[0] for s, sessions in self.sessions.items()}
        self.longitudinal_subjects = [s for s, t in self.sessions.items() if len(t) > 1]
        # registration and atlas settings
        self.reg = config["registration"]
        self.atl = config["atlas"]
        self.members = members
        self.n_iter = self.atl["iterations"]
        self.finetune = self.reg["backend"] == "deep" and self.atl["finetune_steps"] > 0
        # Deep backend: each iteration continues every member's velocity of the previous one.
        self.carry = self.reg["backend"] == "deep" and self.atl["carry_velocity"]
        self.contrasts = ContrastPlan(self)

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], workdir: Path, check_data: bool = True
    ) -> WorkflowPlan:
        """Validate the cohort of ``config`` (:class:`~atlasflow.errors.AtlasflowError` naming the
        row or file) and choose the atlas members."""
        notes = CohortNotes()
        # ``contrasts.reference: auto`` is settled before the cohort is read: it says which scan
        # makes a BIDS session a row.
        reference, why = choose_reference(
            cohort_source(config, workdir), (config.get("contrasts") or {}).get("reference")
        )
        config = {**config, "contrasts": {**(config.get("contrasts") or {}), "reference": reference}}
        cohort = resolve_cohort(config, workdir=workdir, check_data=check_data, notes=notes)
        members = atlas_members(cohort, config["atlas"]["min_subjects"])
        plan = cls(config, cohort, members, workdir)
        plan.notes = notes
        plan.reference_note = why
        return plan

    def _check_reference(self, config: Mapping[str, Any]) -> None:
        """Every scan has the reference contrast (validation says so for a user's cohort, naming
        each row; this catches the demo cohort), and the atlas does not start from a template of
        another contrast."""
        lacking = [
            layout.scan_id(s, t) for s, t in self.scans if not self.has(s, t, self.reference)
        ]
        if lacking:
            shown = ", ".join(lacking[:5]) + (
                f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
            )
            raise AtlasflowError(
                f"contrasts.reference is {self.reference}, but {len(lacking)} scan(s) have no "
                f"{self.reference}: {shown} (the demo cohort: add it to demo.contrasts)"
            )
        if self.cross_contrast and config["atlas"]["init"] == "template":
            raise AtlasflowError(
                f"atlas.init: template starts the atlas from the T1w template, but "
                f"contrasts.reference is {self.reference}: use atlas.init: mean (the affine mean of "
                f"the {self.reference} scans)"
            )

    def cohort_settings(self) -> dict[str, Any]:
        """The settings the cohort table is read with (``cohort``, ``demo``, ``bids``, and the
        reference contrast when it is not the T1w, so a T1w-anchored run's record reads as before)."""
        settings = {k: self.config.get(k) for k in ("cohort", "demo", "bids")}
        if self.reference != layout.DEFAULT_REFERENCE:
            settings["contrasts"] = {"reference": self.reference}
        return settings

    def skipped_digest(self) -> str:
        """SHA-256 of the inputs skipped or passed over when the cohort was read (the
        ``skipped_inputs`` rule's param: it reruns when the list changes)."""
        text = "\n".join("\t".join(row) for row in self.notes.skipped_rows())
        return hashlib.sha256(text.encode()).hexdigest()

    # --- one scan

    @staticmethod
    def session_of(wildcards: Any) -> str:
        """A per-scan job's session: its ``{session}`` wildcard, "" in a cohort without sessions."""
        return getattr(wildcards, "session", "")

    def row(self, wildcards: Any) -> dict[str, str]:
        """The manifest row of one scan (a dict: column -> string)."""
        return self.rows[(wildcards.subject, self.session_of(wildcards))]

    def optional(self, wildcards: Any, column: str) -> list[str]:
        value = self.row(wildcards).get(column)
        return [value] if isinstance(value, str) and value else []

    def has(self, subject: str, session: str, column: str) -> bool:
        value = self.rows[(subject, session)].get(column)
        return isinstance(value, str) and bool(value)

    def anat(
        self, suffix: str, subject: str = "{subject}", session: str | None = None, **entities: Any
    ) -> str:
        """A scan's file, e.g. ``anat("T1w", desc="preproc")`` (:func:`atlasflow.layout.anat`);
        the session defaults to the rules' placeholder (:attr:`session_wildcard`)."""
        session = self.session_wildcard if session is None else session
        return layout.anat(self.out, suffix, subject, session, **entities)

    def ref(self, subject: str = "{subject}", session: str | None = None, **entities: Any) -> str:
        """A file of the scan's reference contrast, e.g. ``ref(desc="preproc")``
        (``..._desc-preproc_T1w.nii.gz``; ``..._desc-preproc_FLAIR.nii.gz`` with the FLAIR as
        reference; :func:`atlasflow.layout.contrast`)."""
        session = self.session_wildcard if session is None else session
        return layout.contrast(self.out, self.reference, subject, session, **entities)

    @property
    def atlas(self) -> str:
        """The final atlas, in the reference contrast (``atlas/atlas_T1w.nii.gz``)."""
        return layout.atlas_reference(self.out, self.reference)

    def iteration_template(self, iteration: int | str) -> str:
        """An atlas iteration's template (``atlas/iter-{i}/template_T1w.nii.gz``)."""
        return layout.iteration_template(self.out, iteration, self.reference)

    @property
    def scan_stem(self) -> str:
        """A per-scan job's name stem: ``sub-{subject}_ses-{session}`` (``sub-{subject}`` without
        sessions)."""
        return layout.scan_id("{subject}", self.session_wildcard)

    def log(self, step: str, ext: str = "log") -> str:
        """A per-scan job's log (the reports find a scan's failed job by this name)."""
        return layout.job_log(self.out, step, self.scan_stem, ext=ext)

    def bench(self, step: str) -> str:
        return layout.job_benchmark(self.out, step, self.scan_stem)

    # --- inputs of the cohort-wide rules

    def template_files(self, wildcards: Any = None) -> dict[str, str]:
        """A template (and mask) given as NIfTI paths: inputs, so edits rerun it and enter the cache key."""
        files = {}
        if self.config["template"] != "mni152":
            files["source"] = self.config["template"]
        if self.config["template_mask"]:
            files["source_mask"] = self.config["template_mask"]
        return files

    def cohort_images(self) -> list[str]:
        """Every image file of the cohort (for the demo: what its rule writes, so jobs depend on it)."""
        return image_files(self.cohort)

    def cohort_files(self) -> list[str]:
        """Every file the cohort is read from: its images and masks, and the manifest when it is a CSV."""
        files = self.cohort_images()
        source = cohort_source(dict(self.config), self.workdir)
        if source is not None and source.is_file():
            files.append(str(source))
        return files

    def all_targets(self) -> list[str]:
        """Every preprocessed scan, its registrations to the template and the atlas, and the atlas."""
        out, has, anat, ref = self.out, self.has, self.anat, self.ref
        targets = [
            layout.template(out),
            self.atlas,
            layout.atlas_metrics(out),
            layout.provenance(out),
            layout.dataset_description(out),
            layout.skipped_inputs(out),
            *self.longitudinal_targets(),
            *self.contrasts.targets(),
        ]
        if any(has(s, t, "labels") for s, t in self.members):
            targets.append(layout.atlas_dseg(out))
        for subject, session in self.scans:
            targets.append(ref(subject, session, space="atlas"))
            if has(subject, session, "labels"):
                targets.append(anat("dseg", subject, session, space="atlas"))
            targets.append(ref(subject, session, desc="preproc"))
            targets.append(ref(subject, session, space="template", desc="warped"))
            targets.append(self.qc_json("template", subject, session))
            if has(subject, session, "labels"):
                targets.append(anat("dseg", subject, session, space="template"))
        return targets

    # --- preprocessing

    def mask_inputs(self, wildcards: Any) -> dict[str, Any]:
        """What the brain mask is derived from (config, manifest), + the tumour: a tumour is brain."""
        mode = self.config["preprocess"]["brain_mask"]
        given = self.optional(wildcards, "brain_mask")
        labels = self.optional(wildcards, "labels")
        extra = {"lesion": lesion} if (lesion := self.optional(wildcards, "tumor_mask")) else {}
        if mode in ("auto", "given") and given:
            return {"given": given, **extra}
        if mode in ("auto", "labels") and labels:
            return {"labels": labels, **extra}
        # The template's brain is deformed onto the scan by the shipped networks: new weights
        # redo the masks.
        return {
            "template": layout.template(self.out),
            "template_mask": layout.template_mask(self.out),
            "model": [str(SHIPPED_MODEL)],
            **extra,
        }

    @staticmethod
    def mask_args(wildcards: Any, input: Any) -> str:
        """The brain-mask command's flags for the inputs :meth:`mask_inputs` chose."""
        return " ".join(f"{_MASK_FLAGS[k]} {input[k]}" for k in _MASK_FLAGS if k in input.keys())

    # --- registration

    def model_input(self, wildcards: Any = None) -> list[str]:
        """The weights the deep backend loads: an input, so that registrations rerun when they change."""
        if self.reg["model"]:
            return [self.reg["model"]]
        return [str(SHIPPED_MODEL)] if self.reg["backend"] == "deep" else []

    def registration_options(self, wildcards: Any, stage: str = "register") -> str:
        """The engine flags the registrations of ``stage`` pass (register, atlas_init, atlas or
        longitudinal), rendered from the config by :mod:`atlasflow.registration.options`.

        A function of the wildcards only: Snakemake compares such params with the last run's when
        it plans, so a changed setting reruns the registrations (params that take `input` are not).
        """
        return workflow_flags(self.config, stage)

    def template_registration_options(self, wildcards: Any) -> str:
        """Registration to the (T1w) template: the engine flags, and ``--cross-contrast`` (the
        engine's contrast-independent start, mutual information) when the reference is not T1-like."""
        return self.registration_options(wildcards) + (
            " --cross-contrast" if self.cross_contrast else ""
        )

    def atlas_registration_options(self, wildcards: Any) -> str:
        """Atlas iterations: the shared engine flags with the atlas stage's own step budgets."""
        return self.registration_options(wildcards, "atlas")

    def longitudinal_options(self, wildcards: Any) -> str:
        """Follow-up -> baseline: the shared engine flags with the longitudinal stage's own settings."""
        return self.registration_options(wildcards, "longitudinal")

    def qc_options(self, wildcards: Any) -> str:
        qc = self.config["qc"]
        return f"--max-folding {qc['max_folding_fraction']} --min-ncc {qc['min_ncc_after']}"

    def registration_inputs(self, fixed: str) -> dict[str, Any]:
        """What registering a scan to ``fixed`` reads: the scan's preprocessed reference image and
        brain mask, the template's brain mask and the weights."""
        return {
            "fixed": fixed,
            "fixed_mask": layout.template_mask(self.out),
            "moving": self.ref(desc="preproc"),
            "moving_mask": self.anat("mask", desc="brain"),
            "model": self.model_input,
        }

    def xfm(
        self, to: str, subject: str = "{subject}", session: str | None = None
    ) -> dict[str, str]:
        """A scan's ITK affine and displacement field to space ``to`` (as named inputs or outputs)."""
        return {
            "affine": self.anat(
                "xfm", subject, session, from_=self.ref_label, to=to, mode="image", ext="mat"
            ),
            "warp": self.anat("xfm", subject, session, from_=self.ref_label, to=to, mode="image"),
        }

    def registration_outputs(
        self, to: str, warped: str, subject: str = "{subject}", session: str | None = None
    ) -> dict[str, str]:
        """What registering a scan to space ``to`` writes: the scan there (``warped``), the
        transforms both ways and the QC metrics."""
        return {
            "warped": warped,
            **self.xfm(to, subject, session),
            "inverse_warp": self.anat(
                "xfm", subject, session, from_=to, to=self.ref_label, mode="image"
            ),
            "metrics": self.qc_json(to, subject, session),
        }

    @property
    def batch_atlas_registrations(self) -> bool:
        """Whether the members go to the final atlas in one job (register_atlas_members), each
        from its last atlas iteration: with carried velocities (deep backend) and an iteration."""
        return self.carry and self.n_iter >= 1 and bool(self.members)

    def member_atlas_registrations(self) -> dict[str, list[str]]:
        """The members' registrations to the final atlas, per kind of file (register_atlas's
        outputs), in member order."""
        out: dict[str, list[str]] = {}
        for s, t in self.members:
            files = self.registration_outputs("atlas", self.ref(s, t, space="atlas"), s, t)
            for key, path in files.items():
                out.setdefault(key, []).append(path)
        return out

    def qc_json(self, to: str, subject: str = "{subject}", session: str | None = None) -> str:
        """A registration's QC metrics (JSON)."""
        return self.anat(
            "xfm",
            subject,
            session,
            from_=self.ref_label,
            to=to,
            mode="image",
            desc="qc",
            ext="json",
        )

    # --- atlas

    @property
    def finetuned_model(self) -> str:
        return layout.finetuned_model(self.out)

    def atlas_model_input(self, wildcards: Any) -> list[str]:
        """The atlas iterations' weights: the cohort-fine-tuned ones when atlas.finetune_steps > 0."""
        return [self.finetuned_model] if self.finetune else self.model_input(wildcards)

    @property
    def min_members(self) -> str:
        """Under on_scan_error: skip, the atlas averages need this many members whose scans succeeded."""
        return f"--min-inputs {self.atl['min_subjects']} --min-inputs-setting atlas.min_subjects"

    # Each atlas rule's settings (a plain param: compared with the last run's, so a changed setting
    # reruns the rule) beside the flags its command gets from them: a new option goes into both.

    @property
    def atlas_init_settings(self) -> str:
        cross = " cross-contrast" if self.cross_contrast else ""
        return f"init {self.atl['init']} {self.registration_options(None, 'atlas_init')}{cross}"

    def atlas_init_flags(self) -> list[Any]:
        """The members' affines to the (T1w) template: contrast-independent when the reference
        is not T1-like, as :meth:`template_registration_options`."""
        return [
            "--init",
            self.atl["init"],
            *self.registration_options(None, "atlas_init").split(),
            *(["--cross-contrast"] if self.cross_contrast else []),
            *self.min_members.split(),
        ]

    @property
    def atlas_finetune_settings(self) -> str:
        return f"steps {self.atl['finetune_steps']} seed {self.reg['seed']}"

    def atlas_finetune_flags(self) -> list[Any]:
        return ["--steps", self.atl["finetune_steps"], "--seed", self.reg["seed"]]

    @property
    def atlas_iteration_settings(self) -> str:
        atl = self.atl
        return (
            f"{self.atlas_registration_options(None)} gradient_step {atl['gradient_step']} "
            f"sharpen {atl['sharpen']} carry {self.carry}"
        )

    def atlas_iteration_flags(self) -> list[Any]:
        return [
            *self.atlas_registration_options(None).split(),
            *(["--model", self.finetuned_model] if self.finetune else []),
            "--gradient-step",
            self.atl["gradient_step"],
            *([] if self.atl["sharpen"] else ["--no-sharpen"]),
            *self.min_members.split(),
        ]

    def member_images(self) -> list[str]:
        return [self.ref(s, t, desc="preproc") for s, t in self.members]

    def member_masks(self) -> list[str]:
        return [self.anat("mask", s, t, desc="brain") for s, t in self.members]

    def member_affines(self) -> list[str]:
        """Each member's affine to the reference template, found by atlas_init; every iteration starts from it."""
        return [
            layout.iteration_file(self.out, 0, layout.member_affine(s, t, self.reference))
            for s, t in self.members
        ]

    def iteration_velocities(self, iteration: int | str) -> list[str]:
        """The members' velocities of an iteration (coarse grid), in member order."""
        return [
            layout.iteration_file(self.out, iteration, layout.member_velocity(s, t))
            for s, t in self.members
        ]

    def iteration_mean_velocity(self, iteration: int | str) -> str:
        return layout.iteration_file(self.out, iteration, layout.MEAN_VELOCITY)

    def carried_velocities(self, wildcards: Any) -> dict[str, Any]:
        """What iteration i continues from: iteration i-1's member and mean velocities (none for i = 1)."""
        previous = int(wildcards.iteration) - 1
        if not self.carry or previous < 1:
            return {}
        return {
            "velocities": self.iteration_velocities(previous),
            "mean_velocity": self.iteration_mean_velocity(previous),
        }

    def previous_template(self, wildcards: Any) -> str:
        return self.iteration_template(int(wildcards.iteration) - 1)

    def member_labels(self) -> list[str]:
        """The members' label maps in atlas space (the atlas label vote's inputs)."""
        return [
            self.anat("dseg", s, t, space="atlas")
            for s, t in self.members
            if self.has(s, t, "labels")
        ]

    # --- reports

    @property
    def qc_flags(self) -> str:
        qc = self.config["qc"]
        return (
            f"--max-folding-fraction {qc['max_folding_fraction']} --min-ncc-after {qc['min_ncc_after']} "
            f"--min-dice {qc.get('min_dice', 0.5)}"
        )

    @property
    def scan_list(self) -> str:
        """Every scan as ``subject:session`` (``subject:`` without a session), subjects sorted,
        sessions in acquisition order."""
        return " ".join(f"{s}:{t}" for s, sessions in self.sessions.items() for t in sessions)

    def subject_report_files(self, wildcards: Any) -> list[str]:
        subject = wildcards.subject
        sessions = self.sessions[subject]
        return subject_report_inputs(
            self.out,
            subject,
            sessions,
            baseline=self.baseline[subject],
            labels=[t for t in sessions if self.has(subject, t, "labels")],
            tumour=[t for t in sessions if self.has(subject, t, "tumor_mask")],
            contrasts=self.contrasts.of_subject(subject),
            reference=self.reference,
        ) + [self.rows[(subject, t)][self.reference] for t in sessions]

    def subject_sessions(self, wildcards: Any) -> str:
        """The subject's sessions as words of the command line (a scan without a session: ``''``)."""
        return " ".join(shlex.quote(t) for t in self.sessions[wildcards.subject])

    def subject_baseline(self, wildcards: Any) -> str:
        return shlex.quote(self.baseline[wildcards.subject])

    def raw_scans(self, wildcards: Any) -> str:
        """``session=path`` of each of the subject's sessions' reference scan as given (the report
        shows the raw scans)."""
        subject = wildcards.subject
        return " ".join(
            f"{t}={self.rows[(subject, t)][self.reference]}" for t in self.sessions[subject]
        )

    @property
    def reference_flag(self) -> str:
        """`` --reference C`` for the report commands when the reference is not the T1w ('' when
        it is, so the T1w-anchored commands read as before; it follows the flags it is put after)."""
        return (
            "" if self.reference == layout.DEFAULT_REFERENCE else f" --reference {self.reference}"
        )

    def cohort_report_inputs(self) -> list[str]:
        return cohort_report_inputs(
            self.out,
            self.n_iter,
            tumour=bool(self.tumor_frequency_inputs()),
            contrasts=[c for c in self.contrasts.used if self.contrasts.members_with(c)],
            reference=self.reference,
        )
