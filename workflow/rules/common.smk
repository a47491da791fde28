"""Config and cohort: the plan the rules are built from, and the path builder.

Every output name is spelled once, in atlasflow.layout; what the rules derive from the config and
the cohort (inputs, targets, option strings) is atlasflow.workflow_plan.WorkflowPlan, built here
once as PLAN. Nothing here computes: it loads, validates and binds names.
"""

import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from atlasflow import layout
from atlasflow.errors import AtlasflowError, error_lines, set_policy
from atlasflow.runtime.client import enable as enable_commands
from atlasflow.runtime.provenance import git_commit, package_versions
from atlasflow.runtime.server import enable as enable_engine
from atlasflow.workflow_plan import WorkflowPlan, atlasflow_command, shell_prefix

OUT = config["outdir"]
THREADS = config["threads"]
# Conda environment for `--sdm conda` (paths in conda: are relative to the rules folder).
CONDA_ENV = "../../envs/atlasflow.yaml"

try:
    # (`workdir` may not start a line here: it is a Snakemake keyword.)
    PLAN = WorkflowPlan.from_config(
        config, Path(workflow.basedir), check_data=workflow.is_main_process and config["check_voxels"]
    )
except AtlasflowError as exc:
    # One line naming the row/file and the problem (or one line per problem when there are
    # several), nothing written, non-zero exit.
    first, *rest = error_lines(exc)
    print("\n".join([f"atlasflow: error: {first}", *(f"  {line}" for line in rest)]), file=sys.stderr)
    sys.exit(1)

# `contrasts.reference: auto` settled by the cohort: the effective config (provenance) says which.
config.setdefault("contrasts", {})["reference"] = PLAN.reference
if workflow.is_main_process and PLAN.reference_note:
    print(f"atlasflow: {PLAN.reference_note}", file=sys.stderr)

if workflow.is_main_process and PLAN.notes.sessions_filled:
    # A cohort mixing scans with and without sessions is written with sessions throughout.
    print(f"atlasflow: {PLAN.notes.sessions_filled_line()}", file=sys.stderr)

if workflow.is_main_process and PLAN.notes.skipped_rows():
    # Never silent: what a BIDS cohort skipped or passed over is listed in a file and the report.
    print(
        f"atlasflow: {len(PLAN.notes.skipped_rows())} input(s) of the cohort skipped or passed over "
        f"for another file: listed with the reason in {layout.skipped_inputs(OUT)} and the cohort "
        f"report (`atlasflow validate {config['cohort']}` prints them now)",
        file=sys.stderr,
    )

# The failure policy reaches the `atlasflow` commands through the environment rather than their
# command lines, so switching it does not make Snakemake rerun every finished job (every job
# process, local or on a cluster node, parses this file and sets it again).
set_policy(config["on_scan_error"])

# `atlasflow` in a rule's shell command is the package of the Python running Snakemake (a shell
# function, `python -m atlasflow`), whatever PATH holds: a venv need not be activated, and a
# cluster job (`python -m snakemake` of the same environment) finds the same package. Under
# `--sdm conda` the rule's conda environment is activated first and its own `atlasflow` runs.
# The rules keep the text `atlasflow ...`, which Snakemake records: finished jobs do not rerun.
# (shell.prefix formats its argument: braces doubled.)
ATLASFLOW = atlasflow_command(sys.executable)
_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
shell.prefix(shell_prefix(sys.executable, conda=_CONDA).replace("{", "{{").replace("}", "}}"))


onstart:
    # Local runs only (jobs on cluster nodes start their own processes): the atlas jobs share one
    # warm engine (torch, weights, workers; atlasflow.runtime.server), and the other `atlasflow`
    # commands are forked from one warm server (atlasflow.runtime.forkserver). Both exit with
    # this process; same output bytes either way.
    if workflow.local_exec:
        if config["atlas"]["warm_engine"]:
            enable_engine()
        if config["warm_commands"]:
            enable_commands()

# Versions of the packages that compute the outputs. Snakemake's between-workflow cache key covers
# rule code, params and input checksums but not pip-installed software, so cached rules carry the
# versions that shape their output as a param; the provenance rule reruns when any of them changes.
VERSIONS = package_versions()
WORKFLOW_COMMIT = git_commit(workflow.basedir)


wildcard_constraints:
    subject="[a-zA-Z0-9]+",
    session="[a-zA-Z0-9]+",
    iteration="[0-9]+",


# The path helpers of one scan's jobs ("{subject}", "{session}" wildcards by default; no
# {session} wildcard, and no ses- level, for a cohort whose scans have no session). `ref` names
# the files of the session's reference contrast (contrasts.reference: desc-preproc_T1w by
# default, desc-preproc_FLAIR with the FLAIR as reference); `anat` any other file of a scan.
anat = PLAN.anat
ref = PLAN.ref
log = PLAN.log
bench = PLAN.bench
xfm = PLAN.xfm
