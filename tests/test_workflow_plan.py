"""atlasflow.workflow_plan: what the rules derive from the config and the cohort, without Snakemake."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml
from factories import REPO

from atlasflow import layout
from atlasflow.workflow_plan import (
    WorkflowPlan,
    atlasflow_command,
    shell_prefix,
)


def config(**overrides) -> dict:
    """The tiny test config over config.yaml, with the schema's defaults (as the Snakefile has it)."""
    from snakemake.utils import validate

    merged = yaml.safe_load((REPO / "config.yaml").read_text())
    for key, value in yaml.safe_load((REPO / "tests" / "config_tiny.yaml").read_text()).items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
    for key, value in overrides.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
    validate(merged, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return merged


@pytest.fixture(scope="module")
def plan() -> WorkflowPlan:
    return WorkflowPlan.from_config(config(), REPO, check_data=False)


def wc(**kwargs) -> SimpleNamespace:
    return SimpleNamespace(**kwargs)


def test_the_tiny_demo_cohort(plan):
    # 3 cross-sectional subjects and one with 2 sessions (tumour); the atlas: tumour-free baselines
    assert plan.members == [("01", "1"), ("02", "1"), ("03", "1")]
    assert plan.sessions["04"] == ["1", "2"] and plan.baseline["04"] == "1"
    assert plan.longitudinal_subjects == ["04"]
    assert plan.scan_list == "01:1 02:1 03:1 04:1 04:2"
    assert plan.followups(wc(subject="04")) == "2"
    assert all(p.startswith("demo_data/") for p in plan.cohort_images())


def test_targets_are_layout_names(plan):
    targets = plan.all_targets()
    assert len(targets) == len(set(targets))
    for path in (
        layout.template("results"),
        layout.atlas_reference("results"),
        layout.tumor_table("results", "04"),
    ):
        assert path in targets
    # every change map the longitudinal stage targets is one change_map_to_atlas makes, but the
    # reference's difference, which difference_to_atlas makes
    for path in plan.longitudinal_targets():
        if "/anat/" in path and "desc-baseline" not in path:
            if path.endswith("_space-atlas_desc-difference_T1w.nii.gz"):
                continue
            assert any(path.endswith(f"_space-atlas_{change}.nii.gz") for change in plan.change_maps), (
                path
            )
    assert plan.ref("04", "2", space="atlas", desc="difference") in plan.longitudinal_targets()
    assert plan.tumor_frequency_inputs() == [plan.atlas_tumor_mask("04", "2")]


def test_option_strings_the_rules_pass(plan):
    scan = wc(subject="04", session="2")
    assert plan.tumor_table_sessions(wc(subject="04")).startswith("--session 1 ")
    assert plan.raw_scans(wc(subject="04")).split()[1].startswith("2=demo_data/sub-04/ses-2/")
    assert plan.qc_flags.startswith("--max-folding-fraction ")
    inputs = plan.longitudinal_inputs(scan)
    assert inputs["baseline"] == plan.anat("T1w", "04", "1", desc="preproc")
    assert {"baseline_tumor", "followup_tumor"} <= set(inputs)
    assert plan.tumor_flags(scan, inputs) == (
        f"--baseline-tumor {inputs['baseline_tumor']} --followup-tumor {inputs['followup_tumor']}"
    )
    # the brain mask: from the labels when the manifest gives them (auto), flags named after them
    mask = plan.mask_inputs(wc(subject="01", session="1"))
    assert list(mask) == ["labels"]
    assert plan.mask_args(None, mask | {"labels": "l.nii.gz"}) == "--labels l.nii.gz"
    # a session with a tumour mask adds it to the brain mask
    tumour = plan.mask_inputs(scan)
    assert tumour["lesion"] == plan.optional(scan, "tumor_mask")
    assert plan.mask_args(None, tumour | {"lesion": "t.nii.gz"}).endswith("--lesion-mask t.nii.gz")


def test_atlas_settings_and_flags_come_from_the_same_config(plan):
    """The settings strings are in every finished run's record: their text must not drift."""
    flags = plan.registration_options(None, "atlas_init")
    assert plan.atlas_init_settings == f"init {plan.atl['init']} {flags}"
    assert plan.atlas_init_flags()[:2] == ["--init", plan.atl["init"]]
    assert plan.atlas_init_flags()[-4:] == [
        "--min-inputs",
        "2",
        "--min-inputs-setting",
        "atlas.min_subjects",
    ]
    assert plan.atlas_iteration_settings.endswith(
        f"gradient_step {plan.atl['gradient_step']} sharpen {plan.atl['sharpen']} carry True"
    )
    assert plan.atlas_finetune_flags() == [
        "--steps",
        plan.atl["finetune_steps"],
        "--seed",
        plan.reg["seed"],
    ]
    finetuned = WorkflowPlan.from_config(
        config(atlas={"finetune_steps": 5}), REPO, check_data=False
    )
    assert ["--model", layout.finetuned_model("results")] == [
        f
        for f in finetuned.atlas_iteration_flags()
        if f in ("--model", layout.finetuned_model("results"))
    ]
    assert finetuned.atlas_model_input(None) == [layout.finetuned_model("results")]


def test_carried_velocities(plan):
    assert plan.carried_velocities(wc(iteration="1")) == {}
    carried = plan.carried_velocities(wc(iteration="2"))
    assert carried["mean_velocity"] == layout.iteration_file("results", 1, layout.MEAN_VELOCITY)
    assert len(carried["velocities"]) == len(plan.members)


def test_atlasflow_command_quotes_the_interpreter():
    assert atlasflow_command("/opt/my env/bin/python") == "'/opt/my env/bin/python' -m atlasflow"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_shell_prefix_runs_the_package_of_the_interpreter_without_path():
    prefix = shell_prefix(sys.executable, conda=False)
    assert prefix.startswith("set -euo pipefail; ")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        ["bash", "-c", prefix + "atlasflow --help"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: atlasflow ")
    # under --sdm conda the rule's activated environment provides `atlasflow`
    assert shell_prefix(sys.executable, conda=True) == "set -euo pipefail; "


def test_reports_wait_for_every_contrast_the_workflow_makes(plan):
    """The tiny demo has a FLAIR per scan: the subject report reads (and waits for) each scan's
    FLAIR outputs, the follow-up's FLAIR change, and is told the contrasts per session."""
    assert plan.contrasts.used == ["flair"]
    assert plan.contrasts.of_subject("04") == {"1": ["flair"], "2": ["flair"]}
    files = plan.contrasts.files
    inputs = plan.subject_report_files(wc(subject="04"))
    for session in ("1", "2"):
        for path in (
            files.native("flair", "04", session),
            files.preproc("flair", "04", session),
            files.session_qc("flair", "04", session),
            files.in_space("flair", "template", "04", session),
            files.in_space("flair", "atlas", "04", session),
        ):
            assert path in inputs
    assert files.difference("flair", "baseline", "04", "2") in inputs
    assert files.in_space("flair", "baseline", "04", "2") in inputs
    assert files.difference("flair", "baseline", "04", "1") not in inputs
    # every contrast file the report waits for is one the workflow targets or its align rule writes
    targets = set(plan.all_targets())
    made = [p for p in inputs if "FLAIR" in p]
    assert all(p in targets or "space-orig" in p or "baseline_desc-warped" in p for p in made)
    assert plan.contrasts.report_flags(wc(subject="04")) == "--contrasts 1=flair 2=flair"
    assert layout.atlas_contrast("results", "flair") in plan.cohort_report_inputs()
    # a T1w-only cohort: no contrast inputs and the report command as before
    t1w_only = WorkflowPlan.from_config(config(contrasts={"use": []}), REPO, check_data=False)
    assert t1w_only.contrasts.report_flags(wc(subject="04")) == ""
    assert not any("FLAIR" in p for p in t1w_only.subject_report_files(wc(subject="04")))
    assert not any("FLAIR" in p for p in t1w_only.cohort_report_inputs())


def sessionless_plan(**overrides) -> WorkflowPlan:
    """The plan of a cohort without sessions: three subjects, one with a FLAIR (no files needed)."""
    import pandas as pd

    from atlasflow.cohort.columns import known_columns

    rows = [
        {"subject": s, "session": "", "t1w": f"/data/sub-{s}_T1w.nii.gz"}
        for s in ("01", "02", "03")
    ]
    rows[0]["flair"] = "/data/sub-01_FLAIR.nii.gz"
    rows[1]["labels"] = "/data/sub-02_dseg.nii.gz"
    cohort = pd.DataFrame(rows).reindex(columns=list(known_columns())).fillna("")
    members = [("01", ""), ("02", ""), ("03", "")]
    return WorkflowPlan(config(**overrides), cohort, members)


def test_a_cohort_without_sessions_plans_without_a_session_wildcard():
    plan = sessionless_plan()
    assert plan.session_wildcard == ""
    assert plan.anat("T1w", desc="preproc") == (
        "results/sub-{subject}/anat/sub-{subject}_desc-preproc_T1w.nii.gz"
    )
    assert plan.log("preprocess") == "results/logs/preprocess/sub-{subject}.log"
    assert plan.bench("preprocess") == "results/benchmarks/preprocess/sub-{subject}.tsv"
    assert plan.xfm("atlas")["warp"] == (
        "results/sub-{subject}/anat/sub-{subject}_from-T1w_to-atlas_mode-image_xfm.nii.gz"
    )
    assert plan.contrasts.files.native("flair") == (
        "results/sub-{subject}/anat/sub-{subject}_space-orig_desc-preproc_FLAIR.nii.gz"
    )
    # the jobs' wildcards have no session: input functions read it as ""
    job = wc(subject="01")
    assert plan.row(job)["flair"] == "/data/sub-01_FLAIR.nii.gz"
    assert set(plan.contrasts.mask_grid_inputs(job)) == {"grid_flair", "xfm_flair", "t1w"}
    assert plan.contrasts.mask_grid_inputs(job)["xfm_flair"] == (
        "results/sub-01/anat/sub-01_from-FLAIR_to-T1w_mode-image_xfm.mat"
    )
    targets = plan.all_targets()
    assert "results/sub-02/anat/sub-02_space-atlas_dseg.nii.gz" in targets
    assert "results/sub-01/anat/sub-01_space-atlas_FLAIR.nii.gz" in targets
    assert not any("ses-" in p for p in targets)
    assert not any("ses-" in p for p in plan.iteration_velocities(1) + plan.member_affines())
    assert plan.longitudinal_subjects == [] and plan.longitudinal_targets() == []
    assert not any("ses-" in p for p in plan.subject_report_files(job))
    # the report commands' words: '' for the session, SUBJECT: and =PATH / =CONTRASTS
    assert plan.subject_sessions(job) == "''" and plan.subject_baseline(job) == "''"
    assert plan.scan_list == "01: 02: 03:"
    assert plan.raw_scans(job) == "=/data/sub-01_T1w.nii.gz"
    assert plan.contrasts.report_flags(job) == "--contrasts =flair"


def test_a_plan_refuses_a_cohort_mixing_scans_with_and_without_sessions(plan):
    """Validation names such scans ses-1 (atlasflow.cohort.columns.fill_mixed_sessions): a plan
    given a mixed table directly says so rather than writing rules that cannot match."""
    from atlasflow.errors import AtlasflowError

    mixed = plan.cohort.copy()
    mixed.loc[0, "session"] = ""
    with pytest.raises(AtlasflowError, match="mixes scans with and without a session"):
        WorkflowPlan(plan.config, mixed, plan.members)


def flair_reference_plan(**overrides) -> WorkflowPlan:
    """A cohort anchored by its FLAIRs (contrasts.reference: flair): subject 01 has a T1w beside
    its FLAIR at both sessions, 02 only a FLAIR (no files needed)."""
    import pandas as pd

    from atlasflow.cohort.columns import known_columns

    rows = [
        {"subject": "01", "session": "1", "flair": "/d/01_1_FLAIR.nii.gz", "t1w": "/d/01_1_T1w.nii.gz"},
        {"subject": "01", "session": "2", "flair": "/d/01_2_FLAIR.nii.gz", "t1w": "/d/01_2_T1w.nii.gz"},
        {"subject": "02", "session": "1", "flair": "/d/02_1_FLAIR.nii.gz", "labels": "/d/02_1_dseg.nii.gz"},
    ]  # fmt: skip
    cohort = pd.DataFrame(rows).reindex(columns=list(known_columns())).fillna("")
    settings = {"contrasts": {"reference": "flair"}, **overrides}
    return WorkflowPlan(config(**settings), cohort, [("01", "1"), ("02", "1")])


def test_a_flair_reference_anchors_every_scan_and_the_t1w_is_one_more_contrast():
    plan = flair_reference_plan()
    assert plan.reference == "flair" and plan.cross_contrast
    assert plan.ref(desc="preproc") == (
        "results/sub-{subject}/ses-{session}/anat/sub-{subject}_ses-{session}_desc-preproc_FLAIR.nii.gz"
    )
    targets = set(plan.all_targets())
    for s, t in (("01", "1"), ("01", "2"), ("02", "1")):
        stem = f"results/sub-{s}/ses-{t}/anat/sub-{s}_ses-{t}"
        assert f"{stem}_desc-preproc_FLAIR.nii.gz" in targets
        assert f"{stem}_space-template_desc-warped_FLAIR.nii.gz" in targets
        assert f"{stem}_space-atlas_FLAIR.nii.gz" in targets
        assert f"{stem}_from-FLAIR_to-template_mode-image_desc-qc_xfm.json" in targets
    # the T1w, where there is one, is aligned to the FLAIR and carried into every space
    assert plan.contrasts.used == ["t1w"]
    assert plan.contrasts.scans_with("t1w") == [("01", "1"), ("01", "2")]
    files = plan.contrasts.files
    assert files.session_affine("t1w", "01", "1") == (
        "results/sub-01/ses-1/anat/sub-01_ses-1_from-T1w_to-FLAIR_mode-image_xfm.mat"
    )
    assert files.preproc("t1w", "01", "1") in targets  # the T1w on the FLAIR's working grid
    assert files.in_space("t1w", "atlas", "01", "2") in targets
    assert not any(p.startswith("results/sub-02/") and p.endswith("_T1w.nii.gz") for p in targets)
    assert {layout.atlas_contrast("results", "flair"), layout.atlas_contrast("results", "t1w")} <= targets
    assert plan.atlas == "results/atlas/atlas_FLAIR.nii.gz"
    assert plan.iteration_template(0) == "results/atlas/iter-0/template_FLAIR.nii.gz"
    assert plan.member_affines()[0].endswith("sub-01_ses-1_from-FLAIR_to-template_mode-image_xfm.mat")
    # transforms and the longitudinal change maps are named after the FLAIR
    assert plan.xfm("atlas")["warp"].endswith("_from-FLAIR_to-atlas_mode-image_xfm.nii.gz")
    assert "desc-difference_FLAIR" not in plan.change_maps  # its own rule, difference_to_atlas
    followup = wc(subject="01", session="2")
    assert plan.longitudinal_inputs(followup)["baseline"].endswith(
        "sub-01_ses-1_desc-preproc_FLAIR.nii.gz"
    )
    assert "results/sub-01/ses-2/anat/sub-01_ses-2_space-atlas_desc-difference_FLAIR.nii.gz" in targets
    # the template (a T1w) is reached by the contrast-independent path; the atlas (FLAIR) is not
    assert plan.template_registration_options(None) == (
        plan.registration_options(None) + " --cross-contrast"
    )
    assert "--cross-contrast" in plan.atlas_init_flags()
    assert "--cross-contrast" not in plan.atlas_iteration_flags()
    # reports: the reference's raw scans, the reference named on the command lines
    assert plan.raw_scans(wc(subject="02")) == "1=/d/02_1_FLAIR.nii.gz"
    assert plan.reference_flag == " --reference flair"
    assert plan.contrasts.report_flags(wc(subject="01")) == "--contrasts 1=t1w 2=t1w"
    # a lesion mask may be on the T1w's grid: carried through its alignment to the FLAIR
    grids = plan.contrasts.mask_grid_inputs(wc(subject="01", session="1"))
    assert grids["t1w"] == "/d/01_1_FLAIR.nii.gz" and grids["grid_t1w"] == "/d/01_1_T1w.nii.gz"


def test_a_t1w_reference_plans_the_commands_of_before(plan):
    assert plan.reference == "t1w" and not plan.cross_contrast and plan.reference_flag == ""
    assert plan.template_registration_options(None) == plan.registration_options(None)
    assert "--cross-contrast" not in plan.atlas_init_flags()
    assert plan.atlas_init_settings.endswith(plan.registration_options(None, "atlas_init"))


def test_a_reference_some_scans_lack_or_an_atlas_started_from_the_t1w_template_is_refused():
    from atlasflow.errors import AtlasflowError

    with pytest.raises(AtlasflowError, match=r"contrasts.reference is t2w, but 3 scan\(s\) have no t2w"):
        flair_reference_plan(contrasts={"reference": "t2w"})
    with pytest.raises(AtlasflowError, match="atlas.init: template starts the atlas from the T1w template"):
        flair_reference_plan(atlas={"init": "template"})


def test_the_demo_cohort_anchored_by_its_flair_takes_label_maps_on_the_flairs_grid():
    """The demo writes each contrast's true label map on its own grid (truth/..._space-FLAIR_dseg):
    with contrasts.reference: flair those are the cohort's label maps (and demo_data's outputs)."""
    plan = WorkflowPlan.from_config(config(contrasts={"reference": "flair"}), REPO, check_data=False)
    labels = plan.rows[("04", "2")]["labels"]
    assert labels == "demo_data/truth/sub-04/ses-2/sub-04_ses-2_space-FLAIR_dseg.nii.gz"
    assert labels in plan.cohort_images()
    assert plan.contrasts.used == ["t1w"]
    from atlasflow.errors import AtlasflowError

    with pytest.raises(AtlasflowError, match="contrasts.reference is t2w, but 5 scan"):
        WorkflowPlan.from_config(config(contrasts={"reference": "t2w"}), REPO, check_data=False)
