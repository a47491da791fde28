"""Cohort input (manifest CSV, BIDS folder) and its validation: one test per bad input, plus the good paths."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from factories import SCAN_AFFINE as AFFINE
from factories import SCAN_SHAPE as SHAPE
from factories import brain, head, write_manifest
from factories import manifest_rows as rows_of
from factories import refused as fails
from factories import validated as check
from factories import write_nifti as write

from atlasflow.cli.main import main as cli_main
from atlasflow.cohort import columns
from atlasflow.cohort.images import clear_image_cache, grid_mismatch, validate_image
from atlasflow.cohort.manifest import load_cohort
from atlasflow.cohort.validate import validate_cohort
from atlasflow.errors import AtlasflowError


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_image_cache()
    yield
    clear_image_cache()


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    """A valid two-subject manifest: subject 01 with two dated sessions and tumour masks,
    subject 02 cross-sectional (empty session) with labels and a brain mask, 'sub-' prefixed."""
    d = tmp_path / "data"
    mask = brain()
    tumour = np.zeros(SHAPE, np.uint8)
    tumour[7:9, 8:10, 6:8] = 1
    labels = (brain() * 3 + (head(5) > 60)).astype(np.int16)
    write(d / "s01_a.nii.gz", head(1))
    write(d / "s01_a_tumor.nii.gz", tumour)
    write(d / "s01_b.nii.gz", head(2))
    write(d / "s01_b_tumor.nii.gz", np.zeros(SHAPE, np.uint8))  # no visible tumour: allowed
    write(d / "s02.nii", head(3))
    write(d / "s02_labels.nii.gz", labels)
    write(d / "s02_brain.nii.gz", mask)
    rows = [
        {
            "subject": "sub-02",
            "session": "",
            "t1w": "data/s02.nii",
            "labels": "data/s02_labels.nii.gz",
            "tumor_mask": "",
            "brain_mask": "data/s02_brain.nii.gz",
            "acq_date": "",
            "group": "control",
        },
        {
            "subject": "01",
            "session": "ses-2",
            "t1w": "data/s01_b.nii.gz",
            "labels": "",
            "tumor_mask": "data/s01_b_tumor.nii.gz",
            "brain_mask": "",
            "acq_date": "2021-03-01",
            "group": "patient",
        },
        {
            "subject": "01",
            "session": "1",
            "t1w": "data/s01_a.nii.gz",
            "labels": "",
            "tumor_mask": "data/s01_a_tumor.nii.gz",
            "brain_mask": "",
            "acq_date": "2020-11-15",
            "group": "patient",
        },
    ]
    return write_manifest(tmp_path, rows)


def edit(manifest: Path, row: int, **values) -> Path:
    rows = rows_of(manifest)
    rows[row].update(values)
    return write_manifest(manifest.parent, rows)


# --------------------------------------------------------------------------------- good input


def test_manifest_is_normalised_and_sorted(cohort: Path):
    table = check(cohort)
    assert list(table["subject"]) == ["01", "01", "02"]
    assert list(table["session"]) == ["1", "2", "1"]  # by date within subject; empty session -> "1"
    assert list(table["acq_date"]) == ["2020-11-15", "2021-03-01", ""]
    for path in table["t1w"]:
        assert os.path.isabs(path) and os.path.exists(path)
    assert table.loc[2, "labels"].endswith("s02_labels.nii.gz") and table.loc[0, "labels"] == ""
    assert list(table["origin"]) == [
        "manifest.csv row 4",
        "manifest.csv row 3",
        "manifest.csv row 2",
    ]
    n = len(columns.known_columns())
    assert list(table.columns[:n]) == list(columns.known_columns())


def test_dates_order_sessions_even_against_their_labels(cohort: Path):
    rows = rows_of(cohort)
    rows[1]["acq_date"], rows[2]["acq_date"] = (
        "2019-01-01",
        "2020-01-01",
    )  # session 2 is the earlier
    table = check(write_manifest(cohort.parent, rows))
    assert list(table["session"][:2]) == ["2", "1"]


def test_sessions_without_dates_sort_naturally(tmp_path: Path):
    rows = []
    for session in ("10", "2", "1"):
        write(tmp_path / f"s{session}.nii.gz", head(int(session)))
        rows.append({"subject": "7", "session": session, "t1w": f"s{session}.nii.gz"})
    table = check(write_manifest(tmp_path, rows))
    assert list(table["session"]) == ["1", "2", "10"]


def test_extra_columns_are_kept(cohort: Path):
    rows = rows_of(cohort)
    for i, row in enumerate(rows):
        row["age"] = str(40 + i)
    table = check(write_manifest(cohort.parent, rows))
    assert "age" in table.columns and sorted(table["age"]) == ["40", "41", "42"]


def test_header_only_validation_reads_no_voxels(cohort: Path):
    rows = rows_of(cohort)
    path = cohort.parent / rows[1]["t1w"]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # the header is intact, the voxels are not
    assert len(check(cohort, check_data=False)) == 3
    fails(cohort, "truncated")


def test_validation_writes_nothing(cohort: Path):
    def snapshot():
        return {p: p.stat().st_mtime_ns for p in cohort.parent.rglob("*")}

    before = snapshot()
    check(cohort)
    assert cli_main(["validate", str(cohort)]) == 0
    assert snapshot() == before


def test_cache_notices_a_changed_file(cohort: Path):
    check(cohort)
    path = cohort.parent / "data" / "s01_a.nii.gz"
    data = head(1)
    data[3, 3, 3] = np.nan
    write(path, data)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    fails(cohort, "NaN")


def test_schema_is_the_source_of_columns():
    schema = yaml.safe_load(open(columns.schema_path()))
    assert columns.known_columns() == tuple(schema["properties"])
    assert columns.required_columns() == ("subject", "t1w")
    assert set(columns.IMAGE_COLUMNS) <= set(schema["properties"])
    assert (
        Path(columns.__file__).parents[1] / "data" / "manifest.schema.yaml"
    ).resolve() == columns.schema_path().resolve()


# ------------------------------------------------------------------------------ BIDS folders


def make_bids(root: Path) -> Path:
    anat1 = root / "sub-01" / "ses-1" / "anat"
    anat2 = root / "sub-01" / "ses-2" / "anat"
    anat3 = root / "sub-02" / "anat"
    tumour = np.zeros(SHAPE, np.uint8)
    tumour[6:9, 6:9, 6:9] = 1
    write(anat1 / "sub-01_ses-1_T1w.nii.gz", head(1))
    write(anat1 / "sub-01_ses-1_label-tumor_mask.nii.gz", tumour)
    write(anat1 / "sub-01_ses-1_desc-brain_mask.nii.gz", brain())
    write(anat2 / "sub-01_ses-2_acq-mprage_T1w.nii", head(2))
    write(anat2 / "sub-01_ses-2_label-tumor_desc-manual_mask.nii.gz", tumour)
    write(anat3 / "sub-02_T1w.nii.gz", head(3))
    write(anat3 / "sub-02_desc-aseg_dseg.nii.gz", brain().astype(np.int16) * 4)
    write(anat3 / "sub-02_label-brain_mask.nii.gz", brain())
    (anat3 / "sub-02_T1w.json").write_text("{}")
    # Anything under derivatives/ is ignored, even files that look like raw scans.
    write(root / "derivatives" / "x" / "sub-03" / "anat" / "sub-03_T1w.nii.gz", head(4))
    (root / "sub-01" / "sub-01_sessions.tsv").write_text(
        "session_id\tacq_time\nses-1\t2020-01-02T10:11:12\nses-2\t2020-06-30T08:00:00\n"
    )
    (root / "participants.tsv").write_text(
        "participant_id\tage\tgroup\nsub-01\t50\tpatient\nsub-02\t41\tn/a\n"
    )
    return root


def test_bids_folder_is_discovered(tmp_path: Path):
    root = make_bids(tmp_path / "bids")
    table = validate_cohort(load_cohort(root), root)
    assert list(zip(table["subject"], table["session"], strict=True)) == [
        ("01", "1"),
        ("01", "2"),
        ("02", "1"),
    ]
    assert list(table["acq_date"]) == ["2020-01-02", "2020-06-30", ""]
    assert table.loc[0, "tumor_mask"].endswith("sub-01_ses-1_label-tumor_mask.nii.gz")
    assert table.loc[1, "tumor_mask"].endswith("sub-01_ses-2_label-tumor_desc-manual_mask.nii.gz")
    assert table.loc[0, "brain_mask"].endswith("sub-01_ses-1_desc-brain_mask.nii.gz")
    assert table.loc[2, "brain_mask"].endswith("sub-02_label-brain_mask.nii.gz")
    assert table.loc[2, "labels"].endswith("sub-02_desc-aseg_dseg.nii.gz")
    assert table.loc[1, "t1w"].endswith(".nii")
    assert list(table["group"]) == ["patient", "patient", ""]
    assert table.loc[1, "origin"] == "sub-01/ses-2/anat/sub-01_ses-2_acq-mprage_T1w.nii"
    assert not any("derivatives" in p for p in table["t1w"])


def test_bids_and_manifest_give_the_same_table(tmp_path: Path):
    root = make_bids(tmp_path / "bids")
    from_bids = validate_cohort(load_cohort(root), root)
    manifest = tmp_path / "m.csv"
    from_bids.drop(columns="origin").to_csv(manifest, index=False)
    from_csv = check(manifest)
    pd.testing.assert_frame_equal(from_bids.drop(columns="origin"), from_csv.drop(columns="origin"))


def test_bids_two_t1w_in_one_session_are_chosen_from(tmp_path: Path):
    """Two T1w scans in one session: the highest run is taken by default; bids.choose error
    refuses (tests/test_bids_wild.py covers the rule)."""
    from atlasflow.cohort.selection import BidsOptions

    root = make_bids(tmp_path / "bids")
    write(root / "sub-02" / "anat" / "sub-02_run-2_T1w.nii.gz", head(9))
    assert load_cohort(root).loc[2, "t1w"].endswith("sub-02_run-2_T1w.nii.gz")
    with pytest.raises(AtlasflowError, match=r"sub-02/anat: 2 T1w files .*bids.choose is error"):
        load_cohort(root, options=BidsOptions(choose="error"))


def test_bids_unparsable_acq_time_names_the_tsv_row(tmp_path: Path):
    root = make_bids(tmp_path / "bids")
    (root / "sub-01" / "sub-01_sessions.tsv").write_text(
        "session_id\tacq_time\nses-1\t2020-01-02\nses-2\tlast May\n"
    )
    with pytest.raises(
        AtlasflowError, match=r"sub-01_sessions.tsv row 3 \(session 2\): acq_time 'last May'"
    ):
        load_cohort(root)


def test_bids_folder_without_t1w(tmp_path: Path):
    root = tmp_path / "empty_bids"
    write(root / "sub-01" / "anat" / "sub-01_T2w.nii.gz", head(1))
    write(root / "derivatives" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", head(1))
    with pytest.raises(AtlasflowError, match="no T1w scans found"):
        load_cohort(root)


def test_validate_table_is_a_manifest_validate_accepts(tmp_path: Path, capsys):
    """BIDS folder -> validate --table > m.csv -> validate m.csv: same subjects and sessions."""
    root = make_bids(tmp_path / "bids")
    assert cli_main(["validate", "--table", str(root)]) == 0
    captured = capsys.readouterr()
    assert "OK - 3 scan sessions of 2 subjects" in captured.err
    assert "OK" not in captured.out and "origin" not in captured.out.splitlines()[0]
    manifest = tmp_path / "m.csv"
    manifest.write_text(captured.out)
    assert cli_main(["validate", str(manifest)]) == 0
    assert "OK - 3 scan sessions of 2 subjects" in capsys.readouterr().out
    from_bids = validate_cohort(load_cohort(root), root)
    from_csv = validate_cohort(load_cohort(manifest), manifest)
    pd.testing.assert_frame_equal(from_bids.drop(columns="origin"), from_csv.drop(columns="origin"))
    from atlasflow.cohort.planning import resolve_cohort  # what the workflow reads

    planned = resolve_cohort({"cohort": str(manifest)}, check_data=False)
    assert list(zip(planned["subject"], planned["session"], strict=True)) == [
        ("01", "1"),
        ("01", "2"),
        ("02", "1"),
    ]


def make_sessionless_bids(root: Path) -> Path:
    """Two subjects without sessions (``sub-S/anat/``), one with a FLAIR, one with a label map."""
    write(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", head(1))
    write(root / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz", head(4))
    write(root / "sub-02" / "anat" / "sub-02_T1w.nii.gz", head(2))
    write(root / "sub-02" / "anat" / "sub-02_dseg.nii.gz", brain().astype(np.int16) * 3)
    return root


def test_a_cohort_without_sessions_keeps_them_empty_and_round_trips(tmp_path: Path, capsys):
    """BIDS folder without ses- folders -> session "" (no invented "1"); the summary says so;
    validate --table writes the sessions empty and reading that manifest gives the same table."""
    root = make_sessionless_bids(tmp_path / "bids")
    assert cli_main(["validate", "--table", str(root)]) == 0
    captured = capsys.readouterr()
    assert "OK - 2 scan sessions of 2 subjects; no follow-up; no sessions" in captured.err
    assert "ses-" not in captured.out
    manifest = tmp_path / "m.csv"
    manifest.write_text(captured.out)
    written = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    assert list(written["session"]) == ["", ""] and list(written["subject"]) == ["01", "02"]
    from_bids, from_csv = check(root), check(manifest)
    assert list(from_bids["session"]) == ["", ""]
    pd.testing.assert_frame_equal(from_bids.drop(columns="origin"), from_csv.drop(columns="origin"))
    assert cli_main(["validate", "--table", str(manifest)]) == 0
    assert capsys.readouterr().out == captured.out  # and again: an empty session stays empty
    from atlasflow.cohort.planning import resolve_cohort  # what the workflow reads

    planned = resolve_cohort({"cohort": str(manifest)}, check_data=False)
    assert list(planned["session"]) == ["", ""]


def test_a_cohort_mixing_scans_with_and_without_sessions_names_them_ses_1(tmp_path: Path, capsys):
    """sub-01 in ses-1/ and ses-2/, sub-02 in anat/: the workflow names a scan's files with a
    session or without for the whole cohort, so sub-02's scan is ses-1, and validate says so."""
    from atlasflow.cohort.selection import CohortNotes

    root = make_bids(tmp_path / "bids")
    notes = CohortNotes()
    table = validate_cohort(load_cohort(root, notes), root, notes=notes)
    assert list(table["session"]) == ["1", "2", "1"]
    assert notes.sessions_filled == ["sub-02/anat/sub-02_T1w.nii.gz"]
    assert cli_main(["validate", str(root)]) == 0
    assert (
        "; 1 scan without a session named ses-1 (e.g. sub-02/anat/sub-02_T1w.nii.gz): the cohort "
        "mixes scans with and without sessions, so every output has a ses- level"
    ) in capsys.readouterr().out


