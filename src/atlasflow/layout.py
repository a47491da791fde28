"""Output layout: the name of every file the workflow writes, spelled once.

Names follow BIDS derivatives: a scan's files live in ``OUT/sub-S/ses-T/anat/`` and are called
``sub-S_ses-T[_space-X][_from-A_to-B_mode-image][_label-L][_desc-D]_<suffix>.<ext>``; the cohort's
files (template, atlas iterations, tumour frequency, reports) have fixed places under ``OUT``.
The files of a session's reference contrast (config ``contrasts.reference``, the T1w by default:
the scan that is preprocessed, registered and built into the atlas) carry that contrast's name
(``desc-preproc_T1w``, or ``desc-preproc_FLAIR`` and ``atlas/atlas_FLAIR.nii.gz`` when the FLAIR
is the reference); the functions that name them take the reference column, ``t1w`` by default.
A scan without a session (session ``""``: a cohort whose input has no sessions) has neither the
``ses-T/`` folder nor the ``ses-T`` entity: ``OUT/sub-S/anat/sub-S_desc-preproc_T1w.nii.gz``, as
its input had them.

The workflow (``workflow/rules/common.smk``) builds its targets with the string functions here, the
reports find their inputs through :class:`Scan` and :class:`CohortFiles`, which call the same
functions. The string functions join with ``/`` exactly as given (``OUT`` is not normalised), so a
target names the same file Snakemake was told about; wildcards such as ``"{subject}"`` pass through.

Planning imports this module every time Snakemake parses the workflow: standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Order of the entities in a scan's file name (``from_`` stands for ``from``, a Python keyword).
ENTITIES = ("ce", "space", "from_", "to", "mode", "label", "desc")
#: The name of each contrast (a cohort column) in a scan's file names: its BIDS suffix and the
#: entities that go with it (a post-contrast T1w is ``ce-gadolinium_..._T1w``).
CONTRASTS: dict[str, tuple[str, dict[str, str]]] = {
    "t1w": ("T1w", {}),
    "t2w": ("T2w", {}),
    "flair": ("FLAIR", {}),
    "t1ce": ("T1w", {"ce": "gadolinium"}),
    "pdw": ("PDw", {}),
}
#: Each contrast's name in ``from-``/``to-`` transform entities (letters and digits only).
TRANSFORM_LABELS = {"t1w": "T1w", "t2w": "T2w", "flair": "FLAIR", "t1ce": "ceT1w", "pdw": "PDw"}
#: The session's reference contrast unless the config says otherwise (``contrasts.reference``).
DEFAULT_REFERENCE = "t1w"
# Registration stages, by the space they register into (the ``to-`` entity of their transforms).
STAGES = ("template", "atlas", "baseline")


# ------------------------------------------------------------------------------- one scan


def subject_id(subject: str) -> str:
    """``sub-S``: a subject's folder, and the stem of its per-subject files and logs."""
    return f"sub-{subject}"


def session_entity(session: str) -> str:
    """``ses-T``: a session's folder and the entity in its scans' names; "" without a session."""
    return f"ses-{session}" if session else ""


def scan_id(subject: str, session: str) -> str:
    """``sub-S_ses-T``: the stem of a scan's file names, its logs and its atlas member name
    (``sub-S`` for a scan without a session)."""
    return f"sub-{subject}_ses-{session}" if session else f"sub-{subject}"


def scan_dir(outdir: str | Path, subject: str, session: str) -> str:
    """``OUT/sub-S/ses-T/anat``: the folder of a scan's files (``OUT/sub-S/anat`` without a session)."""
    if session:
        return f"{outdir}/sub-{subject}/ses-{session}/anat"
    return f"{outdir}/sub-{subject}/anat"


def anat(
    outdir: str | Path,
    suffix: str,
    subject: str,
    session: str,
    ext: str = "nii.gz",
    **entities: object,
) -> str:
    """Path of one scan's file, e.g. ``anat("results", "T1w", "01", "1", desc="preproc")``
    (``results/sub-01/ses-1/anat/sub-01_ses-1_desc-preproc_T1w.nii.gz``; with session ``""``,
    ``results/sub-01/anat/sub-01_desc-preproc_T1w.nii.gz``).

    Entities are written in :data:`ENTITIES` order whatever the order given; others are ignored.
    """
    stem = scan_id(subject, session)
    return f"{scan_dir(outdir, subject, session)}/{stem}_{name_tail(suffix, **entities)}.{ext}"


