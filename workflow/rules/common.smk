"""Cohort table and path helpers: every output name is spelled here, once."""

import sys
from pathlib import Path

from atlasflow import layout
from atlasflow.runtime.server import enable as enable_engine
from atlasflow.errors import AtlasflowError
from atlasflow.errors import set_policy
from atlasflow.runtime.provenance import git_commit, package_versions
from atlasflow.cohort.planning import SHIPPED_MODEL, atlas_members, cohort_source, resolve_cohort
from atlasflow.registration.options import workflow_flags

OUT = config["outdir"]
LOGS = layout.logs_dir(OUT)
BENCH = layout.benchmarks_dir(OUT)
THREADS = config["threads"]
# Conda environment for `--sdm conda` (paths in conda: are relative to the rules folder).
CONDA_ENV = "../../envs/atlasflow.yaml"

try:
    COHORT = resolve_cohort(config, workdir=Path(workflow.basedir), check_data=workflow.is_main_process and config["check_voxels"])
    ATLAS_MEMBERS = atlas_members(COHORT, config["atlas"]["min_subjects"])
except AtlasflowError as exc:
    # One line naming the row/file and the problem, nothing written, non-zero exit.
    print(f"atlasflow: error: {exc}", file=sys.stderr)
    sys.exit(1)

SCANS = list(zip(COHORT["subject"], COHORT["session"]))
# Manifest rows by (subject, session): input functions look a row up per job, so a table scan
# per lookup would make planning quadratic in the cohort size.
ROWS = {(r["subject"], r["session"]): r for r in COHORT.to_dict("records")}

# The failure policy reaches the `atlasflow` commands through the environment rather than their
# command lines, so switching it does not make Snakemake rerun every finished job (every job
# process, local or on a cluster node, parses this file and sets it again).
set_policy(config["on_scan_error"])


wildcard_constraints:
    subject="[a-zA-Z0-9]+",
    session="[a-zA-Z0-9]+",
    iteration="[0-9]+",


def row(wildcards):
    """The manifest row of one scan (a dict: column -> string)."""
    return ROWS[(wildcards.subject, wildcards.session)]


def optional(wildcards, column):
    value = row(wildcards).get(column)
    return [value] if isinstance(value, str) and value else []


def has(subject, session, column):
    value = ROWS[(subject, session)].get(column)
    return isinstance(value, str) and bool(value)


def anat(suffix, subject="{subject}", session="{session}", **entities):
    """BIDS-derivatives path of one scan's file, e.g. anat("T1w", desc="preproc") (atlasflow.layout)."""
    return layout.anat(OUT, suffix, subject, session, **entities)


def log(stage, ext="log"):
    # The reports find a scan's failed job by this name (atlasflow.reports.inputs.logged_errors).
    return f"{LOGS}/{stage}/{layout.scan_id('{subject}', '{session}')}.{ext}"


def bench(stage):
    return f"{BENCH}/{stage}/{layout.scan_id('{subject}', '{session}')}.tsv"


TEMPLATE = layout.template(OUT)
TEMPLATE_MASK = layout.template_mask(OUT)
PROVENANCE = layout.provenance(OUT)

# Versions of the packages that compute the outputs. Snakemake's between-workflow cache key covers
# rule code, params and input checksums but not pip-installed software, so cached rules carry the
# versions that shape their output as a param; the provenance rule reruns when any of them changes.
VERSIONS = package_versions()
WORKFLOW_COMMIT = git_commit(workflow.basedir)


def template_files(wildcards=None):
    """A template (and mask) given as NIfTI paths: inputs, so edits rerun it and enter the cache key."""
    files = {}
    if config["template"] != "mni152":
        files["source"] = config["template"]
    if config["template_mask"]:
        files["source_mask"] = config["template_mask"]
    return files


def cohort_files():
    """Every file the cohort is read from: its images and masks, and the manifest when it is a CSV."""
    files = demo_outputs(COHORT)
    source = cohort_source(config, Path(workflow.basedir))
    if source is not None and source.is_file():
        files.append(str(source))
    return files


def all_targets():
    targets = [TEMPLATE, ATLAS_T1W, ATLAS_METRICS, PROVENANCE, *longitudinal_targets()]
    if any(has(s, t, "labels") for s, t in ATLAS_MEMBERS):
        targets.append(ATLAS_DSEG)
    for subject, session in SCANS:
        targets.append(anat("T1w", subject, session, space="atlas"))
        if has(subject, session, "labels"):
            targets.append(anat("dseg", subject, session, space="atlas"))
        targets.append(anat("T1w", subject, session, desc="preproc"))
        targets.append(anat("T1w", subject, session, space="template", desc="warped"))
        targets.append(anat("xfm", subject, session, from_="T1w", to="template", mode="image", desc="qc", ext="json"))
        if has(subject, session, "labels"):
            targets.append(anat("dseg", subject, session, space="template"))
    return targets


