"""Cohort table and path helpers: every output name is spelled here, once."""

import sys
from pathlib import Path

from atlasflow.errors import AtlasflowError
from atlasflow.workflow import resolve_cohort

OUT = config["outdir"]
LOGS = f"{OUT}/logs"
BENCH = f"{OUT}/benchmarks"
THREADS = config["threads"]

try:
    COHORT = resolve_cohort(config, workdir=Path(workflow.basedir))
except AtlasflowError as exc:
    # One line naming the row/file and the problem, nothing written, non-zero exit.
    print(f"atlasflow: error: {exc}", file=sys.stderr)
    sys.exit(1)

SCANS = list(zip(COHORT["subject"], COHORT["session"]))


wildcard_constraints:
    subject="[a-zA-Z0-9]+",
    session="[a-zA-Z0-9]+",
    iteration="[0-9]+",


def row(wildcards):
    """The manifest row of one scan."""
    match = COHORT[(COHORT["subject"] == wildcards.subject) & (COHORT["session"] == wildcards.session)]
    return match.iloc[0]


def optional(wildcards, column):
    value = row(wildcards).get(column)
    return [value] if isinstance(value, str) and value else []


def has(subject, session, column):
    r = COHORT[(COHORT["subject"] == subject) & (COHORT["session"] == session)].iloc[0]
    value = r.get(column)
    return isinstance(value, str) and bool(value)


def anat(suffix, subject="{subject}", session="{session}", **entities):
    """BIDS-derivatives path of one scan's file, e.g. anat("T1w", desc="preproc")."""
    parts = [f"sub-{subject}", f"ses-{session}"]
    for key in ("space", "from_", "to", "mode", "label", "desc"):
        if key in entities:
            parts.append(f"{key.rstrip('_')}-{entities[key]}")
    ext = entities.get("ext", "nii.gz")
    return f"{OUT}/sub-{subject}/ses-{session}/anat/{'_'.join(parts)}_{suffix}.{ext}"


def log(stage, ext="log"):
    return f"{LOGS}/{stage}/sub-{{subject}}_ses-{{session}}.{ext}"


def bench(stage):
    return f"{BENCH}/{stage}/sub-{{subject}}_ses-{{session}}.tsv"


TEMPLATE = f"{OUT}/template/template_T1w.nii.gz"
TEMPLATE_MASK = f"{OUT}/template/template_desc-brain_mask.nii.gz"


def all_targets():
    targets = [TEMPLATE]
    for subject, session in SCANS:
        targets.append(anat("T1w", subject, session, desc="preproc"))
        targets.append(anat("T1w", subject, session, space="template", desc="warped"))
        targets.append(anat("xfm", subject, session, from_="T1w", to="template", mode="image", desc="qc", ext="json"))
        if has(subject, session, "labels"):
            targets.append(anat("dseg", subject, session, space="template"))
    return targets


def demo_outputs(cohort):
    """Every image file of the demo cohort, so jobs depend on the demo rule through their inputs."""
    files = []
    for column in ("t1w", "labels", "tumor_mask", "brain_mask"):
        if column in cohort:
            files += [v for v in cohort[column] if isinstance(v, str) and v]
    return files