def contrast(
    outdir: str | Path,
    column: str,
    subject: str,
    session: str,
    ext: str = "nii.gz",
    **entities: object,
) -> str:
    """Path of one scan's file of contrast ``column`` (a :data:`CONTRASTS` key), e.g.
    ``contrast("results", "flair", "01", "1", desc="preproc")`` ends ``desc-preproc_FLAIR.nii.gz``."""
    suffix, own = CONTRASTS[column]
    return anat(outdir, suffix, subject, session, ext=ext, **own, **entities)


def name_tail(suffix: str, **entities: object) -> str:
    """The part of a scan's file name after ``sub-S_ses-T_``, without extension, e.g.
    ``name_tail("map", desc="logjacobian") == "desc-logjacobian_map"``."""
    parts = [f"{key.rstrip('_')}-{entities[key]}" for key in ENTITIES if key in entities]
    return "_".join([*parts, suffix])


def tumor_table(outdir: str | Path, subject: str) -> str:
    """A longitudinal subject's tumour volumes over time (one row per session)."""
    return f"{outdir}/{subject_id(subject)}/longitudinal/{subject_id(subject)}_tumor.tsv"


# ---------------------------------------------------------------------------- the cohort


def template(outdir: str | Path) -> str:
    """The reference template, resampled onto the working grid."""
    return f"{outdir}/template/template_T1w.nii.gz"


def template_mask(outdir: str | Path) -> str:
    return f"{outdir}/template/template_desc-brain_mask.nii.gz"


def provenance(outdir: str | Path) -> str:
    return f"{outdir}/provenance/provenance.json"


def skipped_inputs(outdir: str | Path) -> str:
    """The cohort's inputs that were skipped or passed over, with the reason (TSV)."""
    return f"{outdir}/provenance/skipped_inputs.tsv"


def dataset_description(outdir: str | Path) -> str:
    """The BIDS-derivatives description of the output folder."""
    return f"{outdir}/dataset_description.json"


def logs_dir(outdir: str | Path) -> str:
    """Every job's log, as ``logs/<step>/<scan id>.log`` (the reports read the errors there)."""
    return f"{outdir}/logs"


def benchmarks_dir(outdir: str | Path) -> str:
    return f"{outdir}/benchmarks"


def job_log(outdir: str | Path, *names: str, ext: str = "log") -> str:
    """A job's log: ``logs/<names joined by />.log``, e.g. ``job_log(out, "preprocess", scan_id(s, t))``."""
    return f"{logs_dir(outdir)}/{'/'.join(names)}.{ext}"


def job_benchmark(outdir: str | Path, *names: str) -> str:
    """A job's Snakemake benchmark table, named as its log (``benchmarks/<names>.tsv``)."""
    return f"{benchmarks_dir(outdir)}/{'/'.join(names)}.tsv"


def demo_manifest(demo_dir: str | Path) -> str:
    """The manifest of the demo cohort the ``demo_data`` rule writes."""
    return f"{demo_dir}/manifest.csv"


def atlas_dir(outdir: str | Path) -> str:
    return f"{outdir}/atlas"


def atlas_reference(outdir: str | Path, reference: str = DEFAULT_REFERENCE) -> str:
    """The final atlas (the last iteration's template), in the reference contrast:
    ``atlas/atlas_T1w.nii.gz`` (``atlas_FLAIR.nii.gz`` when the FLAIR is the reference)."""
    return atlas_contrast(outdir, reference)


def atlas_contrast(outdir: str | Path, column: str) -> str:
    """The atlas of one contrast: the members' images of it averaged in atlas space
    (``atlas_T1w`` for the T1w, ``atlas_FLAIR``, ``atlas_ce-gadolinium_T1w``, ...)."""
    suffix, own = CONTRASTS[column]
    return f"{atlas_dir(outdir)}/atlas_{name_tail(suffix, **own)}.nii.gz"


def atlas_dseg(outdir: str | Path) -> str:
    """The atlas label map, voted from the members' labels."""
    return f"{atlas_dir(outdir)}/atlas_dseg.nii.gz"


def atlas_probseg(outdir: str | Path) -> str:
    """The atlas label probabilities (one volume per label), beside the label map."""
    return f"{atlas_dir(outdir)}/atlas_probseg.nii.gz"


