"""Multi-contrast cohort input: T2w / FLAIR / post-contrast T1w / PDw columns and BIDS files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from factories import SCAN_AFFINE as AFFINE
from factories import SCAN_SHAPE as SHAPE
from factories import brain, head, write_manifest
from factories import refused as fails
from factories import validated as check
from factories import write_nifti as write

from atlasflow.cohort.images import clear_image_cache
from atlasflow.cohort.manifest import load_cohort
from atlasflow.cohort.validate import validate_cohort


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_image_cache()
    yield
    clear_image_cache()


def _own_grid_affine() -> np.ndarray:
    """Another grid of the same head: coarser through-plane, shifted and tilted (as a FLAIR is)."""
    affine = AFFINE.copy()
    affine[:3, 2] *= 1.5
    c, s = np.cos(0.1), np.sin(0.1)
    affine[:3, :3] = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ affine[:3, :3]
    affine[:3, 3] += (2.0, -3.0, 1.0)
    return affine


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    write(d / "a_T1w.nii.gz", head(1))
    write(d / "a_FLAIR.nii.gz", head(2)[:, :, :10], affine=_own_grid_affine())
    write(d / "a_T2w.nii.gz", head(3).astype(np.float32) * 0.37)
    write(d / "b_T1w.nii.gz", head(4))
    rows = [
        {"subject": "a", "session": "", "t1w": "data/a_T1w.nii.gz", "flair": "data/a_FLAIR.nii.gz",
         "t2w": "data/a_T2w.nii.gz"},
        {"subject": "b", "session": "", "t1w": "data/b_T1w.nii.gz", "flair": "", "t2w": ""},
    ]  # fmt: skip
    return write_manifest(tmp_path, rows)


def _edit(manifest: Path, row: int, **values) -> Path:
    from factories import manifest_rows

    rows = manifest_rows(manifest)
    rows[row].update(values)
    return write_manifest(manifest.parent, rows)


def test_contrasts_on_their_own_grids_are_accepted(cohort: Path):
    table = check(cohort)
    assert table.loc[0, "flair"].endswith("a_FLAIR.nii.gz") and Path(table.loc[0, "flair"]).is_absolute()
    assert table.loc[0, "t2w"].endswith("a_T2w.nii.gz")
    assert table.loc[1, "flair"] == "" and table.loc[0, "t1ce"] == "" and table.loc[0, "pdw"] == ""


def test_a_contrast_column_pointing_at_a_label_map_is_refused(cohort: Path):
    labels = (brain() * 3 + (head(5) > 60)).astype(np.int16)
    write(cohort.parent / "data" / "a_dseg.nii.gz", labels)
    fails(_edit(cohort, 0, flair="data/a_dseg.nii.gz"), "row 2", "flair", "label map")


def test_a_4d_contrast_is_refused(cohort: Path):
    write(cohort.parent / "data" / "a_4d.nii.gz", np.stack([head(2), head(3)], axis=-1))
    fails(_edit(cohort, 0, t2w="data/a_4d.nii.gz"), "row 2", "a_4d.nii.gz")


def test_a_contrast_that_is_the_t1w_file_is_refused(cohort: Path):
    fails(_edit(cohort, 0, t2w="data/a_T1w.nii.gz"), "row 2", "t2w", "is also the t1w")


def test_eight_bit_scans_are_not_label_maps(cohort: Path):
    values = (head(6).astype(np.float64) / head(6).max() * 255).astype(np.uint8)
    write(cohort.parent / "data" / "a_u8.nii.gz", values)
    assert len(np.unique(values)) > 160
    check(_edit(cohort, 0, t2w="data/a_u8.nii.gz"))


def test_bids_contrasts_are_discovered(tmp_path: Path):
    anat = tmp_path / "bids" / "sub-01" / "anat"
    write(anat / "sub-01_T1w.nii.gz", head(1))
    write(anat / "sub-01_ce-gadolinium_T1w.nii.gz", head(2))
    write(anat / "sub-01_FLAIR.nii.gz", head(3), affine=_own_grid_affine())
    write(anat / "sub-01_T2w.nii.gz", head(4))
    write(anat / "sub-01_PDw.nii.gz", head(5))
    write(tmp_path / "bids" / "sub-02" / "anat" / "sub-02_T1w.nii.gz", head(6))
    root = tmp_path / "bids"
    table = validate_cohort(load_cohort(root), root)
    first = table.iloc[0]
    assert first["t1w"].endswith("sub-01_T1w.nii.gz")
    assert first["t1ce"].endswith("sub-01_ce-gadolinium_T1w.nii.gz")
    assert first["flair"].endswith("sub-01_FLAIR.nii.gz")
    assert first["t2w"].endswith("sub-01_T2w.nii.gz")
    assert first["pdw"].endswith("sub-01_PDw.nii.gz")
    assert table.iloc[1]["flair"] == ""
    assert SHAPE == head(1).shape


def test_the_planner_and_the_cohort_name_the_same_contrasts():
    from atlasflow.cohort.columns import CONTRAST_COLUMNS, SCAN_COLUMNS
    from atlasflow.contrasts import plan

    assert plan.CONTRAST_COLUMNS == CONTRAST_COLUMNS
    assert set(plan.TRANSFORM_LABELS) == set(SCAN_COLUMNS)  # any of them may be the reference


def test_a_lesion_mask_on_the_flairs_grid_is_accepted_another_grid_is_not(cohort: Path):
    from factories import manifest_rows

    flair = head(2)[:, :, :10]
    mask = (flair > 60).astype(np.uint8)
    write(cohort.parent / "data" / "a_lesion.nii.gz", mask, affine=_own_grid_affine())
    rows = manifest_rows(cohort)
    rows[0]["tumor_mask"] = "data/a_lesion.nii.gz"
    check(write_manifest(cohort.parent, rows))
    other = AFFINE.copy()
    other[:3, 3] += 7.0
    write(cohort.parent / "data" / "a_lesion.nii.gz", mask, affine=other)
    fails(write_manifest(cohort.parent, rows), "row 2", "tumor_mask", "none of the grids of its t2w, flair")


# --- another reference contrast (config contrasts.reference)


def _flair_cohort(tmp_path: Path) -> Path:
    """Two subjects anchored by their FLAIRs (own grid): a has a T1w and a label map on the
    FLAIR's grid, b has no T1w at all."""
    d = tmp_path / "data"
    flair = head(2)[:, :, :10]
    write(d / "a_FLAIR.nii.gz", flair, affine=_own_grid_affine())
    write(d / "a_T1w.nii.gz", head(1))
    write(d / "a_dseg.nii.gz", (flair > 60).astype(np.uint8) * 3, affine=_own_grid_affine())
    write(d / "b_FLAIR.nii.gz", head(5)[:, :, :10], affine=_own_grid_affine())
    rows = [
        {"subject": "a", "session": "", "flair": "data/a_FLAIR.nii.gz", "t1w": "data/a_T1w.nii.gz",
         "labels": "data/a_dseg.nii.gz"},
        {"subject": "b", "session": "", "flair": "data/b_FLAIR.nii.gz", "t1w": "", "labels": ""},
    ]  # fmt: skip
    return write_manifest(tmp_path, rows)