def demo_outputs(cohort):
    """Every image file of a cohort (for the demo: what its rule writes, so jobs depend on it)."""
    files = []
    for column in ("t1w", "labels", "tumor_mask", "brain_mask"):
        if column in cohort:
            files += [v for v in cohort[column] if isinstance(v, str) and v]
    return files


# --- preprocess helpers

def mask_inputs(wc):
    """What the brain mask is derived from, by config and by what the manifest gives."""
    mode = config["preprocess"]["brain_mask"]
    given = optional(wc, "brain_mask")
    labels = optional(wc, "labels")
    if mode in ("auto", "given") and given:
        return {"given": given}
    if mode in ("auto", "labels") and labels:
        return {"labels": labels}
    return {"template": TEMPLATE, "template_mask": TEMPLATE_MASK}


def mask_args(wc, input):
    flags = {"given": "--given-mask", "labels": "--labels", "template": "--template", "template_mask": "--template-mask"}
    return " ".join(f"{flags[k]} {input[k]}" for k in flags if k in input.keys())


# --- register helpers

REG = config["registration"]


def model_input(wildcards):
    """The weights the deep backend loads: an input, so that registrations rerun when they change."""
    if REG["model"]:
        return [REG["model"]]
    return [str(SHIPPED_MODEL)] if REG["backend"] == "deep" else []


def registration_options(wildcards, stage="register"):
    """The engine flags the registrations of ``stage`` pass (register, atlas_init, atlas or
    longitudinal), rendered from the config by atlasflow.registration.options.

    A function of the wildcards only: Snakemake compares such params with the last run's when it
    plans, so a changed setting reruns the registrations (params that take `input` are not).
    """
    return workflow_flags(config, stage)


def registration_inputs(fixed):
    """What registering a scan to ``fixed`` reads: the scan's preprocessed T1w and brain mask, the
    template's brain mask and the weights."""
    return {
        "fixed": fixed,
        "fixed_mask": TEMPLATE_MASK,
        "moving": anat("T1w", desc="preproc"),
        "moving_mask": anat("mask", desc="brain"),
        "model": model_input,
    }


def xfm(to):
    """A scan's ITK affine and displacement field to space ``to`` (as named inputs or outputs)."""
    return {
        "affine": anat("xfm", from_="T1w", to=to, mode="image", ext="mat"),
        "warp": anat("xfm", from_="T1w", to=to, mode="image"),
    }


def registration_outputs(to, warped):
    """What registering a scan to space ``to`` writes: the scan there (``warped``), the transforms
    both ways and the QC metrics."""
    return {
        "warped": warped,
        **xfm(to),
        "inverse_warp": anat("xfm", from_=to, to="T1w", mode="image"),
        "metrics": anat("xfm", from_="T1w", to=to, mode="image", desc="qc", ext="json"),
    }


def atlas_model_input(wildcards):
    """The atlas iterations' weights: the cohort-fine-tuned ones when atlas.finetune_steps > 0."""
    return [FINETUNED_MODEL] if FINETUNE else model_input(wildcards)


def atlas_registration_options(wildcards):
    """Atlas iterations: the shared engine flags with the atlas stage's own step budgets."""
    return registration_options(wildcards, "atlas")


def longitudinal_options(wildcards):
    """Follow-up -> baseline: the shared engine flags with the longitudinal stage's own settings."""
    return registration_options(wildcards, "longitudinal")


def qc_options(wildcards):
    qc = config["qc"]
    return f"--max-folding {qc['max_folding_fraction']} --min-ncc {qc['min_ncc_after']}"


# --- atlas helpers

ATLAS = layout.atlas_dir(OUT)


ATL = config["atlas"]
FINETUNE = REG["backend"] == "deep" and ATL["finetune_steps"] > 0
FINETUNED_MODEL = layout.finetuned_model(OUT)


N_ITER = ATL["iterations"]

# Deep backend: each iteration continues every member's velocity of the previous one.
CARRY = REG["backend"] == "deep" and ATL["carry_velocity"]


def iter_velocities(iteration):
    """The members' velocities of an iteration (coarse grid), in member order."""
    return [iter_file(iteration, layout.member_velocity(s, t)) for s, t in ATLAS_MEMBERS]


def iter_mean_velocity(iteration):
    return iter_file(iteration, layout.MEAN_VELOCITY)


def carried_velocities(wildcards):
    """What iteration i continues from: iteration i-1's member and mean velocities (none for i = 1)."""
    previous = int(wildcards.iteration) - 1
    if not CARRY or previous < 1:
        return {}
    return {"velocities": iter_velocities(previous), "mean_velocity": iter_mean_velocity(previous)}