def test_two_rows_of_a_subject_without_sessions_are_one_session_twice(tmp_path: Path):
    """Two scans of one subject need session labels to be told apart (and ordered)."""
    write(tmp_path / "a.nii.gz", head(1))
    write(tmp_path / "b.nii.gz", head(2))
    rows = [
        {"subject": "01", "session": "", "t1w": "a.nii.gz"},
        {"subject": "01", "session": "", "t1w": "b.nii.gz"},
    ]
    fails(
        write_manifest(tmp_path, rows),
        "manifest.csv row 3 (subject 01, no session): same subject and session as manifest.csv "
        "row 2 (neither has a session: give each scan of a subject its session label)",
    )


def test_bids_tsv_with_stray_trailing_tabs_and_spaces(tmp_path: Path):
    root = make_bids(tmp_path / "bids")
    (root / "sub-01" / "sub-01_sessions.tsv").write_text(
        "session_id\tacq_time\t\nses-1\t2020-01-02T10:11:12 \t\t\nses-2\t2020-06-30\t \n"
    )
    (root / "participants.tsv").write_text(
        "participant_id\tage\tgroup\t\t\nsub-01\t50\tpatient\t\nsub-02\t41\tn/a  \n\t\n"
    )
    table = validate_cohort(load_cohort(root), root)
    assert list(table["acq_date"]) == ["2020-01-02", "2020-06-30", ""]
    assert list(table["group"]) == ["patient", "patient", ""]
    # A value in an unnamed column, or a short row, is still an error.
    (root / "participants.tsv").write_text("participant_id\tgroup\nsub-01\tpatient\tx\n")
    with pytest.raises(
        AtlasflowError, match=r"participants.tsv row 2: has 3 values, the header has 2"
    ):
        load_cohort(root)