def _validate(manifest: Path, reference: str):
    return validate_cohort(load_cohort(manifest, reference=reference), manifest, reference=reference)


def test_a_flair_reference_takes_rows_without_a_t1w_and_labels_on_the_flairs_grid(tmp_path: Path):
    table = _validate(_flair_cohort(tmp_path), "flair")
    assert list(table["subject"]) == ["a", "b"] and table["t1w"].iloc[1] == ""
    # the same cohort anchored by the T1w: b has none, a's label map is not on its T1w's grid
    from atlasflow.errors import AtlasflowError

    with pytest.raises(AtlasflowError) as err:
        _validate(_flair_cohort(tmp_path), "t1w")
    lines = str(err.value).splitlines()
    assert any("row 3 (subject b, no session): t1w is empty" in line for line in lines), lines
    assert any(
        "row 2 (subject a, no session): labels" in line and "not on the grid of the t1w image" in line
        for line in lines
    ), lines


def test_a_row_without_the_reference_is_refused_naming_the_row(tmp_path: Path):
    from factories import manifest_rows

    from atlasflow.errors import AtlasflowError

    manifest = _flair_cohort(tmp_path)
    rows = manifest_rows(manifest)
    rows[1]["flair"] = ""
    rows[0]["flair"] = ""
    manifest = write_manifest(tmp_path, rows)
    with pytest.raises(AtlasflowError) as err:
        _validate(manifest, "flair")
    lines = [line for line in str(err.value).splitlines() if "flair is empty" in line]
    # every such row, each in one line naming it (all problems in one error)
    assert len(lines) == 2, str(err.value)
    assert "row 3 (subject b, no session): flair is empty, but contrasts.reference is flair" in lines[1]
    # a manifest without the reference's column: one line naming the column and the setting
    no_column = tmp_path / "no_flair.csv"
    no_column.write_text("subject,session,t1w\na,,data/a_T1w.nii.gz\n")
    with pytest.raises(AtlasflowError, match="missing required column 'flair'.*contrasts.reference is flair"):
        load_cohort(no_column, reference="flair")


