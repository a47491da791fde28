"""on_scan_error: skip: a failing per-scan command records why, later steps pass the record on,
cohort steps leave the scan out (down to atlas.min_subjects), reports list it as failed."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from atlasflow.atlas.build import Member, run_init
from atlasflow.atlas.labels import label_vote
from atlasflow.cli import main as cli
from atlasflow.errors import AtlasflowError, failure_record, keep_successful, write_failure
from atlasflow.io.images import Image, load_image, save_image
from atlasflow.io.itk import write_itk_affine


def blank_brain(tmp_path, blob):
    """A scan that passes validation but whose brain is blank: nothing to normalise inside the mask."""
    mask = (blob.data > 0.5).astype(np.uint8)
    data = blob.data.copy()
    data[mask > 0] = 0
    image = save_image(blob.with_data(data), tmp_path / "blank_T1w.nii.gz")
    mask_path = save_image(blob.with_data(mask), tmp_path / "mask.nii.gz", dtype=np.uint8)
    return image, mask_path


def finalize_args(image, mask, out):
    return [
        "preprocess",
        "finalize",
        "--input",
        str(image),
        "--mask",
        str(mask),
        "--output",
        str(out / "preproc.nii.gz"),
        "--out-mask",
        str(out / "brain_mask.nii.gz"),
    ]


def test_fail_mode_is_one_error_line_and_no_output(tmp_path, blob, capsys):
    image, mask = blank_brain(tmp_path, blob)
    assert cli.main(["--on-scan-error", "fail", *finalize_args(image, mask, tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"atlasflow: error: {image}: intensity range inside the brain mask is empty"]
    assert not (tmp_path / "out" / "preproc.nii.gz").exists()


def test_skip_mode_records_the_failure_in_place_of_every_output(tmp_path, blob, capsys):
    image, mask = blank_brain(tmp_path, blob)
    out = tmp_path / "out"
    assert cli.main(["--on-scan-error", "skip", *finalize_args(image, mask, out)]) == 0
    err = capsys.readouterr().err
    assert (
        f"atlasflow: error: {image}: intensity range inside the brain mask is empty" in err
    )  # in the job log
    for name in ("preproc.nii.gz", "brain_mask.nii.gz"):
        record = failure_record(out / name)
        assert record["step"] == "preprocess finalize"
        assert str(image) in record["reason"] and "brain mask is empty" in record["reason"]
    # A record is never taken for an image: every reader stops with the reason.
    with pytest.raises(AtlasflowError, match="skipped scan.*preprocess finalize failed"):
        load_image(out / "preproc.nii.gz")


def test_skip_mode_is_the_workflow_default_through_the_environment(tmp_path, blob, monkeypatch):
    image, mask = blank_brain(tmp_path, blob)
    monkeypatch.setenv("ATLASFLOW_ON_SCAN_ERROR", "skip")
    assert cli.main(finalize_args(image, mask, tmp_path)) == 0
    assert failure_record(tmp_path / "preproc.nii.gz") is not None


def test_later_steps_of_a_failed_scan_pass_the_record_on(tmp_path, blob, capsys):
    write_failure([tmp_path / "preproc.nii.gz"], "preprocess finalize", "blank brain")
    save_image(blob, tmp_path / "template.nii.gz")
    write_itk_affine(np.eye(4), tmp_path / "affine.mat")
    args = [
        "--on-scan-error",
        "skip",
        "apply",
        "--fixed",
        str(tmp_path / "template.nii.gz"),
        "--moving",
        str(tmp_path / "preproc.nii.gz"),
        "--affine",
        str(tmp_path / "affine.mat"),
        "--output",
        str(tmp_path / "warped.nii.gz"),
    ]
    assert cli.main(args) == 0
    record = failure_record(tmp_path / "warped.nii.gz")
    assert record["step"] == "preprocess finalize" and record["reason"] == "blank brain"
    err = capsys.readouterr().err
    assert "atlasflow: skipped:" in err and "atlasflow: error:" not in err  # one error per scan
    # Under fail, the same input is one clear error.
    assert cli.main(["--on-scan-error", "fail", *args[2:]]) == 1
    assert (
        "record of a skipped scan (preprocess finalize failed: blank brain)"
        in capsys.readouterr().err
    )


def test_skip_mode_also_contains_an_unforeseen_exception(tmp_path, blob, monkeypatch, capsys):
    import atlasflow.preprocess.steps as pp

    def broken(*args, **kwargs):
        raise RuntimeError("ITK says no")

    monkeypatch.setattr(pp, "finalize", broken)
    image, mask = blank_brain(tmp_path, blob)
    assert cli.main(["--on-scan-error", "skip", *finalize_args(image, mask, tmp_path)]) == 0
    assert (
        failure_record(tmp_path / "preproc.nii.gz")["reason"]
        == "unexpected RuntimeError: ITK says no"
    )
    assert "Traceback" in capsys.readouterr().err  # kept in the job's log for a bug report
    with pytest.raises(
        RuntimeError
    ):  # under fail it stays a crash (a bug to fix, not a data problem)
        cli.main(["--on-scan-error", "fail", *finalize_args(image, mask, tmp_path)])


def members(tmp_path, blob, n_good=2):
    images, affines = [], []
    for i in range(n_good):
        images.append(
            str(save_image(blob.with_data(blob.data * (i + 1)), tmp_path / f"m{i}.nii.gz"))
        )
        affines.append(str(write_itk_affine(np.eye(4), tmp_path / f"m{i}.mat")))
    bad = write_failure([tmp_path / "bad.nii.gz", tmp_path / "bad.mat"], "register", "no overlap")
    return images, affines, [str(p) for p in bad]


def test_atlas_is_built_from_the_scans_that_succeeded(tmp_path, blob, capsys):
    images, _, (bad_image, _) = members(tmp_path, blob)
    masks = [
        str(
            save_image(
                blob.with_data((blob.data > 0.2).astype(np.uint8)), tmp_path / f"m{i}_mask.nii.gz"
            )
        )
        for i in range(2)
    ]
    (bad_mask,) = write_failure([tmp_path / "bad_mask.nii.gz"], "brain_mask", "no overlap")
    save_image(blob, tmp_path / "template.nii.gz")
    save_image(
        blob.with_data((blob.data > 0.2).astype(np.uint8)), tmp_path / "template_mask.nii.gz"
    )
    affines = [str(tmp_path / f"out{i}.mat") for i in range(3)]
    common = [
        "atlas",
        "init",
        "--template",
        str(tmp_path / "template.nii.gz"),
        "--template-mask",
        str(tmp_path / "template_mask.nii.gz"),
        "--images",
        images[0],
        bad_image,
        images[1],
        "--masks",
        masks[0],
        str(bad_mask),
        masks[1],
        "--out-affines",
        *affines,
        "--out-members",
        str(tmp_path / "members.tsv"),
        "--min-inputs-setting",
        "atlas.min_subjects",
    ]
    out = tmp_path / "iter-0.nii.gz"
    assert (
        cli.main(["--on-scan-error", "skip", *common, "--min-inputs", "2", "--output", str(out)])
        == 0
    )
    assert f"left out {bad_image}: register failed: no overlap" in capsys.readouterr().out
    # The failed member's affine output passes its record on; the others hold affines.
    assert failure_record(affines[1])["reason"] == "register failed: no overlap"
    assert failure_record(affines[0]) is None and failure_record(affines[2]) is None
    expected = run_init(
        [Member(f"m{i}", images[i], masks[i]) for i in range(2)],
        tmp_path / "template.nii.gz",
        tmp_path / "template_mask.nii.gz",
        tmp_path / "expected.nii.gz",
        [tmp_path / "e0.mat", tmp_path / "e1.mat"],
        tmp_path / "expected.tsv",
        options={"backend": "deep", "refine_steps": 0},
    )
    np.testing.assert_array_equal(load_image(out).data, expected.data)

    # Fewer successes than the minimum: one line naming the count, the setting and the failed scan.
    assert (
        cli.main(
            [
                "--on-scan-error",
                "skip",
                *common,
                "--min-inputs",
                "3",
                "--output",
                str(tmp_path / "x.nii.gz"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "atlasflow: error: atlas iteration 0: 2 of 3 scans succeeded, at least 3 needed"
    )
    assert "atlas.min_subjects" in err and bad_image in err and "no overlap" in err
    assert not (tmp_path / "x.nii.gz").exists()


def test_label_vote_leaves_failed_members_out(tmp_path, blob, capsys):
    labels = [np.zeros(blob.data.shape, np.uint8) for _ in range(2)]
    labels[0][blob.data > 0.3] = 1
    labels[1][blob.data > 0.5] = 1
    paths = [
        str(save_image(blob.with_data(lab), tmp_path / f"l{i}.nii.gz", dtype=np.uint8))
        for i, lab in enumerate(labels)
    ]
    (bad,) = write_failure([tmp_path / "bad_dseg.nii.gz"], "warp_labels", "x")
    assert (
        cli.main(
            [
                "--on-scan-error",
                "skip",
                "atlas",
                "vote",
                "--labels",
                paths[0],
                str(bad),
                paths[1],
                "--output",
                str(tmp_path / "vote.nii.gz"),
            ]
        )
        == 0
    )
    expected, _ = label_vote(paths, tmp_path / "expected.nii.gz")
    np.testing.assert_array_equal(
        load_image(tmp_path / "vote.nii.gz", dtype=None).data, expected.data
    )


def test_keep_successful_needs_aligned_lists():
    with pytest.raises(AtlasflowError, match="differ in length"):
        keep_successful([["a"], ["a", "b"]], 1, "x")


def test_reports_list_a_skipped_scan_as_failed_with_its_reason(tmp_path, blob):
    from atlasflow.reports.report import Scan, cohort_verdicts, subject_qc, write_cohort_report

    out = tmp_path / "results"
    scan = Scan(out, "05", "1")
    reason = "sub-05_T1w.nii.gz: intensity range inside the brain mask is empty"
    write_failure([scan.preproc, scan.brain_mask], "preprocess finalize", reason)
    write_failure(
        [scan.qc_json(s) for s in ("template", "atlas")]
        + [scan.warped(s) for s in ("template", "atlas")],
        "preprocess finalize",
        reason,
    )
    # Without its log, the verdict still carries the record's reason.
    qc = subject_qc(out, "05", ["1"])
    assert qc.status == "failed"
    assert any(reason in r and "preprocess finalize" in r for r in qc.reasons), qc.reasons
    # With the log of the job that failed, the reason points at it.
    log = out / "logs" / "preprocess" / "sub-05_ses-1.log"
    log.parent.mkdir(parents=True)
    log.write_text(
        f"atlasflow: error: {reason}\natlasflow: skipped: on_scan_error is skip; failure recorded\n"
    )
    (verdict,) = cohort_verdicts(out, ["05"], out / "reports", sessions={"05": ["1"]})
    assert verdict.status == "failed" and verdict.errors[0]["log"].endswith("sub-05_ses-1.log")
    write_cohort_report(
        out, ["05"], out / "reports" / "cohort.html", sessions={"05": ["1"]}, iterations=0
    )
    text = (out / "reports" / "cohort.html").read_text()
    failed_section = text.split('id="failed"')[1]
    assert (
        "sub-05" in failed_section
        and "intensity range inside the brain mask is empty" in failed_section
    )


def test_a_tampered_or_truncated_weights_file_is_one_line_from_the_command(tmp_path, blob, capsys):
    """The register command given damaged weights: exit 1 and one line naming the file, no traceback."""
    from atlasflow.nn.model_io import sidecar_path
    from atlasflow.registration.engine import DEFAULT_MODEL

    save_image(blob, tmp_path / "f.nii.gz")
    save_image(blob, tmp_path / "m.nii.gz")
    raw = DEFAULT_MODEL.read_bytes()
    sidecar_path(tmp_path / "w.safetensors").write_text(sidecar_path(DEFAULT_MODEL).read_text())
    for damaged, expected in (
        (raw[: len(raw) // 3], "truncated"),
        (raw[:-8] + b"\0" * 8, "SHA-256"),
    ):
        (tmp_path / "w.safetensors").write_bytes(damaged)
        code = cli.main(
            [
                "register",
                "--fixed",
                str(tmp_path / "f.nii.gz"),
                "--moving",
                str(tmp_path / "m.nii.gz"),
                "--model",
                str(tmp_path / "w.safetensors"),
                "--out-dir",
                str(tmp_path / "out"),
            ]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1, err
        assert (
            err[0].startswith("atlasflow: error:")
            and "w.safetensors" in err[0]
            and expected in err[0]
        )
        assert not (tmp_path / "out" / "warped.nii.gz").exists()


def test_a_member_left_out_of_an_atlas_iteration_is_reported(tmp_path):
    """Preprocessing and registrations fine, but its registration to iteration 2 failed: the
    subject is listed as failed with that reason, not silently passed."""
    from atlasflow.reports.report import subject_qc

    out = tmp_path / "results"
    table = out / "atlas" / "iter-2" / "members.tsv"
    table.parent.mkdir(parents=True)
    table.write_text(
        "member\tstatus\treason\tncc_after\n"
        "sub-06_ses-1\tok\t\t0.9\n"
        "sub-07_ses-1\tfailed\tno overlap with the template\t\n"
    )
    qc = subject_qc(out, "07", ["1"])
    assert qc.status == "failed"
    assert any("atlas iter-2 failed: no overlap with the template" in r for r in qc.reasons), (
        qc.reasons
    )
    assert any("left out of the atlas" in m["reason"] for m in qc.missing)
    assert subject_qc(out, "06", ["1"]).status != "failed"


def test_atlas_iteration_leaves_out_failed_scans_and_failed_registrations(tmp_path, blob, capsys):
    """One member's scan failed upstream (a failure record), another's registration fails in the
    job (its mask is on the wrong grid): under skip both are left out and the second is listed
    with its reason; under fail the job stops with one line naming that member's file."""
    images, affines, (bad_image, bad_affine) = members(tmp_path, blob)
    masks = [
        str(
            save_image(
                blob.with_data((blob.data > 0.1).astype(np.uint8)), tmp_path / f"mask{i}.nii.gz"
            )
        )
        for i in range(2)
    ]
    wrong = str(
        save_image(Image(np.ones((5, 5, 5), np.uint8), np.eye(4)), tmp_path / "wrong_mask.nii.gz")
    )
    third = str(save_image(blob, tmp_path / "sub-03_ses-1_desc-preproc_T1w.nii.gz"))
    save_image(blob, tmp_path / "prev.nii.gz")
    save_image(blob.with_data((blob.data > 0.1).astype(np.uint8)), tmp_path / "tmask.nii.gz")
    argv = [
        "atlas",
        "iteration",
        "--iteration",
        "1",
        "--previous",
        str(tmp_path / "prev.nii.gz"),
        "--mask",
        str(tmp_path / "tmask.nii.gz"),
        "--images",
        images[0],
        bad_image,
        images[1],
        third,
        "--masks",
        masks[0],
        masks[0],
        masks[1],
        wrong,
        "--affines",
        affines[0],
        bad_affine,
        affines[1],
        affines[0],
        "--backend",
        "deep",
        "--refine",
        "2",
        "--affine-steps",
        "2",
        "--min-inputs",
        "2",
        "--output",
        str(tmp_path / "t1.nii.gz"),
        "--out-metrics",
        str(tmp_path / "m1.json"),
        "--out-members",
        str(tmp_path / "members.tsv"),
    ]
    assert cli.main(["--on-scan-error", "skip", *argv]) == 0
    assert json.loads((tmp_path / "m1.json").read_text())["members"] == 2
    rows = pd.read_csv(tmp_path / "members.tsv", sep="\t", dtype=str).fillna("")
    assert list(rows["status"]) == ["ok", "ok", "failed"]
    assert (
        "wrong_mask.nii.gz" in rows["reason"].iloc[2] and rows["member"].iloc[2] == "sub-03_ses-1"
    )
    capsys.readouterr()
    (tmp_path / "t1.nii.gz").unlink()
    good = [a for a in argv]
    good[good.index(bad_image)] = images[0]
    good[good.index(bad_affine)] = affines[0]
    assert cli.main(good) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("atlasflow: error: atlas iteration 1:")
        and third in err[0]
    ), err
    assert not (tmp_path / "t1.nii.gz").exists()