def iter_file(iteration, name):
    return layout.iteration_file(OUT, iteration, name)


# Each member's affine to the reference template, found by atlas_init; every iteration starts from it.
ATLAS_AFFINES = [
    iter_file(0, layout.member_affine(s, t)) for s, t in ATLAS_MEMBERS
]


# Under on_scan_error: skip, the atlas averages need this many members whose scans succeeded.
MIN_MEMBERS = f"--min-inputs {ATL['min_subjects']} --min-inputs-setting atlas.min_subjects"


def previous_template(wildcards):
    return layout.iteration_template(OUT, int(wildcards.iteration) - 1)


ATLAS_T1W = layout.atlas_t1w(OUT)
ATLAS_DSEG = layout.atlas_dseg(OUT)


ATLAS_METRICS = layout.atlas_metrics(OUT)


# --- longitudinal helpers

from atlasflow.cohort.planning import session_order  # noqa: E402

_ORDERED = session_order(COHORT)
SESSIONS = {s: list(g["session"]) for s, g in _ORDERED.groupby("subject", sort=True)}
BASELINE = {s: sessions[0] for s, sessions in SESSIONS.items()}
FOLLOWUPS = [(s, t) for s, sessions in SESSIONS.items() for t in sessions[1:]]
LONGITUDINAL_SUBJECTS = [s for s, sessions in SESSIONS.items() if len(sessions) > 1]


def row_of(subject, session):
    return ROWS[(subject, session)]


def longitudinal_inputs(wc):
    base = BASELINE[wc.subject]
    inputs = {
        "baseline": anat("T1w", wc.subject, base, desc="preproc"),
        "baseline_mask": anat("mask", wc.subject, base, desc="brain"),
        "followup": anat("T1w", wc.subject, wc.session, desc="preproc"),
        "followup_mask": anat("mask", wc.subject, wc.session, desc="brain"),
    }
    if has(wc.subject, base, "tumor_mask"):
        inputs["baseline_tumor"] = anat("mask", wc.subject, base, label="tumor", desc="preproc")
    if has(wc.subject, wc.session, "tumor_mask"):
        inputs["followup_tumor"] = anat("mask", wc.subject, wc.session, label="tumor", desc="preproc")
    return inputs


def atlas_tumor_mask(subject, session):
    """A session's tumour mask in atlas space (baselines directly, follow-ups through the baseline)."""
    if session == BASELINE[subject]:
        return anat("mask", subject, session, space="atlas", label="tumor", desc="baseline")
    return anat("mask", subject, session, space="atlas", label="tumor")


def tumor_frequency_inputs(wildcards):
    masks = []
    for subject, sessions in SESSIONS.items():
        with_mask = [t for t in sessions if has(subject, t, "tumor_mask")]
        if with_mask:
            masks.append(atlas_tumor_mask(subject, with_mask[-1]))
    return masks


def longitudinal_targets():
    targets = []
    for subject in LONGITUDINAL_SUBJECTS:
        targets.append(layout.tumor_table(OUT, subject))
        for session in SESSIONS[subject][1:]:
            for suffix, desc in (("map", "logjacobian"), ("map", "displacement"), ("T1w", "difference")):
                targets.append(anat(suffix, subject, session, space="atlas", desc=desc))
            if has(subject, session, "tumor_mask"):
                targets.append(atlas_tumor_mask(subject, session))
    if tumor_frequency_inputs(None):
        targets.append(layout.tumor_frequency(OUT))
    return targets


# --- report helpers

from atlasflow.reports.inputs import cohort_report_inputs, subject_report_inputs  # noqa: E402

REPORTS = layout.reports_dir(OUT)
COHORT_REPORT = f"{REPORTS}/{layout.COHORT_PAGE}"
COHORT_FIGURES = f"{REPORTS}/{layout.COHORT_FIGURES}"
QC = config["qc"]
QC_FLAGS = (
    f"--max-folding-fraction {QC['max_folding_fraction']} --min-ncc-after {QC['min_ncc_after']} "
    f"--min-dice {QC.get('min_dice', 0.5)}"
)
SCAN_LIST = " ".join(f"{s}:{t}" for s, sessions in SESSIONS.items() for t in sessions)


def subject_report_files(wildcards):
    sessions = SESSIONS[wildcards.subject]
    return subject_report_inputs(
        OUT,
        wildcards.subject,
        sessions,
        baseline=BASELINE[wildcards.subject],
        labels=[t for t in sessions if has(wildcards.subject, t, "labels")],
        tumour=[t for t in sessions if has(wildcards.subject, t, "tumor_mask")],
    ) + [row_of(wildcards.subject, t)["t1w"] for t in sessions]
