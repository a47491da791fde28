"""BIDS datasets as they are in the wild (issue 22): one file per session chosen by a stated rule,
derivatives read, every problem in one run, nothing skipped in silence, a dataset description.

Each test builds a tiny BIDS layout of its own (16x18x14 volumes from tests/factories.py).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import SCAN_SHAPE as SHAPE
from factories import brain, head
from factories import write_nifti as write

from atlasflow.cli.main import main as cli_main
from atlasflow.cohort.images import clear_image_cache
from atlasflow.cohort.manifest import load_cohort
from atlasflow.cohort.selection import BidsOptions, CohortNotes
from atlasflow.cohort.validate import validate_cohort
from atlasflow.errors import AtlasflowError, CohortProblems


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_image_cache()
    yield
    clear_image_cache()


def tumour() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[6:9, 6:9, 6:9] = 1
    return mask


def bids(root: Path, *names: str, seed: int = 0) -> Path:
    """A BIDS folder with a scan (or, for _mask / _dseg names, a mask) at each relative path."""
    for i, name in enumerate(names):
        if name.endswith(("_mask.nii.gz", "_mask.nii")):
            data = tumour() if ("tumor" in name or "lesion" in name) else brain()
        elif "_dseg" in name:
            data = brain().astype(np.int16) * 3
        else:
            data = head(seed + i)
        write(root / name, data)
    return root


def read(root: Path, **options) -> tuple[pd.DataFrame, CohortNotes]:
    notes = CohortNotes()
    table = load_cohort(root, notes, BidsOptions(**options))
    return validate_cohort(table, root, notes=notes), notes


def taken(table: pd.DataFrame, column: str = "t1w", row: int = 0) -> str:
    return Path(table.loc[row, column]).name if table.loc[row, column] else ""


# ------------------------------------------------------------------ one scan per session


def test_highest_run_is_taken_by_default_and_the_choice_is_reported(tmp_path: Path, capsys):
    root = bids(
        tmp_path / "b", "sub-01/anat/sub-01_run-1_T1w.nii.gz", "sub-01/anat/sub-01_run-2_T1w.nii.gz"
    )
    table, notes = read(root)
    assert taken(table) == "sub-01_run-2_T1w.nii.gz"
    assert table.loc[0, "origin"] == "sub-01/anat/sub-01_run-2_T1w.nii.gz"
    (choice,) = notes.choices
    assert (choice.role, choice.chosen) == ("t1w", "sub-01/anat/sub-01_run-2_T1w.nii.gz")
    assert choice.passed_over == (
        (
            "sub-01/anat/sub-01_run-1_T1w.nii.gz",
            "run 1; bids.choose last-run takes the highest run",
        ),
    )
    assert cli_main(["validate", str(root)]) == 0
    out, err = capsys.readouterr()
    assert "1 file taken among several" in out
    assert (
        "atlasflow validate: note: t1w of sub-01/anat: took sub-01/anat/sub-01_run-2_T1w.nii.gz, "
        "passed over sub-01/anat/sub-01_run-1_T1w.nii.gz (run 1; bids.choose last-run takes the "
        "highest run)" in err
    )


def test_first_run_and_a_file_without_run_count_as_the_first(tmp_path: Path):
    root = bids(
        tmp_path / "b", "sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_run-2_T1w.nii.gz"
    )
    assert taken(read(root)[0]) == "sub-01_run-2_T1w.nii.gz"
    assert taken(read(root, choose="first-run")[0]) == "sub-01_T1w.nii.gz"


def test_runs_sort_as_numbers(tmp_path: Path):
    names = [f"sub-01/anat/sub-01_run-{r}_T1w.nii.gz" for r in (2, 10, 9)]
    assert taken(read(bids(tmp_path / "b", *names))[0]) == "sub-01_run-10_T1w.nii.gz"


def test_choose_error_lists_every_ambiguous_session_in_one_error(tmp_path: Path, capsys):
    root = bids(
        tmp_path / "b",
        "sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz",
        "sub-02/anat/sub-02_acq-a_T1w.nii.gz",
        "sub-02/anat/sub-02_acq-b_T1w.nii.gz",
        "sub-03/anat/sub-03_T1w.nii.gz",
    )
    with pytest.raises(CohortProblems) as info:
        read(root, choose="error")
    assert len(info.value.problems) == 2
    assert info.value.problems[0].startswith("sub-01/ses-1/anat: 2 T1w files (sub-01_ses-1_run-1")
    assert info.value.problems[1].startswith("sub-02/anat: 2 T1w files (sub-02_acq-a_T1w.nii.gz")
    # The CLI: a heading, then one line per problem; exit 1, no traceback.
    assert cli_main(["validate", "--choose", "error", str(root)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"atlasflow validate: error: {root}: 2 problems"
    assert (
        err[1].startswith("  sub-01/ses-1/anat: 2 T1w files") and "bids.choose is error" in err[1]
    )
    assert err[2].startswith("  sub-02/anat: 2 T1w files") and len(err) == 3
    # A preference that settles sub-02 leaves sub-01 alone in the error, as one line.
    with pytest.raises(AtlasflowError) as info:
        read(root, choose="error", prefer=("acq-b",))
    assert not isinstance(info.value, CohortProblems)
    assert str(info.value).startswith("sub-01/ses-1/anat: 2 T1w files")


def test_acquisitions_by_name_unless_preferred(tmp_path: Path):
    root = bids(
        tmp_path / "b",
        "sub-01/anat/sub-01_acq-spgr_T1w.nii.gz",
        "sub-01/anat/sub-01_acq-mprage_T1w.nii.gz",
    )
    table, notes = read(root)
    assert taken(table) == "sub-01_acq-mprage_T1w.nii.gz"
    assert "another acquisition" in notes.choices[0].passed_over[0][1]
    table, notes = read(root, prefer=("acq-SPGR",))  # values compare without regard to case
    assert taken(table) == "sub-01_acq-spgr_T1w.nii.gz"
    assert notes.choices[0].passed_over[0][1] == "not acq-SPGR (bids.prefer)"


def test_plain_name_wins_over_one_with_more_entities(tmp_path: Path):
    root = bids(
        tmp_path / "b", "sub-01/anat/sub-01_acq-fast_T1w.nii.gz", "sub-01/anat/sub-01_T1w.nii.gz"
    )
    table, notes = read(root)
    assert taken(table) == "sub-01_T1w.nii.gz"
    assert "plainest name" in notes.choices[0].passed_over[0][1]


def test_rec_norm_and_part_mag_are_preferred(tmp_path: Path):
    root = bids(
        tmp_path / "b",
        "sub-01/anat/sub-01_rec-nonorm_T1w.nii.gz",
        "sub-01/anat/sub-01_rec-norm_T1w.nii.gz",
        "sub-02/anat/sub-02_part-phase_T1w.nii.gz",
        "sub-02/anat/sub-02_part-mag_T1w.nii.gz",
    )
    table, notes = read(root)
    assert taken(table, row=0) == "sub-01_rec-norm_T1w.nii.gz"
    assert taken(table, row=1) == "sub-02_part-mag_T1w.nii.gz"
    # A phase image is never a scan: skipped with its reason, not a passed-over choice.
    assert (
        "sub-02/anat/sub-02_part-phase_T1w.nii.gz",
        "part-phase image; only magnitude (part-mag) images are scans",
    ) in notes.skipped
    assert [c.folder for c in notes.choices] == ["sub-01/anat"]


def test_one_chunk_is_taken(tmp_path: Path):
    root = bids(
        tmp_path / "b",
        "sub-01/anat/sub-01_chunk-2_T1w.nii.gz",
        "sub-01/anat/sub-01_chunk-1_T1w.nii.gz",
    )
    assert taken(read(root)[0]) == "sub-01_chunk-1_T1w.nii.gz"


def test_fmriprep_style_derivatives_in_raw_anat_are_never_inputs(tmp_path: Path):
    root = bids(
        tmp_path / "b",
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz",
        "sub-01/anat/sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz",
        "sub-01/anat/sub-01_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz",
        "sub-01/anat/sub-01_space-orig_desc-brain_mask.nii.gz",
        "sub-02/anat/sub-02_desc-preproc_T1w.nii.gz",
    )
    table, notes = read(root)
    assert len(table) == 1 and taken(table) == "sub-01_T1w.nii.gz" and not notes.choices
    assert taken(table, "brain_mask") == "sub-01_space-orig_desc-brain_mask.nii.gz"
    skipped = dict(notes.skipped)
    assert skipped["sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"] == (
        "a derivative (desc-preproc), not a raw scan"
    )
    assert skipped["sub-01/anat/sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz"] == (
        "a derivative (space-MNI152NLin2009cAsym), not a raw scan"
    )
    assert skipped[
        "sub-01/anat/sub-01_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz"
    ].startswith("in space-MNI152NLin2009cAsym, not on the scan's grid")
    # A session holding only a derivative T1w has no scan: the file is listed, not silently dropped.
    assert "sub-02/anat/sub-02_desc-preproc_T1w.nii.gz" in skipped


def test_contrasts_are_chosen_by_the_same_rule_and_ce_stays_its_own_column(tmp_path: Path):
    root = bids(
        tmp_path / "b",
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_ce-gadolinium_run-1_T1w.nii.gz",
        "sub-01/anat/sub-01_ce-gadolinium_run-2_T1w.nii.gz",
        "sub-01/anat/sub-01_run-1_FLAIR.nii.gz",
        "sub-01/anat/sub-01_run-2_FLAIR.nii.gz",
        "sub-01/anat/sub-01_T2w.nii.gz",
        "sub-01/anat/sub-01_desc-preproc_T2w.nii.gz",
    )
    table, notes = read(root)
    row = table.iloc[0]
    assert Path(row["t1w"]).name == "sub-01_T1w.nii.gz"
    assert Path(row["t1ce"]).name == "sub-01_ce-gadolinium_run-2_T1w.nii.gz"
    assert Path(row["flair"]).name == "sub-01_run-2_FLAIR.nii.gz"
    assert Path(row["t2w"]).name == "sub-01_T2w.nii.gz"
    assert {c.role for c in notes.choices} == {"t1ce", "flair"}
    assert "sub-01/anat/sub-01_desc-preproc_T2w.nii.gz" in dict(notes.skipped)


def test_validate_table_of_a_dataset_with_choices_is_a_manifest(tmp_path: Path, capsys):
    root = bids(
        tmp_path / "b",
        "sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
    )
    assert cli_main(["validate", "--table", "--choose", "first-run", str(root)]) == 0
    out, err = capsys.readouterr()
    assert "note: t1w of sub-01/ses-1/anat: took" in err and "run-1" not in out.splitlines()[0]
    manifest = tmp_path / "m.csv"
    manifest.write_text(out)
    table = validate_cohort(load_cohort(manifest), manifest)
    assert Path(table.loc[0, "t1w"]).name == "sub-01_ses-1_run-1_T1w.nii.gz"


def test_validate_reads_the_bids_section_of_a_config_and_flags_override_it(tmp_path: Path, capsys):
    root = bids(
        tmp_path / "b", "sub-01/anat/sub-01_acq-a_T1w.nii.gz", "sub-01/anat/sub-01_acq-b_T1w.nii.gz"
    )
    config = tmp_path / "config.yaml"
    config.write_text("bids:\n  choose: error\n")
    assert cli_main(["validate", "--configfile", str(config), str(root)]) == 1
    assert "bids.choose is error" in capsys.readouterr().err
    assert cli_main(["validate", "--configfile", str(config), "--prefer", "acq-b", str(root)]) == 0
    assert "took sub-01/anat/sub-01_acq-b_T1w.nii.gz" in capsys.readouterr().err


def test_bad_bids_options_are_one_clear_line(tmp_path: Path):
    with pytest.raises(AtlasflowError, match="bids.prefer item 'norm' is not an entity-value pair"):
        BidsOptions(prefer=("norm",))
    with pytest.raises(
        AtlasflowError, match="bids.choose must be one of last-run, first-run, error"
    ):
        BidsOptions(choose="best")


def test_the_workflow_reads_the_config_bids_section(tmp_path: Path):
    from atlasflow.cohort.planning import resolve_cohort

    root = bids(
        tmp_path / "b", "sub-01/anat/sub-01_run-1_T1w.nii.gz", "sub-01/anat/sub-01_run-2_T1w.nii.gz"
    )
    notes = CohortNotes()
    config = {"cohort": str(root), "bids": {"choose": "first-run"}}
    table = resolve_cohort(config, check_data=False, notes=notes)
    assert Path(table.loc[0, "t1w"]).name == "sub-01_run-1_T1w.nii.gz"
    assert notes.skipped_rows() == [
        (
            "sub-01/anat/sub-01_run-2_T1w.nii.gz",
            "passed-over",
            "run 2; bids.choose first-run takes the lowest run",
        )
    ]


# ------------------------------------------------------------------ all problems in one run


def test_sixteen_broken_t1w_files_are_reported_in_one_run(tmp_path: Path, capsys):
    root = tmp_path / "b"
    for s in range(1, 17):
        path = root / f"sub-{s:02d}" / "anat" / f"sub-{s:02d}_T1w.nii.gz"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"not an image")
    with pytest.raises(CohortProblems) as info:
        read(root)
    assert len(info.value.problems) == 16
    assert cli_main(["validate", str(root)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[0] == f"atlasflow validate: error: {root}: 16 problems"
    assert len(lines) == 17
    assert all("not a readable NIfTI image" in line for line in lines[1:])
    assert "sub-01_T1w.nii.gz" in lines[1] and "sub-16_T1w.nii.gz" in lines[16]


def test_problem_lines_are_capped_with_a_count(tmp_path: Path, capsys):
    root = tmp_path / "b"
    for s in range(1, 26):
        path = root / f"sub-{s:02d}" / "anat" / f"sub-{s:02d}_T1w.nii"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
    assert cli_main(["validate", "--headers-only", str(root)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("25 problems") and len(lines) == 22
    assert lines[-1] == "  ... and 5 more"


def test_discovery_and_image_problems_come_together(tmp_path: Path):
    root = bids(
        tmp_path / "b",
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-02/anat/sub-03_T1w.nii.gz",  # the name disagrees with its folder
        "sub-04/anat/sub-04_T1w.nii.gz",
    )
    (root / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"broken")
    (root / "sub-04" / "sub-04_sessions.tsv").write_text("session_id\tacq_time\nses-1\tyesterday\n")
    with pytest.raises(CohortProblems) as info:
        read(root)
    text = "\n".join(info.value.problems)
    assert "sub-02/anat/sub-03_T1w.nii.gz: the file name's sub/ses entities do not match" in text
    assert "sub-04_sessions.tsv row 2 (session 1): acq_time 'yesterday'" in text
    assert "sub-01_T1w.nii.gz: not a readable NIfTI image" in text
    assert len(info.value.problems) == 3


# ------------------------------------------------------------------ derivatives


def test_masks_and_labels_are_read_from_derivatives(tmp_path: Path):
    root = bids(
        tmp_path / "b",
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        "sub-02/anat/sub-02_T1w.nii.gz",
        "derivatives/manual/sub-01/ses-1/anat/sub-01_ses-1_label-tumor_mask.nii.gz",
        "derivatives/fmriprep/sub-02/anat/sub-02_desc-brain_mask.nii.gz",
        "derivatives/fmriprep/sub-02/anat/sub-02_dseg.nii.gz",
        "derivatives/fmriprep/sub-02/anat/sub-02_desc-preproc_T1w.nii.gz",  # not looked at
        "derivatives/fmriprep/sub-02/anat/sub-02_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz",
        "derivatives/lesions/sub-02/anat/sub-02_space-orig_label-lesion_mask.nii.gz",
    )
    table, notes = read(root)
    assert taken(table, "tumor_mask", 0) == "sub-01_ses-1_label-tumor_mask.nii.gz"
    assert "derivatives/manual" in table.loc[0, "tumor_mask"]
    assert taken(table, "brain_mask", 1) == "sub-02_desc-brain_mask.nii.gz"
    assert taken(table, "labels", 1) == "sub-02_dseg.nii.gz"
    assert taken(table, "tumor_mask", 1) == "sub-02_space-orig_label-lesion_mask.nii.gz"
    assert all("derivatives" not in p for p in table["t1w"])
    assert notes.skipped == [
        (
            "derivatives/fmriprep/sub-02/anat/sub-02_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz",
            "in space-MNI152NLin2009cAsym, not on the scan's grid (space-orig or no space- entity needed)",
        )
    ]


def test_raw_anat_wins_over_derivatives_unless_configured(tmp_path: Path):
    root = bids(
        tmp_path / "b",
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_label-tumor_mask.nii.gz",
        "derivatives/rater2/sub-01/anat/sub-01_label-tumor_mask.nii.gz",
        "derivatives/rater1/sub-01/anat/sub-01_label-tumor_mask.nii.gz",
    )
    table, notes = read(root)
    assert table.loc[0, "tumor_mask"] == str(root / "sub-01/anat/sub-01_label-tumor_mask.nii.gz")
    (choice,) = notes.choices
    assert choice.passed_over == (
        (
            "derivatives/rater1/sub-01/anat/sub-01_label-tumor_mask.nii.gz",
            "raw anat/ has one and takes precedence (bids.derivatives_first: false)",
        ),
        (
            "derivatives/rater2/sub-01/anat/sub-01_label-tumor_mask.nii.gz",
            "raw anat/ has one and takes precedence (bids.derivatives_first: false)",
        ),
    )
    # Derivatives first, pipelines in name order ...
    table, notes = read(root, derivatives_first=True)
    assert "derivatives/rater1/" in table.loc[0, "tumor_mask"]
    reasons = dict(notes.choices[0].passed_over)
    assert reasons["derivatives/rater2/sub-01/anat/sub-01_label-tumor_mask.nii.gz"] == (
        "derivatives/rater1 comes first (bids.derivatives order)"
    )
    assert reasons["sub-01/anat/sub-01_label-tumor_mask.nii.gz"].startswith(
        "derivatives/rater1 has one"
    )
    # ... or in the configured order; a named pipeline that is not there is listed.
    table, notes = read(root, derivatives=("rater2", "missing"), derivatives_first=True)
    assert "derivatives/rater2/" in table.loc[0, "tumor_mask"]
    assert (
        "derivatives/missing",
        "named in bids.derivatives but there is no such folder",
    ) in notes.skipped
    # No derivatives at all.
    table, notes = read(root, derivatives=())
    assert not notes.choices


def test_derivatives_of_sessions_without_a_raw_scan_are_listed(tmp_path: Path):
    root = bids(
        tmp_path / "b",
        "sub-01/anat/sub-01_T1w.nii.gz",
        "derivatives/manual/sub-09/anat/sub-09_label-tumor_mask.nii.gz",
        "derivatives/manual/sub-01/ses-2/anat/sub-01_ses-2_label-tumor_mask.nii.gz",
        "derivatives/manual/sub-01/anat/sub-02_label-tumor_mask.nii.gz",
    )
    _, notes = read(root)
    assert dict(notes.skipped) == {
        "derivatives/manual/sub-09/anat/sub-09_label-tumor_mask.nii.gz": (
            "no raw session sub-09 with a T1w scan to go with"
        ),
        "derivatives/manual/sub-01/ses-2/anat/sub-01_ses-2_label-tumor_mask.nii.gz": (
            "no raw session sub-01/ses-2 with a T1w scan to go with"
        ),
        "derivatives/manual/sub-01/anat/sub-02_label-tumor_mask.nii.gz": (
            "the file name's sub/ses entities do not match its folder (sub-01)"
        ),
    }


def test_a_derivative_mask_on_another_grid_is_a_problem_naming_it(tmp_path: Path):
    root = bids(tmp_path / "b", "sub-01/anat/sub-01_T1w.nii.gz")
    mask = root / "derivatives/p/sub-01/anat/sub-01_desc-brain_mask.nii.gz"
    write(mask, brain(shape=(10, 10, 10)))
    with pytest.raises(
        AtlasflowError, match=r"brain_mask .*sub-01_desc-brain_mask.nii.gz is not on the grid"
    ):
        read(root)


# ------------------------------------------------------------------ smaller cases


def test_gzipped_file_named_nii_gets_a_hint(tmp_path: Path, capsys):
    root = bids(tmp_path / "b", "sub-01/anat/sub-01_T1w.nii.gz")
    plain = root / "sub-01/anat/sub-01_T1w.nii.gz"
    renamed = plain.with_name("sub-01_T1w.nii")
    plain.rename(renamed)
    assert gzip.decompress(renamed.read_bytes())[:4]  # it is gzip data
    assert cli_main(["validate", str(root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].endswith(
        "sub-01_T1w.nii: is gzip-compressed but named .nii: rename it to .nii.gz"
    )


def test_subject_with_both_anat_and_session_folders_is_one_clear_problem(tmp_path: Path, capsys):
    root = bids(
        tmp_path / "b",
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        "sub-02/anat/sub-02_T1w.nii.gz",
    )
    assert cli_main(["validate", str(root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "atlasflow validate: error: sub-01: has scans both in anat/ and in session folders (ses-1); "
        "a BIDS subject keeps them either in anat/ (no sessions) or in ses-<label>/anat/ - move "
        "sub-01/anat/ into a ses-<label>/ folder"
    ]


def test_look_alike_inputs_are_skipped_with_reasons_in_the_tsv_and_the_report(tmp_path: Path):
    from atlasflow.reports.cohort import _skipped_html

    root = bids(
        tmp_path / "b",
        "sub-01/anat/sub-01_run-1_T1w.nii.gz",
        "sub-01/anat/sub-01_run-2_T1w.nii.gz",
        "sub-05/1/anat/sub-05_ses-1_T1w.nii.gz",  # session folder without ses-
        "sub-06/anat/sub-06_t1w.nii.gz",  # lowercase suffix
    )
    (root / "sub-07/anat/sub-07_T1w.nii.gz").mkdir(parents=True)  # a folder named like a scan
    (root / "sub-08/func").mkdir(parents=True)  # no anat/
    out = tmp_path / "out"
    config = {"cohort": str(root), "outdir": str(out)}
    tsv = Path(out / "provenance" / "skipped_inputs.tsv")
    args = ["provenance", "--config-json", json.dumps(config), "--workflow-dir", str(tmp_path)]
    assert cli_main([*args, "--skipped", str(tsv)]) == 0
    rows = pd.read_csv(tsv, sep="\t", dtype=str)
    assert list(rows.columns) == ["path", "status", "reason"]
    listed = dict(zip(rows["path"], rows["reason"], strict=True))
    assert listed == {
        "sub-05/1": "has anat/ but is not named ses-<label> (not a BIDS session)",
        "sub-06/anat/sub-06_t1w.nii.gz": "suffix 't1w' is not 'T1w' (BIDS is case-sensitive)",
        "sub-07/anat/sub-07_T1w.nii.gz": "is a folder, not a NIfTI file",
        "sub-08": "no anat/ or ses-*/anat/ folder",
        "sub-01/anat/sub-01_run-1_T1w.nii.gz": "run 1; bids.choose last-run takes the highest run",
    }
    assert (
        rows.set_index("path").loc["sub-01/anat/sub-01_run-1_T1w.nii.gz", "status"] == "passed-over"
    )
    html = _skipped_html(out)
    assert "Inputs skipped (5)" in html and "sub-06/anat/sub-06_t1w.nii.gz" in html
    # Nothing skipped: a header-only TSV and no section.
    clean = bids(tmp_path / "clean", "sub-01/anat/sub-01_T1w.nii.gz")
    config["cohort"], config["outdir"] = str(clean), str(tmp_path / "out2")
    args[2] = json.dumps(config)
    tsv2 = tmp_path / "out2" / "provenance" / "skipped_inputs.tsv"
    assert cli_main([*args, "--skipped", str(tsv2)]) == 0
    assert tsv2.read_text() == "path\tstatus\treason\n"
    assert _skipped_html(tmp_path / "out2") == ""


def test_dataset_description_is_bids_derivatives(tmp_path: Path):
    root = bids(tmp_path / "b", "sub-01/anat/sub-01_T1w.nii.gz")
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "x", "BIDSVersion": "1.8.0", "DatasetDOI": "doi:10.1/abc"})
    )
    config = json.dumps({"cohort": str(root)})
    target = tmp_path / "out" / "dataset_description.json"
    args = ["provenance", "--config-json", config, "--workflow-dir", str(tmp_path)]
    assert cli_main([*args, "--description", str(target)]) == 0
    description = json.loads(target.read_text())
    from importlib import metadata

    assert description["Name"] == "atlasflow"
    assert description["DatasetType"] == "derivative"
    assert description["BIDSVersion"] == "1.9.0"
    (generated,) = description["GeneratedBy"]
    assert generated["Name"] == "atlasflow" and generated["Version"] == metadata.version(
        "atlasflow"
    )
    assert description["SourceDatasets"] == [
        {"URL": root.resolve().as_uri(), "DOI": "doi:10.1/abc"}
    ]
    first = target.read_bytes()
    assert cli_main([*args, "--description", str(target)]) == 0
    assert target.read_bytes() == first  # no time in it: a rerun writes the same bytes
    # A manifest cohort names no source dataset; asking for nothing is an error.
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"subject,session,t1w\n01,1,{root / 'sub-01/anat/sub-01_T1w.nii.gz'}\n")
    args[2] = json.dumps({"cohort": str(manifest)})
    assert cli_main([*args, "--description", str(target)]) == 0
    assert "SourceDatasets" not in json.loads(target.read_text())
    assert cli_main(args) == 1


def test_provenance_record_lists_choices_and_skipped_inputs(tmp_path: Path):
    from atlasflow.runtime import provenance as pv

    root = bids(
        tmp_path / "b",
        "sub-01/anat/sub-01_run-1_T1w.nii.gz",
        "sub-01/anat/sub-01_run-2_T1w.nii.gz",
        "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz",
    )
    notes = CohortNotes()
    table, notes = read(root)
    record = pv.build_provenance({"cohort": str(root)}, tmp_path, table, notes=notes)
    assert record["cohort"]["choices"][0]["chosen"] == "sub-01/anat/sub-01_run-2_T1w.nii.gz"
    assert record["cohort"]["choices"][0]["passed_over"][0]["path"].endswith("run-1_T1w.nii.gz")
    assert record["cohort"]["skipped"] == [
        {
            "path": "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz",
            "reason": "a derivative (desc-preproc), not a raw scan",
        }
    ]


def test_a_session_without_the_t1w_that_anchors_the_folder_says_what_it_has(tmp_path: Path):
    """One session with a T1w (so the T1w anchors the folder) and one with a post-contrast T1w
    and a FLAIR only: the second is skipped, and the note says it has them and how to use them."""
    root = bids(
        tmp_path,
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_ce-gd_T1w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_FLAIR.nii.gz",
    )
    table, notes = read(root)
    assert list(table["session"]) == ["1"]
    assert dict(notes.skipped)["sub-01/ses-2/anat"] == (
        "no sub-*_T1w.nii[.gz] file (it has a contrast-enhanced T1w (ce-) and a FLAIR: config "
        "contrasts.reference anchors every session by another contrast)"
    )