@pytest.mark.parametrize(
    "value",
    [
        "2020-01-02T10:11:12Z",
        "2020-01-02T10:11:12.123456Z",
        "2020-01-02T10:11:12.5",
        "2020-01-02T10:11:12+02:00",
    ],
)
def test_bids_acq_time_with_zone_or_fraction(tmp_path: Path, value: str):
    root = make_bids(tmp_path / "bids")
    (root / "sub-01" / "sub-01_sessions.tsv").write_text(
        f"session_id\tacq_time\nses-1\t{value}\nses-2\t2020-06-30T08:00:00Z\n"
    )
    table = load_cohort(root)
    assert list(table["acq_date"][:2]) == ["2020-01-02", "2020-06-30"]


@pytest.mark.parametrize("value", ["2020-01-02T25:00:00Z", "2020-01-02TZ", "2020-13-02T10:00Z"])
def test_bids_acq_time_still_strict(tmp_path: Path, value: str):
    root = make_bids(tmp_path / "bids")
    (root / "sub-01" / "sub-01_sessions.tsv").write_text(
        f"session_id\tacq_time\nses-1\t{value}\nses-2\t2020-06-30\n"
    )
    with pytest.raises(
        AtlasflowError, match=r"row 2 \(session 1\): acq_time .* is not an ISO date"
    ):
        load_cohort(root)