def test_a_label_map_on_the_t1ws_grid_is_refused_when_the_flair_is_the_reference(tmp_path: Path):
    from factories import manifest_rows

    from atlasflow.errors import AtlasflowError

    manifest = _flair_cohort(tmp_path)
    write(tmp_path / "data" / "a_T1w_dseg.nii.gz", (head(1) > 60).astype(np.uint8))
    rows = manifest_rows(manifest)
    rows[0]["labels"] = "data/a_T1w_dseg.nii.gz"
    rows[0]["brain_mask"] = "data/a_T1w_dseg.nii.gz"
    with pytest.raises(AtlasflowError) as err:
        _validate(write_manifest(tmp_path, rows), "flair")
    lines = str(err.value).splitlines()
    assert any(
        "row 2 (subject a, no session): labels" in line and "is not on the grid of the flair image" in line
        for line in lines
    ), lines
    # a tumour mask may still be on the T1w's grid (another contrast of the session)
    rows[0].update(labels="data/a_dseg.nii.gz", brain_mask="", tumor_mask="data/a_T1w_dseg.nii.gz")
    _validate(write_manifest(tmp_path, rows), "flair")


def test_atlasflow_validate_takes_the_reference(tmp_path: Path, capsys):
    from atlasflow.cli.main import main

    manifest = _flair_cohort(tmp_path)
    assert main(["validate", str(manifest), "--reference", "flair"]) == 0
    config = tmp_path / "config.yaml"
    config.write_text("contrasts:\n  reference: flair\n")
    assert main(["validate", str(manifest), "--configfile", str(config)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "reference flair; other contrasts t1w 1" in out, out
    assert main(["validate", str(manifest)]) != 0


def test_a_bids_folder_anchored_by_the_flair_takes_sessions_without_a_t1w(tmp_path: Path):
    from atlasflow.cohort.selection import BidsOptions, CohortNotes

    root = tmp_path / "bids"
    write(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", head(1))
    write(root / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz", head(2), affine=_own_grid_affine())
    write(root / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz", head(3), affine=_own_grid_affine())
    write(root / "sub-03" / "anat" / "sub-03_T1w.nii.gz", head(4))
    notes = CohortNotes()
    options = BidsOptions.from_config({"contrasts": {"reference": "flair"}})
    table = validate_cohort(load_cohort(root, notes, options, "flair"), root, reference="flair")
    assert list(table["subject"]) == ["01", "02"]
    assert table.iloc[1]["t1w"] == "" and table.iloc[1]["flair"].endswith("sub-02_FLAIR.nii.gz")
    assert ("sub-03/anat", "no FLAIR scan (contrasts.reference)") in notes.skipped
    # anchored by the T1w (the default), sub-02 is the one left out
    notes = CohortNotes()
    table = validate_cohort(load_cohort(root, notes), root)
    assert list(table["subject"]) == ["01", "03"]
