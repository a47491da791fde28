"""What the workflow plans for follow-up scans: the longitudinal rules' inputs, flags and targets.

A part of :class:`atlasflow.workflow_plan.WorkflowPlan` (its base class, so the rules keep
calling ``PLAN.longitudinal_inputs`` and the rest): every follow-up registered to its subject's
baseline, tumour tables, change maps carried into atlas space, the tumour-frequency map. The
scans' own files are those of the session's reference contrast (``ref``; the T1w by default).

Torch-free: Snakemake imports it when it parses the workflow.
"""

from __future__ import annotations

from typing import Any

from atlasflow import layout
from atlasflow.longitudinal.compartments import TumourLabels


class LongitudinalPlan:
    """The longitudinal part of the workflow plan. It reads what
    :class:`~atlasflow.workflow_plan.WorkflowPlan` sets up: ``out``, ``rows``, ``sessions``,
    ``baseline``, ``longitudinal_subjects``, ``reference`` and the path helpers ``anat``, ``ref``,
    ``xfm``, ``qc_json``, ``has``."""

    out: str
    reference: str
    rows: dict[tuple[str, str], dict[str, str]]
    sessions: dict[str, list[str]]
    baseline: dict[str, str]
    longitudinal_subjects: list[str]

    @property
    def change_maps(self) -> tuple[str, ...]:
        """The change maps carried into atlas space (the ``{change}`` of ``change_map_to_atlas``):
        log-Jacobian, displacement, the tumour mask. The reference contrast's difference has its
        own rule (``difference_to_atlas``): the entity of a post-contrast reference (``ce-``)
        comes before ``space-`` in its name, which a file-name tail cannot express."""
        return (
            layout.name_tail("map", desc="logjacobian"),
            layout.name_tail("map", desc="displacement"),
            layout.name_tail("mask", label="tumor"),
        )

    def longitudinal_inputs(self, wildcards: Any) -> dict[str, str]:
        subject, session = wildcards.subject, self.session_of(wildcards)
        base = self.baseline[subject]
        inputs = {
            "baseline": self.ref(subject, base, desc="preproc"),
            "baseline_mask": self.anat("mask", subject, base, desc="brain"),
            "followup": self.ref(subject, session, desc="preproc"),
            "followup_mask": self.anat("mask", subject, session, desc="brain"),
        }
        if self.has(subject, base, "tumor_mask"):
            inputs["baseline_tumor"] = self.anat(
                "mask", subject, base, label="tumor", desc="preproc"
            )
        if self.has(subject, session, "tumor_mask"):
            inputs["followup_tumor"] = self.anat(
                "mask", subject, session, label="tumor", desc="preproc"
            )
        return inputs

    @staticmethod
    def tumor_flags(wildcards: Any, input: Any) -> str:
        """The pair's tumour masks, excluded from the similarity where given."""
        return " ".join(
            f"--{k.replace('_', '-')} {input[k]}"
            for k in ("baseline_tumor", "followup_tumor")
            if k in input.keys()
        )

    def baseline_file(self, suffix: str | None = None, **entities: Any) -> Any:
        """An input function: the file of the subject's baseline scan (``anat`` entities; suffix
        None: the reference contrast's image)."""
        if suffix is None:
            return lambda wc: self.ref(wc.subject, self.baseline[wc.subject], **entities)
        return lambda wc: self.anat(suffix, wc.subject, self.baseline[wc.subject], **entities)

    def baseline_xfm(self, to: str) -> dict[str, Any]:
        """The baseline scan's ITK affine and displacement field to ``to``, as input functions."""
        return {
            key: (lambda wc, key=key: self.xfm(to, wc.subject, self.baseline[wc.subject])[key])
            for key in ("affine", "warp")
        }

    def tumor_masks(self, wildcards: Any) -> list[str]:
        """The subject's tumour masks as given in the manifest, in session order."""
        subject = wildcards.subject
        return [
            self.rows[(subject, t)]["tumor_mask"]
            for t in self.sessions[subject]
            if self.has(subject, t, "tumor_mask")
        ]

    def followup_metrics(self, wildcards: Any) -> list[str]:
        """The QC metrics of the subject's follow-up -> baseline registrations."""
        return [
            self.qc_json("baseline", wildcards.subject, t)
            for t in self.sessions[wildcards.subject][1:]
        ]

    def tumor_table_sessions(self, wildcards: Any) -> str:
        """``--session ID DATE MASK`` per session (``-`` for what the manifest leaves empty)."""
        subject = wildcards.subject
        return " ".join(
            f"--session {t} {self.rows[(subject, t)]['acq_date'] or '-'} {self.rows[(subject, t)]['tumor_mask'] or '-'}"
            for t in self.sessions[subject]
        )

    def tumor_label_flags(self, wildcards: Any = None) -> str:
        """``--tumor-labels name=1,...``: the compartments of ``longitudinal.tumor_labels``."""
        return TumourLabels.of(self.config["longitudinal"].get("tumor_labels")).flags()

    def followups(self, wildcards: Any) -> str:
        return " ".join(self.sessions[wildcards.subject][1:])

    def atlas_tumor_mask(self, subject: str, session: str) -> str:
        """A session's tumour mask in atlas space (baselines directly, follow-ups through the baseline)."""
        if session == self.baseline[subject]:
            return self.anat(
                "mask", subject, session, space="atlas", label="tumor", desc="baseline"
            )
        return self.anat("mask", subject, session, space="atlas", label="tumor")

    def tumor_frequency_inputs(self, wildcards: Any = None) -> list[str]:
        masks = []
        for subject, sessions in self.sessions.items():
            with_mask = [t for t in sessions if self.has(subject, t, "tumor_mask")]
            if with_mask:
                masks.append(self.atlas_tumor_mask(subject, with_mask[-1]))
        return masks

    def longitudinal_targets(self) -> list[str]:
        targets = []
        for subject in self.longitudinal_subjects:
            targets.append(layout.tumor_table(self.out, subject))
            for session in self.sessions[subject][1:]:
                for desc in ("logjacobian", "displacement"):
                    targets.append(self.anat("map", subject, session, space="atlas", desc=desc))
                targets.append(self.ref(subject, session, space="atlas", desc="difference"))
                if self.has(subject, session, "tumor_mask"):
                    targets.append(self.atlas_tumor_mask(subject, session))
        if self.tumor_frequency_inputs():
            targets.append(layout.tumor_frequency(self.out))
        return targets
