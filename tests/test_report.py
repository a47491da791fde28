"""HTML reports on tiny fake outputs: verdicts and thresholds, embedded figures, placeholders, failed list.

:func:`make_outputs` writes the files the workflow would write for a four-subject cohort on a
24x28x20 grid: sub-01 passes, sub-02 is flagged (low NCC, folding) and misses some files, sub-03 is
longitudinal (two sessions, tumour growing), sub-04 failed in registration with a logged error.
tests/test_browser.py opens the same pages in a real browser.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image

from atlasflow.cli.main import main as cli_main
from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Image, save_image
from atlasflow.io.itk import save_transform
from atlasflow.registration.qc import QCThresholds
from atlasflow.reports.cohort import write_cohort_report
from atlasflow.reports.inputs import last_error_line, read_tumor_table
from atlasflow.reports.qc import subject_qc
from atlasflow.reports.subject import write_subject_report
from atlasflow.transforms import Transform

SHAPE = (24, 28, 20)
THRESHOLDS = {"max_folding_fraction": 0.001, "min_ncc_after": 0.5, "min_dice": 0.5}


def _labels(image: Image) -> Image:
    data = image.data
    return image.with_data(np.digitize(data, [0.3, 0.7, 1.0]).astype(np.uint8))


def _field(grid_image: Image, amplitude_mm: float, seed: int) -> Image:
    """A smooth sinusoidal displacement; a large amplitude folds the map."""
    rng = np.random.default_rng(seed)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).astype(
        np.float32
    )
    phase = rng.uniform(0, 2 * np.pi, 3)
    u = np.stack([amplitude_mm * np.sin(ijk[..., c] * 0.5 + phase[c]) for c in range(3)], -1)
    return Image(u.astype(np.float32), grid_image.affine.copy())


def _qc(ncc_before: float, ncc_after: float, folding: float, **extra) -> str:
    return json.dumps(
        {
            "backend": "deep",
            "seconds": 0.8,
            "folding_fraction": folding,
            "ncc_before": ncc_before,
            "ncc_after": ncc_after,
            **extra,
        }
    )


def _anat(outdir: Path, s: str, t: str, name: str) -> Path:
    return outdir / f"sub-{s}" / f"ses-{t}" / "anat" / f"sub-{s}_ses-{t}_{name}"


def _write_scan(
    outdir: Path,
    s: str,
    t: str,
    seed: int,
    *,
    qc_template: str,
    qc_atlas: str,
    amplitude: float = 1.5,
    tumour_voxels: int = 0,
) -> None:
    template = blob_image(SHAPE, seed=100)
    moving = blob_image(SHAPE, seed=seed)
    # A shifted copy so 'before' and 'after' differ visibly.
    moving = moving.with_data(np.roll(moving.data, 2, axis=0))
    save_image(moving, _anat(outdir, s, t, "desc-preproc_T1w.nii.gz"))
    save_image(
        moving.with_data((moving.data > 0.2).astype(np.uint8)),
        _anat(outdir, s, t, "desc-brain_mask.nii.gz"),
    )
    save_image(_labels(moving), _anat(outdir, s, t, "desc-preproc_dseg.nii.gz"))
    if tumour_voxels:
        mask = np.zeros(SHAPE, np.uint8)
        r = tumour_voxels
        mask[12 - r : 12 + r, 14 - r : 14 + r, 10 - r : 10 + r] = 1
        save_image(
            moving.with_data(mask), _anat(outdir, s, t, "label-tumor_desc-preproc_mask.nii.gz")
        )
    for stage, qc in (("template", qc_template), ("atlas", qc_atlas)):
        warped_name = (
            "space-template_desc-warped_T1w.nii.gz"
            if stage == "template"
            else "space-atlas_T1w.nii.gz"
        )
        save_image(
            template.with_data(0.9 * template.data + 0.1 * moving.data),
            _anat(outdir, s, t, warped_name),
        )
        save_transform(
            Transform(np.eye(4), _field(template, amplitude, seed)),
            _anat(outdir, s, t, f"from-T1w_to-{stage}_mode-image_xfm.mat"),
            _anat(outdir, s, t, f"from-T1w_to-{stage}_mode-image_xfm.nii.gz"),
        )
        _anat(outdir, s, t, f"from-T1w_to-{stage}_mode-image_desc-qc_xfm.json").write_text(qc)
    save_image(_labels(template), _anat(outdir, s, t, "space-atlas_dseg.nii.gz"))


def make_outputs(root: Path) -> tuple[Path, dict]:
    """Fake workflow outputs under ``root/results``; returns (outdir, raw inputs per subject)."""
    outdir = root / "results"
    template = blob_image(SHAPE, seed=100)
    save_image(template, outdir / "template" / "template_T1w.nii.gz")
    for i in range(3):
        sharp = template.with_data(np.clip(template.data, 0, None) ** (1 + 0.3 * i))
        save_image(sharp, outdir / "atlas" / f"iter-{i}" / "template_T1w.nii.gz")
    save_image(template, outdir / "atlas" / "atlas_T1w.nii.gz")
    save_image(_labels(template), outdir / "atlas" / "atlas_dseg.nii.gz")
    frequency = np.zeros(SHAPE, np.float32)
    frequency[10:15, 12:17, 8:12] = 0.5
    frequency[11:13, 13:15, 9:11] = 1.0
    save_image(template.with_data(frequency), outdir / "atlas" / "tumor_frequency.nii.gz")
    (outdir / "atlas" / "metrics.tsv").write_text(
        "iteration\tmembers\ttemplate_change_rms\tmean_velocity_norm_mean_mm\tmean_velocity_norm_max_mm\t"
        "ncc_to_template_mean\tfolding_fraction_max\tfolding_fraction_mean\n"
        "1\t4\t0.08\t1.9\t4.1\t0.81\t0.0\t0.0\n2\t4\t0.03\t1.1\t2.6\t0.88\t0.0002\t0.00005\n"
    )
    raw = {}
    for s in ("01", "02", "03"):
        raw_path = root / "input" / f"sub-{s}_T1w.nii.gz"
        image = blob_image((30, 30, 24), spacing=1.6, seed=int(s))
        # Stored LAS, as many scanners write: the report must show it the same way round.
        flipped = Image(
            image.data[::-1].copy(),
            image.affine
            @ np.array([[-1, 0, 0, 29], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float),
        )
        save_image(flipped, raw_path)
        raw[s] = raw_path

    good = _qc(0.41, 0.86, 0.0)
    _write_scan(
        outdir, "01", "1", 1, qc_template=good, qc_atlas=_qc(0.45, 0.9, 0.0, dice_mean=0.83)
    )
    # sub-02: poor registration to the atlas (NCC below 0.5, folding above 0.1 %) and missing files.
    _write_scan(
        outdir, "02", "1", 2, qc_template=good, qc_atlas=_qc(0.2, 0.31, 0.012), amplitude=4.0
    )
    _anat(outdir, "02", "1", "space-atlas_T1w.nii.gz").unlink()
    _anat(outdir, "02", "1", "from-T1w_to-template_mode-image_xfm.nii.gz").unlink()
    _anat(outdir, "02", "1", "from-T1w_to-atlas_mode-image_xfm.nii.gz").unlink()
    # sub-03: longitudinal, tumour grows from baseline (ses-1) to follow-up (ses-2).
    _write_scan(outdir, "03", "1", 3, qc_template=good, qc_atlas=good, tumour_voxels=2)
    _write_scan(outdir, "03", "2", 4, qc_template=good, qc_atlas=good, tumour_voxels=3)
    baseline = blob_image(SHAPE, seed=3)
    log_jac = np.zeros(SHAPE, np.float32)
    log_jac[9:15, 11:17, 7:13] = 0.4
    save_image(
        baseline.with_data(log_jac),
        _anat(outdir, "03", "2", "space-baseline_desc-logjacobian_map.nii.gz"),
    )
    save_image(
        baseline.with_data(0.2 * np.sin(baseline.data * 6)),
        _anat(outdir, "03", "2", "space-baseline_desc-difference_T1w.nii.gz"),
    )
    save_image(
        baseline.with_data(np.abs(log_jac) * 5),
        _anat(outdir, "03", "2", "space-baseline_desc-displacement_map.nii.gz"),
    )
    save_image(
        baseline.with_data(0.95 * baseline.data),
        _anat(outdir, "03", "2", "space-baseline_desc-warped_T1w.nii.gz"),
    )
    mask = np.zeros(SHAPE, np.uint8)
    mask[9:15, 11:17, 7:13] = 1
    save_image(
        baseline.with_data(mask), _anat(outdir, "03", "2", "space-baseline_label-tumor_mask.nii.gz")
    )
    _anat(outdir, "03", "2", "from-T1w_to-baseline_mode-image_desc-qc_xfm.json").write_text(
        _qc(0.7, 0.95, 0.0)
    )
    longitudinal = outdir / "sub-03" / "longitudinal"
    longitudinal.mkdir(parents=True)
    (longitudinal / "sub-03_tumor.tsv").write_text(
        "session\tacq_date\tdays_since_baseline\tvolume_mm3\tchange_from_baseline_mm3\tchange_from_baseline_pct\t"
        "change_from_previous_mm3\tchange_from_previous_pct\tgrowth_rate_mm3_per_day\tdoubling_time_days\tresponse\n"
        "1\t2024-01-10\t0\t512\tn/a\tn/a\tn/a\tn/a\tn/a\tn/a\tbaseline\n"
        "2\t2024-03-10\t60\t1728\t1216\t237.5\t1216\t237.5\t20.27\t34.2\tprogression\n"
    )
    # sub-04: preprocessing done, registration to the template failed with a logged error.
    save_image(blob_image(SHAPE, seed=5), _anat(outdir, "04", "1", "desc-preproc_T1w.nii.gz"))
    log = outdir / "logs" / "register_template" / "sub-04_ses-1.log"
    log.parent.mkdir(parents=True)
    log.write_text(
        "loading model\nTraceback (most recent call last):\n  ...\n"
        "atlasflow: error: old message that is not the last one\n"
        "atlasflow: error: sub-04_ses-1_desc-preproc_T1w.nii.gz: brain mask is empty\n\n"
    )
    (outdir / "logs" / "preprocess").mkdir(parents=True)
    (outdir / "logs" / "preprocess" / "sub-04_ses-1.log").write_text("preprocessed in 2.1 s\n")
    return outdir, raw


SESSIONS = {"01": ["1"], "02": ["1"], "03": ["1", "2"], "04": ["1"]}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """All four subject reports and the cohort report, written once for the module."""
    root = tmp_path_factory.mktemp("report")
    outdir, raw = make_outputs(root)
    pages = outdir / "reports"
    summaries, seconds = {}, {}
    for s, sessions in SESSIONS.items():
        start = time.perf_counter()
        raw_inputs = {t: str(raw[s]) for t in sessions} if s in raw else None
        summaries[s] = write_subject_report(
            outdir,
            s,
            sessions,
            pages / f"sub-{s}.html",
            raw_inputs=raw_inputs,
            thresholds=THRESHOLDS,
            figures_dir=pages / "figures" / f"sub-{s}",
        )
        seconds[s] = time.perf_counter() - start
    write_cohort_report(
        outdir,
        list(SESSIONS),
        pages / "cohort.html",
        thresholds=THRESHOLDS,
        sessions=SESSIONS,
        iterations=2,
        figures_dir=pages / "figures" / "cohort",
    )
    return {
        "outdir": outdir,
        "pages": pages,
        "summaries": summaries,
        "seconds": seconds,
        "raw": raw,
    }


def _images(page: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


def test_verdicts_follow_the_thresholds(reports):
    s = reports["summaries"]
    assert [s[k]["status"] for k in ("01", "02", "03", "04")] == ["pass", "flag", "pass", "failed"]
    reasons = " ".join(s["02"]["reasons"])
    assert "NCC after 0.310 < 0.500 (qc.min_ncc_after)" in reasons
    assert "folding fraction 1.2 % > 0.1 % (qc.max_folding_fraction)" in reasons
    # The template registration of sub-02 is fine and must not be blamed.
    assert "to template" not in reasons
    # Dice from the QC JSON when present, else computed from the label maps in atlas space.
    dice = {c["session"] + c["stage"]: c for c in s["03"]["checks"] if c["metric"] == "dice_mean"}
    assert dice["1atlas"]["value"] == pytest.approx(1.0) and dice["1atlas"]["status"] == "pass"
    assert [c["value"] for c in s["01"]["checks"] if c["metric"] == "dice_mean"] == [0.83]


def test_same_outputs_judged_by_stricter_thresholds_flag(reports):
    strict = subject_qc(reports["outdir"], "01", ["1"], thresholds={"min_ncc_after": 0.95})
    assert strict.status == "flag"
    assert any("NCC after 0.860 < 0.950" in r for r in strict.reasons)
    lenient = subject_qc(
        reports["outdir"],
        "02",
        ["1"],
        thresholds={"min_ncc_after": 0.1, "max_folding_fraction": 0.5},
    )
    assert lenient.status == "pass"


def test_failed_subject_carries_the_last_logged_error(reports):
    s = reports["summaries"]["04"]
    assert s["errors"] == [
        {
            "rule": "register_template",
            "log": "logs/register_template/sub-04_ses-1.log",
            "message": "sub-04_ses-1_desc-preproc_T1w.nii.gz: brain mask is empty",
            "session": "1",
        }
    ]
    assert any("brain mask is empty" in r for r in s["reasons"])


def test_subject_page_shows_numbers_marks_thresholds_and_figures(reports):
    page = (reports["pages"] / "sub-02.html").read_text()
    # Every judged number has its mark; the column header says the threshold and its config key.
    assert (
        '<td class="num flag">\u2716 0.310</td>' in page
        and '<td class="num flag">\u2716 1.2 %</td>' in page
    )
    assert '<td class="num pass">\u2714 0.860</td>' in page
    assert (
        "\u2265 0.500 (qc.min_ncc_after)" in page
        and "\u2264 0.1 % (qc.max_folding_fraction)" in page
    )
    assert "\u2265 0.500 (qc.min_dice)" in page
    pngs = _images(page)
    assert pngs and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    # The page is self-contained: no external resource of any kind.
    assert not re.search(r'(src|href)="(?!data:|#|sub-|cohort\.html)', page)
    assert "<link" not in page


def test_missing_inputs_become_placeholders_with_reasons(reports):
    page = (reports["pages"] / "sub-02.html").read_text()
    # Both displacement fields are gone: the Jacobian figure is a placeholder naming them.
    block = re.search(r'data-missing="sub-02_ses-1_jacobian">(.*?)</div>', page, re.S).group(1)
    assert "from-T1w_to-template_mode-image_xfm.nii.gz not found" in block
    assert "from-T1w_to-atlas_mode-image_xfm.nii.gz not found" in block
    # The atlas overlay still draws 'before' and notes the missing 'after' image.
    assert (
        "missing: registered: sub-02/ses-1/anat/sub-02_ses-1_space-atlas_T1w.nii.gz not found"
        in page
    )
    # A failed subject still gets a page: placeholders, the error, no crash.
    failed = (reports["pages"] / "sub-04.html").read_text()
    assert "brain mask is empty" in failed and 'data-missing="sub-04_ses-1_jacobian"' in failed


def test_longitudinal_page_has_change_maps_volume_plot_and_response(reports):
    page = (reports["pages"] / "sub-03.html").read_text()
    assert 'id="longitudinal"' in page and "badge progression" in page
    assert "Change since baseline (ses-1)" in page and "data-missing" not in page
    assert "1728" in page and "237.5" in page
    from atlasflow.longitudinal.change import PROGRESSION_PCT

    assert f"progression at {PROGRESSION_PCT:+g} % or more" in page
    assert len(_images(page)) == 1 + 4 + 6  # tumour plot; 4 figures at baseline; 6 at follow-up
    assert reports["summaries"]["03"]["response"] == "progression"


def test_cohort_page_lists_flags_failures_links_and_atlas(reports):
    page = (reports["pages"] / "cohort.html").read_text()
    attention = re.search(r"Needs attention \(2 of 4\):(.*?)</div>", page, re.S).group(1)
    assert "sub-02" in attention and "sub-04" in attention and "sub-01" not in attention
    assert "NCC after 0.310 &lt; 0.500" in attention
    failed = page[page.index('id="failed"') : page.index('id="atlas"')]
    assert "sub-04" in failed and "register_template" in failed and "brain mask is empty" in failed
    assert "logs/register_template/sub-04_ses-1.log" in failed
    for s in SESSIONS:
        assert f'href="sub-{s}.html"' in page
    assert 'class="sortable"' in page and "addEventListener('click'" in page
    # Rows ordered by severity so problems come first.
    order = re.findall(r'<tr class="(\w+)"><td>sub-(\d+)</td>', page)
    assert order == [("failed", "04"), ("flag", "02"), ("pass", "01"), ("pass", "03")]
    assert len(_images(page)) == 3 and "data-missing" not in page


def test_cohort_recomputes_a_stale_or_absent_subject_summary(reports, tmp_path):
    outdir, pages = reports["outdir"], reports["pages"]
    # No report JSON for the failed subject at all: the cohort still names the failure.
    verdicts = write_cohort_report(
        outdir, ["01", "04"], tmp_path / "cohort.html", thresholds=THRESHOLDS
    )
    assert [v.status for v in verdicts] == ["pass", "failed"]
    assert "brain mask is empty" in (tmp_path / "cohort.html").read_text()
    # A subject JSON older than an input it read is not trusted.
    qc_file = (
        outdir
        / "sub-01"
        / "ses-1"
        / "anat"
        / "sub-01_ses-1_from-T1w_to-atlas_mode-image_desc-qc_xfm.json"
    )
    original = qc_file.read_text()
    try:
        qc_file.write_text(_qc(0.45, 0.2, 0.0))
        later = (pages / "sub-01_qc.json").stat().st_mtime + 5
        import os

        os.utime(qc_file, (later, later))
        verdicts = write_cohort_report(
            outdir, ["01"], pages / "cohort-stale.html", thresholds=THRESHOLDS
        )
        assert verdicts[0].status == "flag" and verdicts[0].recomputed
        assert ">older page</a>" in (pages / "cohort-stale.html").read_text()
    finally:
        qc_file.write_text(original)


def test_figures_exported_for_snakemake_report(reports):
    figures = reports["pages"] / "figures"
    names = sorted(p.name for p in (figures / "sub-03").iterdir())
    assert "sub-03_tumor.png" in names and "sub-03_ses-2_change.png" in names
    # A figure that could not be drawn is still written, as a 'missing' PNG (fixed output names).
    assert (figures / "sub-02" / "sub-02_ses-1_jacobian.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (figures / "cohort").iterdir()) == [
        "atlas_convergence.png",
        "atlas_iterations.png",
        "tumor_frequency.png",
    ]


def test_reports_are_reproducible_and_fast(reports, tmp_path):
    page = reports["pages"] / "sub-03.html"
    write_subject_report(
        reports["outdir"],
        "03",
        ["1", "2"],
        tmp_path / "sub-03.html",
        thresholds=THRESHOLDS,
        raw_inputs={"1": str(reports["raw"]["03"]), "2": str(reports["raw"]["03"])},
    )
    assert (tmp_path / "sub-03.html").read_bytes() == page.read_bytes()
    assert (tmp_path / "sub-03_qc.json").read_bytes() == (
        reports["pages"] / "sub-03_qc.json"
    ).read_bytes()
    assert (
        max(reports["seconds"].values()) < 30
    )  # tiny volumes; the real 2 mm demo is measured in the report


def test_cohort_without_any_atlas_shows_placeholders(tmp_path):
    outdir = tmp_path / "results"
    (outdir / "logs" / "atlas").mkdir(parents=True)
    (outdir / "logs" / "atlas" / "iter-1.log").write_text(
        "atlasflow: error: iteration 1: no members registered\n"
    )
    write_cohort_report(outdir, ["01"], outdir / "reports" / "cohort.html", iterations=2)
    page = (outdir / "reports" / "cohort.html").read_text()
    assert page.count("data-missing=") == 3
    assert "atlas/metrics.tsv not found" in page and "no members registered" in page
    assert "no outputs and no logs found for sub-01" in page


def test_cli_writes_both_reports(reports, tmp_path, capsys):
    outdir, raw = reports["outdir"], reports["raw"]
    out = tmp_path / "sub-03.html"
    assert (
        cli_main(
            [
                "report",
                "subject",
                "--outdir",
                str(outdir),
                "--subject",
                "sub-03",
                "--sessions",
                "ses-1",
                "ses-2",
                "--raw",
                f"1={raw['03']}",
                "--out",
                str(out),
                "--min-ncc-after",
                "0.99",
            ]
        )
        == 0
    )
    qc = json.loads((tmp_path / "sub-03_qc.json").read_text())
    assert qc["status"] == "flag" and qc["thresholds"]["min_ncc_after"] == 0.99
    assert (
        cli_main(
            [
                "report",
                "cohort",
                "--outdir",
                str(outdir),
                "--scans",
                "03:1",
                "03:2",
                "04:1",
                "--out",
                str(tmp_path / "cohort.html"),
                "--min-ncc-after",
                "0.99",
            ]
        )
        == 0
    )
    assert 'href="sub-03.html"' in (tmp_path / "cohort.html").read_text()
    capsys.readouterr()
    assert (
        cli_main(
            [
                "report",
                "subject",
                "--outdir",
                str(outdir),
                "--subject",
                "03",
                "--sessions",
                "1",
                "--raw",
                "oops",
                "--out",
                str(out),
            ]
        )
        == 1
    )
    assert capsys.readouterr().err == "atlasflow: error: --raw 'oops': expected SESSION=PATH\n"


def test_small_helpers(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("atlasflow: error: first\nok\n  atlasflow: error: second  \n\n")
    assert last_error_line(log) == "second"
    log.write_text("Traceback\nKilled\n")
    assert last_error_line(log) is None
    with pytest.raises(AtlasflowError, match="qc.min_dice"):
        QCThresholds.from_mapping({"min_dice": "high"})
    assert QCThresholds.from_mapping({"min_ncc_after": 0.7, "other_key": 1}).min_ncc_after == 0.7
    table = tmp_path / "t.tsv"
    table.write_text("subject\tvolume\n01\t3\n")
    with pytest.raises(AtlasflowError, match="session and volume_mm3"):
        read_tumor_table(table)


def test_declared_report_inputs_are_what_the_report_reads(reports):
    from atlasflow.reports.inputs import cohort_report_inputs, subject_report_inputs

    outdir = reports["outdir"]
    declared = subject_report_inputs(outdir, "03", ["1", "2"], labels=["1", "2"], tumour=["1", "2"])
    assert len(declared) == len(set(declared))
    # Every declared file exists in the complete fake subject, and every output file the page read is declared.
    assert all(Path(p).exists() for p in declared)
    read = {
        str(outdir / src)
        for src, existed in reports["summaries"]["03"]["sources"].items()
        if existed
    }
    assert read <= set(declared)
    assert (
        str(outdir / "sub-03/ses-2/anat/sub-03_ses-2_space-baseline_desc-logjacobian_map.nii.gz")
        in declared
    )
    cross = subject_report_inputs(outdir, "01", ["1"])
    assert not any("baseline" in p or "tumor" in p or "dseg" in p for p in cross)
    # A follow-up without a tumour mask has no tumour mask on the baseline grid to wait for.
    partial = subject_report_inputs(outdir, "03", ["1", "2"], tumour=["1"])
    assert not any("space-baseline_label-tumor" in p for p in partial)
    assert any("ses-1_label-tumor_desc-preproc_mask" in p for p in partial)
    cohort = cohort_report_inputs(outdir, 2, tumour=True)
    assert all(Path(p).exists() for p in cohort) and len(cohort) == 5


def test_corrupt_inputs_become_placeholders_not_crashes(tmp_path):
    outdir, raw = make_outputs(tmp_path)
    anat = outdir / "sub-01" / "ses-1" / "anat"
    (anat / "sub-01_ses-1_space-atlas_T1w.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (anat / "sub-01_ses-1_from-T1w_to-template_mode-image_xfm.nii.gz").write_text("garbage")
    (anat / "sub-01_ses-1_from-T1w_to-template_mode-image_desc-qc_xfm.json").write_text("{not json")
    summary = write_subject_report(
        outdir,
        "01",
        ["1"],
        outdir / "reports" / "sub-01.html",
        raw_inputs={"1": str(tmp_path / "nowhere.nii.gz")},
        thresholds=THRESHOLDS,
    )
    page = (outdir / "reports" / "sub-01.html").read_text()
    assert (
        summary["status"] == "incomplete"
    )  # a QC file it needs is unreadable, and no job logged an error
    assert "is not readable JSON" in page
    assert "missing: registered:" in page and "space-atlas_T1w.nii.gz" in page
    assert "missing: displacement field to template:" in page
    assert "missing: input:" in page and "nowhere.nii.gz not found" in page


def test_a_registration_that_lowers_the_similarity_is_flagged(tmp_path):
    outdir = tmp_path / "results"
    image = blob_image(SHAPE, seed=7)
    save_image(image, _anat(outdir, "09", "1", "desc-preproc_T1w.nii.gz"))
    _anat(outdir, "09", "1", "from-T1w_to-template_mode-image_desc-qc_xfm.json").write_text(
        _qc(0.8, 0.7, 0.0)
    )
    _anat(outdir, "09", "1", "from-T1w_to-atlas_mode-image_desc-qc_xfm.json").write_text(
        _qc(0.8, 0.79, 0.0)
    )
    qc = subject_qc(outdir, "09", ["1"], thresholds=THRESHOLDS)
    assert qc.status == "flag"
    assert qc.reasons == [
        "ses-1 to template: NCC change -0.100 < -0.020 (a registration must not lower the NCC)"
    ]


def test_jacobian_on_the_view_planes_equals_the_full_volume_determinant():
    from atlasflow.reports.montage import ras_image
    from atlasflow.reports.panels import jacobian_on_views
    from atlasflow.transforms import jacobian_determinant

    reference = blob_image(SHAPE)
    # An oblique, flipped grid: the planes must still be the RAS planes of the full determinant.
    affine = reference.affine @ np.array(
        [[0, -1, 0, 27], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float
    )
    field = ras_image(Image(_field(reference, 3.0, seed=3).data, affine))
    full = jacobian_determinant(field)
    assert field.data.shape[:3] == (28, 24, 20)
    for centre in [(5, 9, 4), (0, 23, 19), (27, 0, 10)]:
        planes = jacobian_on_views(field, centre).data
        i, j, k = centre
        np.testing.assert_allclose(planes[i], full[i], rtol=1e-6)
        np.testing.assert_allclose(planes[:, j], full[:, j], rtol=1e-6)
        np.testing.assert_allclose(planes[:, :, k], full[:, :, k], rtol=1e-6)
        assert 0 < np.isfinite(planes).sum() < planes.size  # only the three planes are computed