def atlas_metrics(outdir: str | Path) -> str:
    """Per-iteration convergence metrics of the atlas."""
    return f"{atlas_dir(outdir)}/metrics.tsv"


def tumor_frequency(outdir: str | Path) -> str:
    """How often each atlas voxel is tumour over the cohort."""
    return f"{atlas_dir(outdir)}/tumor_frequency.nii.gz"


def finetuned_model(outdir: str | Path) -> str:
    """The velocity network fine-tuned on the cohort (atlas.finetune_steps > 0)."""
    return f"{atlas_dir(outdir)}/model/finetuned_velocity.safetensors"


def iteration_name(iteration: int | str) -> str:
    """``iter-{i}``: an atlas iteration's folder, and the name of its job's log."""
    return f"iter-{iteration}"


def iteration_file(outdir: str | Path, iteration: int | str, name: str) -> str:
    """A file of one atlas iteration (``iter-{i}``; the iteration may be a wildcard)."""
    return f"{atlas_dir(outdir)}/{iteration_name(iteration)}/{name}"


ITERATION_METRICS = "metrics.json"
ITERATION_MEMBERS = "members.tsv"


def iteration_template_name(reference: str = DEFAULT_REFERENCE) -> str:
    """File name of an iteration's template: ``template_T1w.nii.gz`` (``template_FLAIR.nii.gz``
    when the FLAIR is the reference)."""
    suffix, own = CONTRASTS[reference]
    return f"template_{name_tail(suffix, **own)}.nii.gz"


def iteration_template(
    outdir: str | Path, iteration: int | str, reference: str = DEFAULT_REFERENCE
) -> str:
    """An iteration's template (iteration 0: the affine mean or the reference template)."""
    return iteration_file(outdir, iteration, iteration_template_name(reference))


def iteration_metrics(outdir: str | Path, iteration: int | str) -> str:
    """An iteration's convergence metrics (JSON; gathered into :func:`atlas_metrics`)."""
    return iteration_file(outdir, iteration, ITERATION_METRICS)


def iteration_members(outdir: str | Path, iteration: int | str) -> str:
    """Per-member registration table of an iteration (which members succeeded)."""
    return iteration_file(outdir, iteration, ITERATION_MEMBERS)


MEAN_VELOCITY = "velocities/mean_velocity.nii"


def member_velocity(subject: str, session: str) -> str:
    """A member's velocity of an iteration (coarse grid), relative to the iteration's folder."""
    return f"velocities/{scan_id(subject, session)}_velocity.nii"


def member_affine(subject: str, session: str, reference: str = DEFAULT_REFERENCE) -> str:
    """A member's affine to the reference template, relative to iteration 0's folder."""
    label = TRANSFORM_LABELS[reference]
    return f"affines/{scan_id(subject, session)}_from-{label}_to-template_mode-image_xfm.mat"


# ------------------------------------------------------------------------------- reports


COHORT_PAGE = "cohort.html"


def reports_dir(outdir: str | Path) -> str:
    return f"{outdir}/reports"


def cohort_page(outdir: str | Path) -> str:
    """The cohort report."""
    return f"{reports_dir(outdir)}/{COHORT_PAGE}"


def subject_page(subject: str) -> str:
    """File name of a subject's HTML report (the cohort page links it by this name)."""
    return f"{subject_id(subject)}.html"


def subject_qc(subject: str) -> str:
    """File name of a subject's QC verdict, next to its page."""
    return f"{subject_id(subject)}_qc.json"


def subject_figures(subject: str) -> str:
    """Folder of a subject's figures as PNGs, relative to the reports folder."""
    return f"figures/{subject_id(subject)}"


COHORT_FIGURES = "figures/cohort"
#: The cohort page's figures, written as ``<name>.png`` (atlasflow.reports.panels names them).
COHORT_FIGURE_NAMES = ("atlas_iterations", "atlas_convergence", "tumor_frequency")


def figure_file(name: str) -> str:
    """File name of a report figure (a subject's or the cohort's) called ``name``."""
    return f"{name}.png"


def cohort_figure(outdir: str | Path, name: str) -> str:
    """One of the cohort page's figures (``name`` from :data:`COHORT_FIGURE_NAMES`)."""
    return f"{reports_dir(outdir)}/{COHORT_FIGURES}/{figure_file(name)}"


# --------------------------------------------------------------------------- as objects


