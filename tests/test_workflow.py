"""The Snakemake workflow: lint, dry-runs, a bad cohort stopping before any job, a real tiny run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from atlasflow.io import load_image

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
TINY = REPO / "tests" / "config_tiny.yaml"


def snakemake(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(cwd), *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_lint_is_clean(tmp_path):
    out = snakemake("--lint", "--configfile", str(REPO / "config.yaml"), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Lints for" not in out.stdout + out.stderr


def test_dry_run_lists_every_stage_for_the_demo_config(tmp_path):
    out = snakemake("-n", "--configfile", str(REPO / "config.yaml"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    for rule in ("demo_data", "template", "bias_correct", "preprocess", "register_template", "atlas_iterate", "register_atlas", "atlas_labels"):
        assert rule in text, rule
    assert not (tmp_path / "results").exists(), "a dry run must write nothing"


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("problem", ["missing", "four_d", "duplicate", "text"])
def test_bad_manifest_stops_with_one_line_before_any_job(tmp_path, problem):
    import nibabel as nib

    good = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(good, np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(good, np.eye(4)), tmp_path / "b.nii.gz")
    rows = [{"subject": "01", "session": "1", "t1w": "a.nii.gz"}, {"subject": "02", "session": "1", "t1w": "b.nii.gz"}]
    if problem == "missing":
        rows[1]["t1w"] = "nope.nii.gz"
    elif problem == "four_d":
        nib.save(nib.Nifti1Image(np.stack([good] * 3, -1), np.eye(4)), tmp_path / "b.nii.gz")
    elif problem == "duplicate":
        rows[1]["subject"] = "01"
    elif problem == "text":
        (tmp_path / "b.nii.gz").write_text("not an image at all")
    manifest = write_manifest(tmp_path, rows)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = snakemake("-n", "--configfile", str(REPO / "config.yaml"), "--config", f"cohort={manifest}", cwd=tmp_path)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("atlasflow: error:")]
    assert len(errors) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert "row" in errors[0] or "02" in errors[0] or "b.nii.gz" in errors[0]
    after = sorted(p.name for p in tmp_path.iterdir() if p.name != ".snakemake")
    assert after == before, "a rejected cohort must write nothing"


def test_check_voxels_false_plans_from_headers_only(tmp_path):
    """A NaN-holding scan passes the header checks: planning stops on it only when voxels are read."""
    import nibabel as nib

    good = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    bad = good.copy()
    bad[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(good, np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(bad, np.eye(4)), tmp_path / "b.nii.gz")
    manifest = write_manifest(
        tmp_path, [{"subject": "01", "session": "1", "t1w": "a.nii.gz"}, {"subject": "02", "session": "1", "t1w": "b.nii.gz"}]
    )
    args = ("-n", "--configfile", str(REPO / "config.yaml"), "--config", f"cohort={manifest}")
    full = snakemake(*args, cwd=tmp_path)
    assert full.returncode != 0 and "b.nii.gz" in full.stderr and "Traceback" not in full.stderr
    headers = snakemake(*args, "check_voxels=False", cwd=tmp_path)
    assert headers.returncode == 0, headers.stderr
    assert "register_template" in headers.stdout + headers.stderr


@pytest.mark.slow
def test_tiny_demo_cohort_end_to_end(tmp_path):
    """The whole workflow on the tiny demo cohort; then a second run has nothing to do."""
    out = snakemake("-c", "2", "--configfile", str(TINY), cwd=tmp_path, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = tmp_path / "results"
    manifest = pd.read_csv(tmp_path / "demo_data" / "manifest.csv", dtype=str)
    for row in manifest.itertuples():
        anat = results / f"sub-{row.subject}" / f"ses-{row.session}" / "anat"
        stem = f"sub-{row.subject}_ses-{row.session}"
        for name in ("desc-preproc_T1w.nii.gz", "from-T1w_to-template_mode-image_xfm.mat",
                     "from-T1w_to-template_mode-image_xfm.nii.gz", "space-template_desc-warped_T1w.nii.gz",
                     "space-template_dseg.nii.gz", "space-atlas_T1w.nii.gz", "space-atlas_dseg.nii.gz"):
            assert (anat / f"{stem}_{name}").exists(), name
        qc = json.loads((anat / f"{stem}_from-T1w_to-template_mode-image_desc-qc_xfm.json").read_text())
        assert qc["ncc_after"] > qc["ncc_before"]
    assert (results / "atlas" / "atlas_T1w.nii.gz").exists()
    assert (results / "atlas" / "atlas_dseg.nii.gz").exists()
    metrics = pd.read_csv(results / "atlas" / "metrics.tsv", sep="\t")
    assert list(metrics["iteration"]) == [1, 2]
    assert metrics["mean_velocity_norm_mean_mm"].iloc[-1] < metrics["mean_velocity_norm_mean_mm"].iloc[0]
    atlas_img = load_image(results / "atlas" / "atlas_T1w.nii.gz")
    assert atlas_img.data.max() > 0.5
    # longitudinal: the tumour table matches the demo's mask volumes exactly, the maps exist in atlas space
    truth = pd.read_csv(tmp_path / "demo_data" / "truth" / "tumor_volumes.tsv", sep="\t", dtype={"subject": str, "session": str})
    for subject, rows in truth.groupby("subject"):
        table = pd.read_csv(results / f"sub-{subject}" / "longitudinal" / f"sub-{subject}_tumor.tsv", sep="\t", dtype={"session": str})
        np.testing.assert_allclose(table["volume_mm3"].to_numpy(), rows["volume_mm3"].to_numpy(), rtol=1e-6)
        assert table["response"].iloc[0] == "baseline"
        for session in rows["session"].iloc[1:]:
            anat = results / f"sub-{subject}" / f"ses-{session}" / "anat"
            for change in ("desc-logjacobian_map", "desc-displacement_map", "desc-difference_T1w", "label-tumor_mask"):
                assert (anat / f"sub-{subject}_ses-{session}_space-atlas_{change}.nii.gz").exists(), change
    assert (results / "atlas" / "tumor_frequency.nii.gz").exists()
    again = snakemake("-c", "2", "--configfile", str(TINY), "-n", cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr
    shutil.rmtree(tmp_path / ".snakemake", ignore_errors=True)
