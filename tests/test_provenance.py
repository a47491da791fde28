"""Provenance record: checksums against hashlib, cohort roles, versions, git revision, CLI errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from factories import random_nifti as write_nifti
from factories import write_manifest

from atlasflow.cli.main import main as cli_main
from atlasflow.cohort.planning import SHIPPED_MODEL, resolve_cohort
from atlasflow.errors import AtlasflowError
from atlasflow.runtime import provenance as pv

CONFIG = {
    "cohort": None,
    "outdir": "results",
    "template": "mni152",
    "template_mask": None,
    "registration": {"backend": "deep", "model": None},
    "threads": 1,
}


@pytest.fixture
def cohort(tmp_path) -> Path:
    """A manifest cohort: two subjects, one with labels and a tumour mask."""
    folder = tmp_path / "cohort"
    write_nifti(folder / "a.nii.gz", 0)
    write_nifti(folder / "b.nii.gz", 1)
    labels = np.zeros((10, 12, 8), np.uint8)
    labels[2:6, 3:8, 2:5] = 3
    nib.save(nib.Nifti1Image(labels, np.eye(4)), folder / "b_dseg.nii.gz")
    mask = (labels > 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), folder / "b_tumor.nii.gz")
    rows = [
        {"subject": "01", "session": "1", "t1w": "a.nii.gz", "labels": "", "tumor_mask": ""},
        {
            "subject": "02",
            "session": "1",
            "t1w": "b.nii.gz",
            "labels": "b_dseg.nii.gz",
            "tumor_mask": "b_tumor.nii.gz",
        },
    ]
    return write_manifest(folder, rows)


def test_sha256_streams_across_chunk_boundaries(tmp_path):
    data = np.random.default_rng(3).bytes(10_007)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    for chunk in (1, 64, 4096, 10_007, 1 << 20):
        assert pv.sha256_file(path, chunk=chunk) == expected
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert pv.sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_hash_files_threads_agree_and_dedupe(tmp_path):
    paths = []
    for i in range(6):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(np.random.default_rng(i).bytes(50_000 + i))
        paths.append(p)
    one = pv.hash_files(paths + paths[:2], threads=1)
    many = pv.hash_files(paths, threads=3)
    assert one == many and len(one) == 6
    for p in paths:
        assert one[str(p)] == {
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            "bytes": p.stat().st_size,
        }


def test_unreadable_file_is_one_clear_error(tmp_path):
    with pytest.raises(AtlasflowError, match="nope.nii.gz"):
        pv.sha256_file(tmp_path / "nope.nii.gz")


def test_versions_are_the_installed_ones():
    versions = pv.package_versions()
    for name in ("atlasflow", "torch", "antspyx", "snakemake", "nibabel", "numpy"):
        assert versions[name] == metadata.version(name)
    assert versions["python"].count(".") == 2
    assert pv.package_versions(["surely-not-installed-pkg"])["surely-not-installed-pkg"] is None


def test_shipped_model_path_agrees_with_the_deep_engine():
    from atlasflow.registration.engine import DEFAULT_MODEL

    assert SHIPPED_MODEL == DEFAULT_MODEL


def test_record_covers_every_cohort_file_config_and_model(cohort, tmp_path):
    config = {**CONFIG, "cohort": str(cohort)}
    table = resolve_cohort(config, check_data=False)
    model = tmp_path / "w.safetensors"
    model.write_bytes(b"weights")
    sidecar = {"sha256": hashlib.sha256(b"weights").hexdigest()}
    (tmp_path / "w.json").write_text(json.dumps(sidecar))
    record = pv.build_provenance(config, tmp_path, table, model=model, manifest=cohort, threads=2)

    files = record["cohort"]["files"]
    assert [(f["subject"], f["role"]) for f in files] == [
        ("01", "t1w"),
        ("02", "t1w"),
        ("02", "labels"),
        ("02", "tumor_mask"),
    ]
    for f in files:
        assert f["sha256"] == hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest()
        assert f["bytes"] == Path(f["path"]).stat().st_size
    assert record["cohort"]["manifest"]["sha256"] == hashlib.sha256(cohort.read_bytes()).hexdigest()
    assert record["cohort"]["scans"] == 2
    assert record["config"] == config
    assert (
        record["model"]["sha256"] == sidecar["sha256"]
        and record["model"]["sidecar_sha256_matches"] is True
    )
    assert record["packages"]["torch"] == metadata.version("torch")
    assert record["platform"]["machine"]
    assert record["workflow"]["git"] is None  # tmp_path is no git checkout
    json.dumps(record)  # serialisable as is

    model.write_bytes(b"tampered")
    again = pv.build_provenance(config, tmp_path, table, model=model)
    assert again["model"]["sidecar_sha256_matches"] is False
    assert again["model"]["sha256"] != record["model"]["sha256"]


def test_template_file_is_hashed_and_missing_inputs_are_named(cohort, tmp_path):
    template = write_nifti(tmp_path / "tpl.nii.gz", 7)
    config = {**CONFIG, "cohort": str(cohort), "template": str(template)}
    table = resolve_cohort(config, check_data=False)
    record = pv.build_provenance(config, tmp_path, table)
    assert (
        record["template"]["files"][0]["sha256"]
        == hashlib.sha256(template.read_bytes()).hexdigest()
    )
    assert record["model"] is None
    (cohort.parent / "b_tumor.nii.gz").unlink()
    with pytest.raises(AtlasflowError, match="b_tumor.nii.gz"):
        pv.build_provenance(config, tmp_path, table)


def test_model_in_use_follows_the_config():
    shipped = Path("/x/shipped.safetensors")
    assert pv.model_in_use(CONFIG, shipped) == shipped
    assert pv.model_in_use(
        {**CONFIG, "registration": {"backend": "deep", "model": "/m.st"}}, shipped
    ) == Path("/m.st")
    assert (
        pv.model_in_use({**CONFIG, "registration": {"backend": "ants", "model": None}}, shipped)
        is None
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_revision_of_a_checkout_and_its_dirty_flag(tmp_path):
    repo = tmp_path / "wf"
    repo.mkdir()
    assert pv.git_revision(repo) is None
    (repo / "Snakefile").write_text("rule all:\n    input: []\n")

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", "Snakefile")
    assert pv.git_revision(repo) is None  # no commit yet
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    head = git("rev-parse", "HEAD")
    assert pv.git_revision(repo) == {"commit": head, "dirty": False}
    (repo / "Snakefile").write_text("# edited\n")
    assert pv.git_revision(repo) == {"commit": head, "dirty": True}
    (repo / "untracked.txt").write_text("not part of the workflow")
    (repo / "Snakefile").write_text("rule all:\n    input: []\n")
    assert pv.git_revision(repo)["dirty"] is False
    # An untracked workflow inside some other repository reports nothing, not that repository's commit.
    inner = repo / "inner"
    inner.mkdir()
    (inner / "Snakefile").write_text("")
    assert pv.git_revision(inner) is None


def test_cli_writes_the_record_and_reports_bad_input_in_one_line(cohort, tmp_path, capsys):
    out = tmp_path / "prov" / "provenance.json"
    config = {**CONFIG, "cohort": "cohort/manifest.csv", "registration": {"backend": "ants"}}

    def run(config_json: str) -> int:
        args = ["--config-json", config_json, "--workflow-dir", str(tmp_path), "--output", str(out)]
        return cli_main(["provenance", *args])

    # A relative cohort is found from the workflow folder, as the Snakefile finds it.
    assert run(json.dumps(config)) == 0
    record = json.loads(out.read_text())
    assert record["cohort"]["manifest"]["sha256"] == hashlib.sha256(cohort.read_bytes()).hexdigest()
    assert len(record["cohort"]["files"]) == 4 and record["model"] is None

    capsys.readouterr()
    assert run("[1, 2") == 1
    err = capsys.readouterr().err
    assert err.startswith("atlasflow: error: --config-json") and err.count("\n") == 1
    (cohort.parent / "a.nii.gz").unlink()
    assert run(json.dumps(config)) == 1
    err = capsys.readouterr().err
    assert "a.nii.gz" in err and err.count("\n") == 1 and "Traceback" not in err
