"""atlasflow.layout: the output names the workflow writes and the reports read, spelled once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from factories import REPO

from atlasflow import layout
from atlasflow.layout import CohortFiles, Scan


def test_scan_names_are_the_bids_derivatives_names_the_workflow_writes():
    a = "results/sub-01/ses-2/anat/sub-01_ses-2_"
    assert layout.anat("results", "T1w", "01", "2", desc="preproc") == a + "desc-preproc_T1w.nii.gz"
    # Entities in BIDS order whatever the keyword order; `from_` is written `from`.
    assert (
        layout.anat(
            "results",
            "xfm",
            "01",
            "2",
            desc="qc",
            mode="image",
            to="atlas",
            from_="T1w",
            ext="json",
        )
        == a + "from-T1w_to-atlas_mode-image_desc-qc_xfm.json"
    )
    assert (
        layout.anat("results", "mask", "01", "2", desc="baseline", label="tumor", space="atlas")
        == a + "space-atlas_label-tumor_desc-baseline_mask.nii.gz"
    )
    # Wildcards pass through, and the output folder is joined as given (not normalised).
    assert layout.anat("out/", "dseg", "{subject}", "{session}", space="template") == (
        "out//sub-{subject}/ses-{session}/anat/sub-{subject}_ses-{session}_space-template_dseg.nii.gz"
    )


def test_scan_paths_of_the_reports_use_the_same_names():
    scan = Scan(Path("results"), "03", "1")
    assert scan.preproc == Path("results/sub-03/ses-1/anat/sub-03_ses-1_desc-preproc_T1w.nii.gz")
    assert scan.warped("atlas").name == "sub-03_ses-1_space-atlas_T1w.nii.gz"
    assert scan.warped("template").name == "sub-03_ses-1_space-template_desc-warped_T1w.nii.gz"
    assert scan.warp("baseline").name == "sub-03_ses-1_from-T1w_to-baseline_mode-image_xfm.nii.gz"
    assert scan.qc_json("template").name == (
        "sub-03_ses-1_from-T1w_to-template_mode-image_desc-qc_xfm.json"
    )
    assert scan.log_jacobian.name == "sub-03_ses-1_space-baseline_desc-logjacobian_map.nii.gz"
    assert scan.tumor_in_baseline.name == "sub-03_ses-1_space-baseline_label-tumor_mask.nii.gz"
    for name in ("preproc", "brain_mask", "tumor_mask", "atlas_dseg", "difference"):
        path = getattr(scan, name)
        assert str(path).startswith("results/sub-03/ses-1/anat/sub-03_ses-1_"), name


def test_a_scan_without_a_session_has_no_ses_level():
    """Session "": no ses- folder and no ses- entity, in paths, stems, logs and member names."""
    assert layout.session_entity("2") == "ses-2" and layout.session_entity("") == ""
    assert layout.scan_id("01", "") == "sub-01" and layout.scan_id("01", "2") == "sub-01_ses-2"
    assert layout.scan_dir("results", "01", "") == "results/sub-01/anat"
    assert layout.anat("results", "T1w", "01", "", desc="preproc") == (
        "results/sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"
    )
    assert layout.contrast("results", "t1ce", "01", "", space="atlas") == (
        "results/sub-01/anat/sub-01_ce-gadolinium_space-atlas_T1w.nii.gz"
    )
    # a wildcard subject without a session wildcard: what the rules of such a cohort are built from
    assert layout.anat("out", "mask", "{subject}", "", desc="brain") == (
        "out/sub-{subject}/anat/sub-{subject}_desc-brain_mask.nii.gz"
    )
    assert layout.member_velocity("01", "") == "velocities/sub-01_velocity.nii"
    assert layout.member_affine("01", "") == (
        "affines/sub-01_from-T1w_to-template_mode-image_xfm.mat"
    )
    assert layout.job_log("results", "preprocess", layout.scan_id("01", "")) == (
        "results/logs/preprocess/sub-01.log"
    )
    scan = Scan(Path("results"), "01", "")
    files = [scan.preproc, scan.brain_mask, scan.tumor_mask, scan.atlas_dseg, scan.difference]
    files += [scan.warped(s) for s in layout.STAGES] + [scan.qc_json(s) for s in layout.STAGES]
    for path in files:
        assert str(path).startswith("results/sub-01/anat/sub-01_") and "ses-" not in str(path)
    assert CohortFiles(Path("results")).fixed("baseline", "01", "") is None  # no baseline
    from atlasflow.contrasts.plan import ContrastFiles

    cfiles = ContrastFiles("results", session="")
    assert cfiles.preproc("flair", "01") == "results/sub-01/anat/sub-01_desc-preproc_FLAIR.nii.gz"
    assert cfiles.session_qc("flair", "01", "2").startswith(
        "results/sub-01/ses-2/anat/sub-01_ses-2_"
    )


def test_cohort_files():
    files = CohortFiles(Path("results"))
    assert (
        files.template
        == Path(layout.template("results"))
        == Path("results/template/template_T1w.nii.gz")
    )
    assert files.atlas == Path("results/atlas/atlas_T1w.nii.gz")
    assert files.iteration(2) == Path("results/atlas/iter-2/template_T1w.nii.gz")
    assert files.tumor_table("04") == Path("results/sub-04/longitudinal/sub-04_tumor.tsv")
    assert files.fixed("baseline", "04", "1") == Scan(Path("results"), "04", "1").preproc
    assert files.fixed("baseline", "04", None) is None
    assert layout.iteration_file("results", "{iteration}", layout.member_velocity("01", "2")) == (
        "results/atlas/iter-{iteration}/velocities/sub-01_ses-2_velocity.nii"
    )
    assert layout.member_affine("01", "2") == (
        "affines/sub-01_ses-2_from-T1w_to-template_mode-image_xfm.mat"
    )


def test_found_iterations(tmp_path):
    for name in ("iter-0", "iter-3", "iter-x"):
        (tmp_path / "atlas" / name).mkdir(parents=True)
    assert sorted(CohortFiles(tmp_path).found_iterations()) == [0, 3]


def test_cohort_wide_names():
    assert layout.iteration_template("r", 0) == "r/atlas/iter-0/template_T1w.nii.gz"
    assert layout.iteration_metrics("r", "{iteration}") == "r/atlas/iter-{iteration}/metrics.json"
    assert layout.iteration_members("r", 2) == "r/atlas/iter-2/members.tsv"
    assert layout.atlas_probseg("r") == "r/atlas/atlas_probseg.nii.gz"
    assert layout.cohort_page("r") == "r/reports/cohort.html"
    assert (
        layout.cohort_figure("r", "atlas_convergence")
        == "r/reports/figures/cohort/atlas_convergence.png"
    )
    assert layout.demo_manifest("demo_data") == "demo_data/manifest.csv"


def test_job_logs_and_benchmarks():
    scan = layout.scan_id("{subject}", "{session}")
    assert (
        layout.job_log("r", "register_template", scan)
        == "r/logs/register_template/sub-{subject}_ses-{session}.log"
    )
    assert layout.job_log("r", "template") == "r/logs/template.log"
    assert layout.job_log("r", "atlas", "iter-{iteration}") == "r/logs/atlas/iter-{iteration}.log"
    assert layout.job_benchmark("r", "atlas_init") == "r/benchmarks/atlas_init.tsv"


def test_name_tail_is_the_end_of_a_scan_file_name():
    assert layout.name_tail("map", desc="logjacobian") == "desc-logjacobian_map"
    assert (
        layout.name_tail("mask", desc="baseline", label="tumor") == "label-tumor_desc-baseline_mask"
    )
    # a tail as the suffix of `anat` gives the scan's file of those entities
    assert layout.anat(
        "r", layout.name_tail("mask", label="tumor"), "01", "2", space="atlas"
    ) == layout.anat("r", "mask", "01", "2", space="atlas", label="tumor")


# File names that only atlasflow.layout may spell.
SPELLED = (
    "sub-",
    "_space-",
    "desc-",
    "label-",
    ".nii",
    "_tumor.tsv",
    "template_T1w",
    ".png",
    ".tsv",
    ".json",
    ".html",
    "iter-",
)


def test_workflow_builds_its_names_through_layout():
    """The rules and their plan (atlasflow.workflow_plan) spell no output name: every path comes
    from the layout (the scan path helper is a thin call into it)."""
    plan = (REPO / "src" / "atlasflow" / "workflow_plan.py").read_text()
    assert "return layout.anat(self.out, suffix, subject, session, **entities)" in plan
    sources = {"workflow_plan.py": plan, "Snakefile": (REPO / "Snakefile").read_text()}
    sources.update({p.name: p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk")})
    for name, text in sources.items():
        code = "\n".join(line.split("#")[0] for line in text.splitlines() if '"""' not in line)
        for literal in re.findall(r'"[^"\n]*"|\'[^\'\n]*\'', code):  # the string literals
            spelled = [
                s for s in SPELLED if s in re.sub(r"\{[^{}]*\}", "", literal)
            ]  # not {output.html}
            assert not spelled, f"{name}: {literal} spells {spelled} by hand"


def test_layout_imports_neither_torch_nor_numpy():
    """The workflow imports it every time it plans."""
    code = (
        "import sys, atlasflow.layout, atlasflow.reports.inputs; "
        "print(sorted(m for m in ('torch', 'numpy', 'matplotlib', 'ants') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"