@dataclass(frozen=True)
class Scan:
    """The files of one scan (subject S, session T) under ``outdir/sub-S/ses-T/anat`` (session
    ``""``: ``outdir/sub-S/anat``); ``reference`` is the contrast whose files are the scan's own
    (preprocessed, registered: the T1w by default)."""

    outdir: Path
    subject: str
    session: str
    reference: str = DEFAULT_REFERENCE

    def file(self, suffix: str, ext: str = "nii.gz", **entities: str) -> Path:
        """Path of one of this scan's files (see :func:`anat`)."""
        return Path(anat(self.outdir, suffix, self.subject, self.session, ext, **entities))

    def image(self, **entities: str) -> Path:
        """One of the reference contrast's images (see :func:`contrast`)."""
        return Path(contrast(self.outdir, self.reference, self.subject, self.session, **entities))

    @property
    def label(self) -> str:
        """The reference's name in transform entities (``from-T1w``)."""
        return TRANSFORM_LABELS[self.reference]

    @property
    def preproc(self) -> Path:
        return self.image(desc="preproc")

    @property
    def brain_mask(self) -> Path:
        return self.file("mask", desc="brain")

    @property
    def tumor_mask(self) -> Path:
        return self.file("mask", label="tumor", desc="preproc")

    @property
    def atlas_dseg(self) -> Path:
        return self.file("dseg", space="atlas")

    def warped(self, stage: str) -> Path:
        """The scan resampled onto the fixed grid of a registration stage."""
        if stage == "atlas":
            return self.image(space="atlas")
        return self.image(space=stage, desc="warped")

    def warp(self, stage: str) -> Path:
        return self.file("xfm", from_=self.label, to=stage, mode="image")

    def qc_json(self, stage: str) -> Path:
        return self.file("xfm", "json", from_=self.label, to=stage, mode="image", desc="qc")

    @property
    def log_jacobian(self) -> Path:
        return self.file("map", space="baseline", desc="logjacobian")

    @property
    def difference(self) -> Path:
        return self.image(space="baseline", desc="difference")

    @property
    def displacement(self) -> Path:
        return self.file("map", space="baseline", desc="displacement")

    @property
    def tumor_in_baseline(self) -> Path:
        return self.file("mask", space="baseline", label="tumor")


@dataclass(frozen=True)
class CohortFiles:
    """Cohort-wide files: template, atlas iterations, atlas metrics, tumour frequency, logs
    (the atlas and its iterations in the ``reference`` contrast)."""

    outdir: Path
    reference: str = DEFAULT_REFERENCE

    @property
    def template(self) -> Path:
        return Path(template(self.outdir))

    @property
    def atlas(self) -> Path:
        return Path(atlas_reference(self.outdir, self.reference))

    @property
    def atlas_dseg(self) -> Path:
        return Path(atlas_dseg(self.outdir))

    @property
    def metrics(self) -> Path:
        return Path(atlas_metrics(self.outdir))

    @property
    def tumor_frequency(self) -> Path:
        return Path(tumor_frequency(self.outdir))

    def iteration(self, i: int) -> Path:
        return Path(iteration_template(self.outdir, i, self.reference))

    def found_iterations(self) -> list[int]:
        """The atlas iterations that have a folder (``iter-{i}``), in no particular order."""
        folders = Path(atlas_dir(self.outdir)).glob("iter-*")
        return [int(p.name[5:]) for p in folders if p.name[5:].isdigit()]

    def member_tables(self) -> list[Path]:
        """Per-member registration tables of the atlas iterations (``iter-{i}/members.tsv``)."""
        return sorted(Path(atlas_dir(self.outdir)).glob(f"iter-*/{ITERATION_MEMBERS}"))

    def tumor_table(self, subject: str) -> Path:
        return Path(tumor_table(self.outdir, subject))

    def fixed(self, stage: str, subject: str, baseline: str | None) -> Path | None:
        """The fixed image of a registration stage."""
        if stage == "template":
            return self.template
        if stage == "atlas":
            return self.atlas
        return Scan(self.outdir, subject, baseline, self.reference).preproc if baseline else None

    def scan(self, subject: str, session: str) -> Scan:
        """The files of one scan, with this cohort's reference contrast."""
        return Scan(self.outdir, subject, session, self.reference)

    @property
    def logs(self) -> Path:
        return Path(logs_dir(self.outdir))
