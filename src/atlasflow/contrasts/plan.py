"""What the workflow plans for a session's other contrasts: their files, rule inputs and targets.

The session's reference contrast (config ``contrasts.reference``: the T1w by default) is the
scan the workflow preprocesses and registers; every other contrast of the session, the T1w
included when another contrast is the reference, is aligned to it. Per contrast ``c`` of a scan
(``workflow/rules/contrasts.smk``, one set of rules per contrast), R the reference:

- ``align_c``: bias-corrected, aligned to the session's reference, normalised: the brain on its
  own grid (``space-orig_desc-preproc``), on the reference's working grid (``desc-preproc``), the
  transform ``from-<c>_to-<R>`` and its QC;
- ``c_to_template`` / ``c_to_atlas``: the own-grid image in template / atlas space through the
  reference's transform composed with the session alignment (one interpolation);
- ``atlas_c``: the mean of the atlas members' images in atlas space;
- ``c_change`` (follow-ups whose baseline has ``c``): the follow-up in baseline space (its T1w
  registrations composed, then refined on the two scans of ``c``) and its difference to the
  baseline; ``c_change_to_atlas``: that difference in atlas space. (The reference's
  registrations are composed, then refined on the two scans of ``c``.)

Torch-free: Snakemake imports it when it parses the workflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from atlasflow import layout
from atlasflow.contrasts.qc import MAX_SESSION_SHIFT_MM, MIN_SESSION_NMI

#: The contrasts beside the T1w, in the cohort's column order (``cohort.columns.CONTRAST_COLUMNS``,
#: spelled from the layout here: the report inputs import this module and stay free of pandas).
CONTRAST_COLUMNS = tuple(c for c in layout.CONTRASTS if c != "t1w")
#: Each contrast's name in ``from-``/``to-`` transform entities (letters and digits only).
TRANSFORM_LABELS = layout.TRANSFORM_LABELS
#: References whose images look like the T1w template's (MNI152): registered to it as one
#: contrast. Any other reference goes the engine's contrast-independent way (``--cross-contrast``).
T1_LIKE = ("t1w", "t1ce")


def reference_of(config: Mapping[str, Any], sessions: list[set[str]] | None = None) -> str:
    """The session's reference contrast (``contrasts.reference``). ``auto`` (the default) is the
    T1w, or, given the scan columns each session has and none has a T1w, the contrast most of
    them have (:func:`atlasflow.cohort.columns.auto_reference`)."""
    configured = (config.get("contrasts") or {}).get("reference")
    if configured and configured != "auto":
        return configured
    if sessions is None:
        return layout.DEFAULT_REFERENCE
    from atlasflow.cohort.columns import auto_reference

    return auto_reference(sessions)


def used_contrasts(
    config: Mapping[str, Any], present: set[str], reference: str = layout.DEFAULT_REFERENCE
) -> list[str]:
    """The contrasts the workflow aligns to the reference: configured (``contrasts.use``), in the
    cohort and not the reference itself, in the cohort's column order."""
    wanted = (config.get("contrasts") or {}).get("use", list(layout.CONTRASTS))
    return [c for c in layout.CONTRASTS if c != reference and c in wanted and c in present]


class ContrastFiles:
    """The files of the contrast rules of one output folder (wildcards pass through). A session
    not given is ``session`` (the rules' placeholder: ``"{session}"``, or ``""`` for a cohort
    without sessions); ``reference`` is the contrast every other one is aligned to."""

    def __init__(
        self, out: str, session: str = "{session}", reference: str = layout.DEFAULT_REFERENCE
    ) -> None:
        self.out = out
        self.session = session
        self.reference = reference

    def image(
        self, c: str, subject: str = "{subject}", session: str | None = None, **entities: Any
    ) -> str:
        session = self.session if session is None else session
        return layout.contrast(self.out, c, subject, session, **entities)

    def native(self, c: str, subject: str = "{subject}", session: str | None = None) -> str:
        """The normalised brain on the contrast's own grid: what every space is resampled from."""
        return self.image(c, subject, session, space="orig", desc="preproc")

    def preproc(self, c: str, subject: str = "{subject}", session: str | None = None) -> str:
        """The contrast on its session's reference working grid (the baseline space of a baseline)."""
        return self.image(c, subject, session, desc="preproc")

    def _to_reference(self, c: str, subject: str, session: str | None, **entities: str) -> str:
        """A file of contrast ``c``'s alignment to the session's reference."""
        return layout.anat(
            self.out,
            "xfm",
            subject,
            self.session if session is None else session,
            from_=TRANSFORM_LABELS[c],
            to=TRANSFORM_LABELS[self.reference],
            mode="image",
            **entities,
        )

    def session_affine(self, c: str, subject: str = "{subject}", session: str | None = None) -> str:
        return self._to_reference(c, subject, session, ext="mat")

    def session_qc(self, c: str, subject: str = "{subject}", session: str | None = None) -> str:
        return self._to_reference(c, subject, session, desc="qc", ext="json")

    def in_space(
        self, c: str, space: str, subject: str = "{subject}", session: str | None = None
    ) -> str:
        """The contrast in template, atlas or baseline space (atlas: named as the reference's, no desc)."""
        if space == "atlas":
            return self.image(c, subject, session, space="atlas")
        return self.image(c, subject, session, space=space, desc="warped")

    def difference(
        self, c: str, space: str, subject: str = "{subject}", session: str | None = None
    ) -> str:
        return self.image(c, subject, session, space=space, desc="difference")