def test_bids_symlink_loops_are_skipped_and_listed(tmp_path: Path, capsys):
    root = make_bids(tmp_path / "bids")
    (root / "sub-03").symlink_to("sub-03")  # a subject folder linking to itself
    (root / "sub-02" / "ses-x").symlink_to("ses-x")
    loop = root / "sub-02" / "anat" / "sub-02_run-2_T1w.nii.gz"
    loop.symlink_to(loop.name)
    skipped: list = []
    table = load_cohort(root, skipped)
    assert len(table) == 3
    assert set(skipped) == {
        ("sub-03", "symbolic link loop (cannot be read)"),
        ("sub-02/ses-x", "symbolic link loop (cannot be read)"),
        ("sub-02/anat/sub-02_run-2_T1w.nii.gz", "symbolic link loop (cannot be read)"),
    }
    assert cli_main(["validate", str(root)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert f"warning: skipped {root}/sub-03: symbolic link loop" in captured.err
    # The cohort path itself a loop: one line naming it.
    (tmp_path / "self").symlink_to("self")
    (tmp_path / "self.csv").symlink_to("self.csv")
    for name in ("self", "self.csv"):
        assert cli_main(["validate", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"atlasflow validate: error: {tmp_path / name}: is a symbolic link loop "
            "(it links, maybe through others, to itself)"
        ]


def test_bids_skipped_inputs_are_warned_not_silent(tmp_path: Path, capsys):
    root = make_bids(tmp_path / "bids")
    (root / "sub-04" / "func").mkdir(parents=True)  # subject without anat/
    write(root / "sub-05" / "1" / "anat" / "sub-05_ses-1_T1w.nii.gz", head(5))  # no ses- prefix
    write(root / "sub-06" / "anat" / "sub-06_t1w.nii.gz", head(6))  # lowercase suffix
    (root / "sub-07" / "anat" / "sub-07_T1w.nii.gz").mkdir(parents=True)  # a folder
    (root / "sub-01" / "ses-3" / "func").mkdir(parents=True)  # session without anat/
    assert cli_main(["validate", str(root)]) == 0
    captured = capsys.readouterr()
    assert "OK - 3 scan sessions of 2 subjects" in captured.out
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    prefix = f"atlasflow validate: warning: skipped {root}/"
    assert warnings == [
        prefix + "sub-01/ses-3: session without an anat/ folder",
        prefix + "sub-04: no anat/ or ses-*/anat/ folder",
        prefix + "sub-05/1: has anat/ but is not named ses-<label> (not a BIDS session)",
        prefix
        + "sub-06/anat/sub-06_t1w.nii.gz: suffix 't1w' is not 'T1w' (BIDS is case-sensitive)",
        prefix + "sub-07/anat/sub-07_T1w.nii.gz: is a folder, not a NIfTI file",
    ]
    # A clean folder gives no warnings.
    clean = make_bids(tmp_path / "clean")
    assert cli_main(["validate", str(clean)]) == 0
    assert capsys.readouterr().err == ""


def test_bids_discovery_is_fast_on_a_large_folder(tmp_path: Path):
    import time

    root = tmp_path / "big"
    for s in range(400):
        for ses in (1, 2):
            anat = root / f"sub-{s:04d}" / f"ses-{ses}" / "anat"
            anat.mkdir(parents=True)
            (anat / f"sub-{s:04d}_ses-{ses}_T1w.nii.gz").touch()
            (anat / f"sub-{s:04d}_ses-{ses}_T1w.json").touch()
    start = time.perf_counter()
    table = load_cohort(root)
    assert len(table) == 800
    assert time.perf_counter() - start < 5.0


# ---------------------------------------------------------------- bad input: the manifest file


def test_cohort_path_missing(tmp_path: Path):
    with pytest.raises(AtlasflowError, match="no such file or folder"):
        load_cohort(tmp_path / "nope.csv")


def test_cohort_path_neither_csv_nor_folder(cohort: Path):
    nifti = cohort.parent / "data" / "s01_a.nii.gz"
    with pytest.raises(
        AtlasflowError, match=r"expected a manifest \.csv file or a BIDS folder.*\.nii\.gz"
    ):
        load_cohort(nifti)


def test_manifest_empty(tmp_path: Path):
    (tmp_path / "m.csv").write_text("")
    with pytest.raises(AtlasflowError, match="m.csv: the manifest is empty"):
        load_cohort(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("subject,session,t1w\n\n")
    with pytest.raises(AtlasflowError, match="header but no rows"):
        load_cohort(tmp_path / "m.csv")


def test_manifest_binary(tmp_path: Path):
    (tmp_path / "m.csv").write_bytes(gzip.compress(b"subject,session,t1w\n01,1,a.nii.gz\n"))
    with pytest.raises(AtlasflowError, match="m.csv: (is a binary file|is not UTF-8)"):
        load_cohort(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_bytes(b"subject,session,t1w\n01,1,\x00\x01\x02\n")
    with pytest.raises(AtlasflowError, match="is a binary file"):
        load_cohort(tmp_path / "m.csv")


def test_manifest_missing_required_column(cohort: Path):
    table = pd.read_csv(cohort, dtype=str, keep_default_na=False).drop(columns="subject")
    table.to_csv(cohort, index=False)
    with pytest.raises(AtlasflowError, match="manifest.csv: missing required column 'subject'"):
        load_cohort(cohort)


def test_manifest_without_session_column_is_sessionless(cohort: Path):
    """A scan list with no session column (one row per subject) is a cohort without sessions;
    two rows of one subject are then the usual duplicate, naming the row."""
    table = pd.read_csv(cohort, dtype=str, keep_default_na=False)
    one_each = table.drop_duplicates("subject").drop(columns=["session", "acq_date"])
    one_each.to_csv(cohort, index=False)
    loaded = load_cohort(cohort)
    assert list(loaded["session"]) == ["", ""]
    table.drop(columns=["session", "acq_date"]).to_csv(cohort, index=False)
    fails(cohort, "(subject 01, no session): same subject and session as manifest.csv row")


def test_manifest_with_semicolons_gets_a_hint(tmp_path: Path):
    (tmp_path / "m.csv").write_text("subject;session;t1w\n01;1;a.nii.gz\n")
    with pytest.raises(AtlasflowError, match="another separator"):
        load_cohort(tmp_path / "m.csv")


def test_manifest_misspelt_column(cohort: Path):
    table = pd.read_csv(cohort, dtype=str, keep_default_na=False).rename(
        columns={"tumor_mask": "tumour_mask"}
    )
    table.to_csv(cohort, index=False)
    with pytest.raises(
        AtlasflowError, match="unknown column 'tumour_mask'; did you mean 'tumor_mask'"
    ):
        load_cohort(cohort)


def test_manifest_ragged_row(tmp_path: Path):
    (tmp_path / "m.csv").write_text("subject,session,t1w\n01,1,a.nii.gz\n02,1,b.nii.gz,extra\n")
    with pytest.raises(AtlasflowError, match="m.csv row 3: has 4 values but the header"):
        load_cohort(tmp_path / "m.csv")


# ------------------------------------------------------------------- bad input: rows and dates


def test_duplicate_subject_session(cohort: Path):
    # "sub-01"/"ses-1" and "01"/"1" are the same session once normalised.
    rows = rows_of(cohort)
    rows.append({**rows[2], "subject": "sub-01", "session": "ses-1", "t1w": "data/s02.nii"})
    fails(
        write_manifest(cohort.parent, rows),
        "manifest.csv row 5 (subject 01, session 1)",
        "same subject and session as manifest.csv row 4",
    )


def test_empty_session_duplicates_session_1(cohort: Path):
    rows = rows_of(cohort)
    rows.append(
        {**rows[0], "session": "1", "t1w": "data/s01_a.nii.gz", "labels": "", "brain_mask": ""}
    )
    fails(
        write_manifest(cohort.parent, rows),
        "row 5 (subject 02, session 1)",
        "same subject and session",
    )


def test_same_t1w_file_twice(cohort: Path):
    fails(
        edit(cohort, 1, t1w="data/s01_a.nii.gz"),
        "manifest.csv row",
        "is also the t1w of manifest.csv row",
    )


@pytest.mark.parametrize("value", ["2020-13-01", "01/02/2020", "2020-02-30", "yesterday"])
def test_unparsable_date(cohort: Path, value: str):
    fails(
        edit(cohort, 1, acq_date=value),
        "manifest.csv row 3 (subject 01, session 2)",
        f"acq_date '{value}' is not valid",
        "YYYY-MM-DD",
    )


def test_two_sessions_on_the_same_date(cohort: Path):
    fails(
        edit(cohort, 1, acq_date="2020-11-15"),
        "(subject 01, session",
        "acq_date 2020-11-15 is also the date of session",
        "order and the growth per day undefined",
    )


def test_dates_for_some_sessions_only(cohort: Path):
    fails(
        edit(cohort, 1, acq_date=""),
        "manifest.csv row 3 (subject 01, session 2): acq_date is empty",
        "other sessions of subject 01 have one",
        "for every session of the subject, or for none",
    )


def test_date_in_the_future(cohort: Path):
    fails(edit(cohort, 1, acq_date="2999-01-01"), "row 3", "is in the future")


@pytest.mark.parametrize("session", ["ses_2", "base line", "1.0", "ses-2b!"])
def test_session_not_bids_safe(cohort: Path, session: str):
    fails(
        edit(cohort, 1, session=session),
        "manifest.csv row 3",
        "session '",
        "is not valid",
        "letters and digits",
    )


def test_subject_not_bids_safe_or_empty(cohort: Path):
    fails(edit(cohort, 1, subject="01_a"), "subject '01_a' is not valid")
    fails(edit(cohort, 1, subject=""), "row 3 (subject ?, session 2): subject is empty")


def test_t1w_empty_or_not_nifti_name(cohort: Path):
    fails(edit(cohort, 1, t1w=""), "row 3", "t1w is empty, and the T1w anchors every session", "set contrasts.reference")
    fails(edit(cohort, 1, t1w="data/scan.mgz"), "row 3", "t1w '", ".nii or .nii.gz")


# ----------------------------------------------------------------------- bad input: images


def test_image_file_missing(cohort: Path):
    (cohort.parent / "data" / "s02_labels.nii.gz").unlink()
    fails(
        cohort,
        "manifest.csv row 2 (subject 02, session 1): labels ",
        "s02_labels.nii.gz: file not found",
    )


def test_text_renamed_as_nifti(cohort: Path):
    (cohort.parent / "data" / "s01_b.nii.gz").write_text("subject,session\n01,1\n")
    fails(cohort, "row 3 (subject 01, session 2): t1w", "not a readable NIfTI image")
    (cohort.parent / "data" / "s02.nii").write_text("hello, I am not an image" * 40)
    with pytest.raises(AtlasflowError) as info:  # both broken files named in one run
        check(cohort)
    lines = str(info.value).splitlines()
    assert lines[0].endswith("manifest.csv: 2 problems")
    assert "row 2" in lines[1] and "row 3" in lines[2]
    assert all("not a readable NIfTI image" in line for line in lines[1:])


def test_truncated_gzip(cohort: Path):
    path = cohort.parent / "data" / "s01_a.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * 0.8)])
    fails(cohort, "row 4 (subject 01, session 1): t1w", "is truncated: the gzip stream ends early")


def test_gzip_with_bad_checksum(cohort: Path):
    path = cohort.parent / "data" / "s01_a.nii.gz"
    raw = bytearray(path.read_bytes())
    raw[-6] ^= 0xFF  # CRC32 in the gzip trailer
    path.write_bytes(bytes(raw))
    fails(cohort, "row 4", "compressed data are corrupt")


def test_multi_member_gzip_is_fine(cohort: Path):
    path = cohort.parent / "data" / "s01_a.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert len(check(cohort)) == 3


def test_truncated_uncompressed_nifti_is_found_from_the_header(cohort: Path):
    path = cohort.parent / "data" / "s02.nii"
    path.write_bytes(path.read_bytes()[:-100])
    fails(cohort, "row 2", "is truncated: the header describes", check_data=False)


def test_4d_image(cohort: Path):
    write(cohort.parent / "data" / "s01_a.nii.gz", np.stack([head(1)] * 3, -1))
    fails(cohort, "row 4", "is 4-D with 3 volumes")


def test_4d_image_with_one_volume_is_fine(cohort: Path):
    write(cohort.parent / "data" / "s01_a.nii.gz", head(1)[..., None])
    assert len(check(cohort)) == 3


def test_2d_image(cohort: Path):
    write(cohort.parent / "data" / "s01_a.nii.gz", head(1)[:, :, 0])
    fails(cohort, "row 4", "is a 2-D image")
    write(cohort.parent / "data" / "s01_a.nii.gz", head(1)[:, :, :1])
    fails(cohort, "row 4", "is a single slice")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_voxels(cohort: Path, bad: float):
    data = head(2)
    data[5, 6, 7] = bad
    write(cohort.parent / "data" / "s01_b.nii.gz", data)
    fails(cohort, "row 3 (subject 01, session 2): t1w", "NaN or infinite")


def test_scaled_values_beyond_float32(cohort: Path):
    write(
        cohort.parent / "data" / "s01_b.nii.gz",
        head(2).astype(np.int16),
        scl_slope=1e38,
        scl_inter=0,
    )
    fails(cohort, "row 3", "beyond the float32 range")


@pytest.mark.parametrize("value", [0.0, 7.5])
def test_constant_image(cohort: Path, value: float):
    write(cohort.parent / "data" / "s01_b.nii.gz", np.full(SHAPE, value, np.float32))
    fails(cohort, "row 3", "image is constant", f"{value:g}")


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"pixdim1": 0.0}, "implausible voxel size 0x2x2 mm in the header"),
        ({"pixdim2": -2.0}, "implausible voxel size 2x-2x2 mm in the header"),
        ({"pixdim3": 50.0}, "implausible voxel size 2x2x50 mm in the header"),
    ],
)
def test_absurd_voxel_size_in_header(cohort: Path, fields: dict, expected: str):
    write(cohort.parent / "data" / "s01_b.nii.gz", head(2), **fields)
    fails(cohort, "row 3", expected, check_data=False)


def test_absurd_voxel_size_in_affine(cohort: Path):
    affine = AFFINE.copy()
    affine[0, 0] = 50.0
    write(cohort.parent / "data" / "s01_b.nii.gz", head(2), affine=affine, pixdim1=2.0)
    fails(cohort, "row 3", "implausible voxel size 50x2x2 mm in the affine", check_data=False)


def test_degenerate_affine(cohort: Path):
    affine = AFFINE.copy()
    affine[:3, 1] = affine[:3, 0]  # two axes point the same way
    write(cohort.parent / "data" / "s01_b.nii.gz", head(2), affine=affine)
    fails(cohort, "row 3", "degenerate", check_data=False)


def test_mask_on_another_grid_shape(cohort: Path):
    write(cohort.parent / "data" / "s01_a_tumor.nii.gz", np.zeros((16, 18, 12), np.uint8))
    fails(
        cohort,
        "row 4 (subject 01, session 1): tumor_mask",
        "not on the grid of the t1w image: shape (16, 18, 12) vs (16, 18, 14)",
    )


def test_labels_on_another_grid_affine(cohort: Path):
    affine = AFFINE.copy()
    affine[0, 3] += 3.0  # 1.5 voxels off
    write(cohort.parent / "data" / "s02_labels.nii.gz", brain().astype(np.int16), affine=affine)
    fails(
        cohort,
        "row 2 (subject 02, session 1): labels",
        "same shape, but the voxel-to-world affines differ",
        "3 mm",
    )


def test_mask_within_tolerance_or_flipped_storage_is_the_same_grid(cohort: Path):
    affine = AFFINE.copy()
    affine[0, 3] += 1e-4  # float round-off between tools
    write(cohort.parent / "data" / "s02_brain.nii.gz", brain(), affine=affine)
    # The same grid stored with the first axis flipped and the last two swapped.
    flip = np.array([[-1, 0, 0, SHAPE[0] - 1], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    flipped = np.ascontiguousarray(brain().astype(np.int16)[::-1].transpose(0, 2, 1) * 2)
    write(cohort.parent / "data" / "s02_labels.nii.gz", flipped, affine=AFFINE @ flip)
    assert len(check(cohort)) == 3
    t1 = validate_image(cohort.parent / "data" / "s02.nii", "t1w")
    other = validate_image(cohort.parent / "data" / "s02_labels.nii.gz", "labels")
    assert grid_mismatch(t1, other) is None
    shifted = validate_image(cohort.parent / "data" / "s01_a.nii.gz", "t1w")
    assert grid_mismatch(t1, shifted) is None  # same grid, another scan


def test_brain_mask_empty(cohort: Path):
    write(cohort.parent / "data" / "s02_brain.nii.gz", np.zeros(SHAPE, np.uint8))
    fails(cohort, "row 2 (subject 02, session 1): brain_mask", "brain mask is empty")


def test_labels_non_integer(cohort: Path):
    write(cohort.parent / "data" / "s02_labels.nii.gz", brain().astype(np.float32) * 2.5)
    fails(cohort, "row 2", "labels", "label map has non-integer values (e.g. 2.5)")


def test_labels_non_integer_through_scaling(cohort: Path):
    write(
        cohort.parent / "data" / "s02_labels.nii.gz",
        brain().astype(np.int16) * 3,
        scl_slope=0.5,
        scl_inter=0,
    )
    fails(cohort, "row 2", "label map has non-integer values (e.g. 1.5)")


def test_labels_all_background(cohort: Path):
    write(cohort.parent / "data" / "s02_labels.nii.gz", np.zeros(SHAPE, np.int16))
    fails(cohort, "row 2", "label map is empty")


@pytest.mark.parametrize(
    "values, expected",
    [
        # 2 is a tumour label (oedema, BraTS default of longitudinal.tumor_labels): accepted
        # since multi-label tumour masks (tests/test_tumour_compartments.py); 255 is not.
        ((0, 255), "value(s) 255 that are not tumour labels"),
        ((0, 0.5), "non-integer values (e.g. 0.5)"),
        ((-1, 1), "negative values (minimum -1)"),
    ],
)
def test_tumour_mask_not_binary(cohort: Path, values: tuple, expected: str):
    data = np.full(SHAPE, values[0], np.float32)
    data[5:8, 5:8, 5:8] = values[1]
    write(cohort.parent / "data" / "s01_b_tumor.nii.gz", data)
    fails(cohort, "row 3 (subject 01, session 2): tumor_mask", "tumour mask has", expected)


def test_big_endian_float_mask_is_read_correctly(cohort: Path):
    path = write(cohort.parent / "data" / "s02_brain.nii.gz", brain().astype(">f8"))
    info = validate_image(path, "brain_mask")
    assert info.stats.maximum == 1.0 and info.stats.nonzero == int(brain().sum())


def test_validate_image_without_row_label(tmp_path: Path):
    with pytest.raises(AtlasflowError, match=r"^t1w .*x.nii.gz: file not found$"):
        validate_image(tmp_path / "x.nii.gz", "t1w")
    with pytest.raises(AtlasflowError, match="ending in .nii or .nii.gz"):
        validate_image(tmp_path / "x.mgz", "t1w")
    (tmp_path / "d.nii.gz").mkdir()
    with pytest.raises(AtlasflowError, match="is a folder"):
        validate_image(tmp_path / "d.nii.gz", "t1w")


# ------------------------------------------------------------------------------ command line


def test_main_validate_ok(cohort: Path, capsys):
    assert cli_main(["validate", str(cohort)]) == 0
    out = capsys.readouterr().out
    assert "OK - 3 scan sessions of 2 subjects" in out and "tumour masks 2" in out


def test_main_validate_error_is_one_line(cohort: Path, capsys):
    (cohort.parent / "data" / "s02_brain.nii.gz").unlink()
    assert cli_main(["validate", str(cohort)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atlasflow validate: error: manifest.csv row 2")
    assert "Traceback" not in captured.err


def test_cli_dispatch(cohort: Path, capsys):
    from atlasflow.cli.main import main

    assert main(["validate", str(cohort), "--headers-only"]) == 0
    assert "headers checked" in capsys.readouterr().out
    # Options before the positional reach the command (they once went through argparse REMAINDER).
    assert main(["--threads", "1", "validate", "--headers-only", str(cohort)]) == 0
    assert "headers checked" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["validate", "--no-such-option", str(cohort)])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


# ------------------------------------------------------------------------------ real data


def test_real_cohort_validates(shared_data: Path, tmp_path: Path):
    """IXI scans with their DLMUSE labels and the GBM pairs with their masks and dates."""
    ixi = sorted((shared_data / "ixi10" / "t1w").glob("*.nii.gz"))[:3]
    rows = []
    for t1w in ixi:
        subject = t1w.name.split("-")[0]
        labels = next((shared_data / "ixi10" / "labels").glob(f"{subject}-*"))
        rows.append({"subject": subject, "session": "", "t1w": str(t1w), "labels": str(labels)})
    dates = pd.read_csv(
        shared_data / "tumor_progression" / "supplementary.csv",
        dtype=str,
        skipinitialspace=True,
        escapechar="\\",
    ).set_index("id")
    gbm = shared_data / "tumor_progression" / "01"
    for session, scan, mask, col in (
        ("pre", "Pre_Scan_T1", "Pre_Mask", "initialDate"),
        ("post", "Post_Scan_T1", "Post_Mask", "endDate"),
    ):
        rows.append(
            {
                "subject": "GBM01",
                "session": session,
                "t1w": str(gbm / f"{scan}.nii.gz"),
                "tumor_mask": str(gbm / f"{mask}.nii.gz"),
                "acq_date": dates.loc["01", col],
            }
        )
    table = check(write_manifest(tmp_path, rows))
    assert list(table[table.subject == "GBM01"]["session"]) == ["pre", "post"]
    # A copy of a real labels file moved by 1.5 voxels is caught.
    img = nib.load(str(rows[0]["labels"]))
    affine = img.affine.copy()
    affine[0, 3] += 3.0
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine), str(tmp_path / "moved.nii.gz"))
    rows[0]["labels"] = str(tmp_path / "moved.nii.gz")
    fails(write_manifest(tmp_path, rows), "labels", "not on the grid")


def test_auto_reference_is_the_t1w_unless_no_session_has_one():
    from atlasflow.cohort.columns import auto_reference

    assert auto_reference([{"t1w", "flair"}, {"flair"}]) == "t1w"  # any T1w: the T1w, as always
    assert auto_reference([{"t1ce", "flair"}, {"t1ce", "flair"}]) == "t1ce"  # a tie: T1-like first
    assert auto_reference([{"flair"}, {"t1ce", "flair"}]) == "flair"  # the one every session has
    assert auto_reference([{"t2w"}, {"pdw"}, {"t2w", "labels"}]) == "t2w"
    assert auto_reference([set(), {"labels"}]) == "t1w"  # nothing to anchor: loading says why


def test_choose_reference_reads_a_bids_folder_or_manifest_and_keeps_a_configured_one(tmp_path):
    from factories import head, write_nifti

    from atlasflow.cohort.manifest import choose_reference

    root = tmp_path / "bids"
    for s in ("01", "02"):
        anat = root / f"sub-{s}" / "ses-1" / "anat"
        write_nifti(anat / f"sub-{s}_ses-1_ce-gadolinium_T1w.nii.gz", head(1))
        write_nifti(anat / f"sub-{s}_ses-1_FLAIR.nii.gz", head(2))
    # a derivative-looking scan in raw anat/ is never an input, so it cannot anchor anything
    write_nifti(root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_space-MNI_T1w.nii.gz", head(3))
    reference, why = choose_reference(root, "auto")
    assert reference == "t1ce"
    assert why == (
        f"no session of {root} has a T1w: every session is anchored by its t1ce (2 of 2 sessions "
        "have one; config contrasts.reference chooses another)"
    )
    assert choose_reference(root, "flair") == ("flair", None)
    # reading the cohort settles auto the same way, whoever calls it (the provenance job too)
    from atlasflow.cohort.planning import resolve_cohort

    table = resolve_cohort({"cohort": str(root), "contrasts": {"reference": "auto"}}, check_data=False)
    assert list(table["t1ce"].str.endswith("_ce-gadolinium_T1w.nii.gz")) == [True, True]
    assert list(table["t1w"]) == ["", ""]
    assert choose_reference(root, None)[0] == "t1ce"
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,session,t1w,flair\n01,1,,a.nii.gz\n02,1,,b.nii.gz\n")
    assert choose_reference(manifest, "auto")[0] == "flair"
    manifest.write_text("subject,session,t1w,flair\n01,1,x.nii.gz,a.nii.gz\n02,1,,b.nii.gz\n")
    assert choose_reference(manifest, "auto") == ("t1w", None)
    # what cannot be read is left to the loader, which names the problem
    assert choose_reference(tmp_path / "missing.csv", "auto") == ("t1w", None)
    assert choose_reference(None, "auto") == ("t1w", None)  # the demo cohort has T1w scans