class ContrastPlan:
    """The multi-contrast part of :class:`atlasflow.workflow_plan.WorkflowPlan`."""

    def __init__(self, plan: Any) -> None:
        self.plan = plan
        self.reference = plan.reference
        self.files = ContrastFiles(plan.out, plan.session_wildcard, plan.reference)
        present = {c for c in layout.CONTRASTS if c in plan.cohort and any(plan.cohort[c])}
        self.used = used_contrasts(plan.config, present, plan.reference)
        settings = plan.config.get("contrasts") or {}
        self.dof = settings.get("align", "rigid")
        self.min_nmi = settings.get("min_nmi", MIN_SESSION_NMI)
        self.max_shift_mm = settings.get("max_shift_mm", MAX_SESSION_SHIFT_MM)
        self.change = settings.get("change", "affine")

    # --- per scan

    def align_flags(self) -> str:
        return f"--dof {self.dof} --min-nmi {self.min_nmi} --max-shift-mm {self.max_shift_mm}"

    def scans_with(self, c: str) -> list[tuple[str, str]]:
        return [(s, t) for s, t in self.plan.scans if self.plan.has(s, t, c)]

    def members_with(self, c: str) -> list[tuple[str, str]]:
        return [(s, t) for s, t in self.plan.members if self.plan.has(s, t, c)]

    def changes_with(self, c: str) -> list[tuple[str, str]]:
        """(subject, follow-up session) pairs whose follow-up and baseline both have ``c``."""
        plan = self.plan
        return [
            (s, t)
            for s in plan.longitudinal_subjects
            if plan.has(s, plan.baseline[s], c)
            for t in plan.sessions[s][1:]
            if plan.has(s, t, c)
        ]

    def member_images(self, c: str) -> list[str]:
        return [self.files.in_space(c, "atlas", s, t) for s, t in self.members_with(c)]

    def baseline_file(self, c: str, kind: str) -> Any:
        """An input function: a file of the subject's baseline contrast (``kind`` a
        :class:`ContrastFiles` method: preproc, native, session_affine)."""
        method = getattr(self.files, kind)
        return lambda wc: method(c, wc.subject, self.plan.baseline[wc.subject])

    # --- reports

    def of_subject(self, subject: str) -> dict[str, list[str]]:
        """Session -> the contrasts processed for it (sessions with none left out)."""
        plan = self.plan
        found = {
            t: [c for c in self.used if plan.has(subject, t, c)] for t in plan.sessions[subject]
        }
        return {t: cs for t, cs in found.items() if cs}

    def report_flags(self, wildcards: Any) -> str:
        """``--contrasts SESSION=c,...`` of the subject report (``=c,...`` for a scan without a
        session; '' for a T1w-only subject, so a T1w-only cohort's report command is what it was)."""
        found = self.of_subject(wildcards.subject)
        if not found:
            return ""
        return "--contrasts " + " ".join(f"{t}={','.join(cs)}" for t, cs in found.items())

    # --- targets

    def targets(self) -> list[str]:
        files, out = self.files, []
        for c in self.used:
            for s, t in self.scans_with(c):
                out += [
                    files.preproc(c, s, t),
                    files.session_qc(c, s, t),
                    files.in_space(c, "template", s, t),
                    files.in_space(c, "atlas", s, t),
                ]
            if self.members_with(c):
                out.append(layout.atlas_contrast(self.plan.out, c))
            for s, t in self.changes_with(c):
                out += [files.difference(c, "baseline", s, t), files.difference(c, "atlas", s, t)]
        return out

    # --- masks drawn on another contrast's grid

    def mask_grid_inputs(self, wildcards: Any) -> dict[str, str]:
        """What carrying a scan's tumour/lesion mask reads beside it: the reference scan as given
        (input ``t1w``, flag ``--t1w``: the names of the T1w-anchored workflow, kept so its
        commands do not change) and each other contrast as given with its session alignment (the
        mask may be on any of their grids)."""
        row = self.plan.row(wildcards)
        inputs: dict[str, str] = {}
        for c in self.used:
            if row.get(c):
                inputs[f"grid_{c}"] = row[c]
                inputs[f"xfm_{c}"] = self.files.session_affine(
                    c, wildcards.subject, self.plan.session_of(wildcards)
                )
        if inputs:
            inputs["t1w"] = row[self.reference]
        return inputs

    @staticmethod
    def mask_grid_flags(wildcards: Any, input: Any) -> str:
        keys = list(input.keys())
        if "t1w" not in keys:
            return ""
        grids = [k[5:] for k in keys if k.startswith("grid_")]
        return f"--t1w {input.t1w} " + " ".join(
            f"--contrast-grid {input['grid_' + c]} {input['xfm_' + c]}" for c in grids
        )
