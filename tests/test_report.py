"""HTML reports on tiny fake outputs: verdicts and thresholds, embedded figures, placeholders, failed list.

:func:`factories.report_outputs` writes the files the workflow would write for a four-subject
cohort on a 24x28x20 grid: sub-01 passes, sub-02 is flagged (low NCC, folding) and misses some
files, sub-03 is longitudinal (two sessions, tumour growing), sub-04 failed in registration with a
logged error.
tests/test_reports_browser.py opens the same pages in a real browser.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from factories import REPORT_SESSIONS as SESSIONS
from factories import REPORT_SHAPE as SHAPE
from factories import REPORT_THRESHOLDS as THRESHOLDS
from factories import anat_path as _anat
from factories import blob_image
from factories import qc_json as _qc
from factories import report_outputs as make_outputs
from factories import wavy_field as _field

from atlasflow.cli.main import main as cli_main
from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Image, save_image
from atlasflow.registration.qc import QCThresholds
from atlasflow.reports.cohort import write_cohort_report
from atlasflow.reports.inputs import last_error_line, read_tumor_table
from atlasflow.reports.qc import subject_qc
from atlasflow.reports.subject import write_subject_report


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
    # tumour plot; at baseline 4 figures and the FLAIR's alignment; at follow-up 6, the FLAIR's
    # alignment and its change since baseline
    assert len(_images(page)) == 1 + 5 + 8
    assert reports["summaries"]["03"]["response"] == "progression"
    assert "FLAIR change since baseline (ses-1)" in page
    # the compartments' volumes: columns of the table and lines of the plot
    assert "oedema (ml)" in page and "Lines per compartment: necrosis, oedema, enhancing." in page


def test_every_contrast_has_its_alignment_figure_and_qc_row(reports):
    page = (reports["pages"] / "sub-03.html").read_text()
    alt = (
        'alt="FLAIR aligned to the T1w (NMI 1.050 \u2192 1.072, shift 0.4 mm, rotation 1.2\u00b0)"'
    )
    assert page.count(alt) == 2  # one figure per session
    table = page[
        page.index('id="contrast-alignment"') : page.index(
            "</table>", page.index('id="contrast-alignment"')
        )
    ]
    rows = re.findall(r"<tr><td>ses-(\d)</td><td>(\w+)</td>(.*?)</tr>", table)
    assert [(t, c) for t, c, _ in rows] == [("1", "FLAIR"), ("2", "FLAIR")]
    cells = rows[0][2]
    assert '<td class="num info">1.050</td>' in cells  # at the scanner's alignment: information
    assert '<td class="num pass">\u2714 1.072</td>' in cells
    assert '<td class="num pass">\u2714 0.4 mm</td>' in cells and "1.2\u00b0" in cells
    assert "rigid, 3.4 s" in cells and "badge pass" in cells
    assert (
        "\u2265 1.030 (contrasts.min_nmi)" in table
        and "\u2264 20.0 mm (contrasts.max_shift_mm)" in table
    )
    assert "Each contrast aligned to its session's T1w by normalised mutual information" in page
    qc = reports["summaries"]["03"]
    assert qc["contrasts"] == {"1": ["flair"], "2": ["flair"]}
    assert qc["summary"]["contrast/nmi_after"]["status"] == "pass"
    # a subject without other contrasts has no such table
    assert 'id="contrast-alignment"' not in (reports["pages"] / "sub-01.html").read_text()


def test_the_alignment_table_names_the_sessions_reference(reports):
    """With another reference (a post-contrast T1w anchoring a tumour collection) the table says
    what the contrasts were aligned to, not the T1w."""
    from dataclasses import replace

    from atlasflow.reports.contrasts import alignment_table
    from atlasflow.reports.qc import subject_qc

    qc = subject_qc(reports["outdir"], "03", SESSIONS["03"], thresholds=THRESHOLDS)
    assert "session's T1w by normalised" in alignment_table(qc)
    table = alignment_table(replace(qc, reference="t1ce"))
    assert "session's ceT1w by normalised" in table and "in the ceT1w's brain" in table
    assert "T1w by" not in table.replace("ceT1w by", "")


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
    assert len(_images(page)) == 4 and "data-missing" not in page
    # the FLAIR atlas beside the T1w atlas; the worst contrast alignment per subject
    assert 'alt="Atlas of every contrast"' in page and "the FLAIR atlas" in page
    assert "contrast NMI (min)" in page and "\u2265 1.030 (contrasts.min_nmi)" in page


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
    assert {
        "sub-03_ses-1_flair.png",
        "sub-03_ses-2_flair.png",
        "sub-03_ses-2_flair_change.png",
    } <= set(names)
    # A figure that could not be drawn is still written, as a 'missing' PNG (fixed output names).
    assert (figures / "sub-02" / "sub-02_ses-1_jacobian.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (figures / "cohort").iterdir()) == [
        "atlas_contrasts.png",
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
    declared = subject_report_inputs(
        outdir,
        "03",
        ["1", "2"],
        labels=["1", "2"],
        tumour=["1", "2"],
        contrasts={"1": ["flair"], "2": ["flair"]},
    )
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
    assert any(p.endswith("ses-2_space-baseline_desc-difference_FLAIR.nii.gz") for p in declared)
    assert any(p.endswith("ses-1_from-FLAIR_to-T1w_mode-image_desc-qc_xfm.json") for p in read)
    # the baseline has no difference map of its own
    assert not any(
        p.endswith("ses-1_space-baseline_desc-difference_FLAIR.nii.gz") for p in declared
    )
    cross = subject_report_inputs(outdir, "01", ["1"])
    assert not any("baseline" in p or "tumor" in p or "dseg" in p for p in cross)
    # A follow-up without a tumour mask has no tumour mask on the baseline grid to wait for.
    partial = subject_report_inputs(outdir, "03", ["1", "2"], tumour=["1"])
    assert not any("space-baseline_label-tumor" in p for p in partial)
    assert any("ses-1_label-tumor_desc-preproc_mask" in p for p in partial)
    cohort = cohort_report_inputs(outdir, 2, tumour=True)
    assert all(Path(p).exists() for p in cohort) and len(cohort) == 5
    cohort = cohort_report_inputs(outdir, 2, tumour=True, contrasts=["flair"])
    assert cohort[-1] == str(outdir / "atlas" / "atlas_FLAIR.nii.gz") and len(cohort) == 6


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


def _aligned_subject(outdir: Path, contrast_qc: str | None) -> None:
    """sub-09: a T1w whose registrations pass and a FLAIR whose alignment QC is ``contrast_qc``."""
    image = blob_image(SHAPE, seed=7)
    save_image(image, _anat(outdir, "09", "1", "desc-preproc_T1w.nii.gz"))
    for stage in ("template", "atlas"):
        _anat(outdir, "09", "1", f"from-T1w_to-{stage}_mode-image_desc-qc_xfm.json").write_text(
            _qc(0.5, 0.8, 0.0)
        )
    if contrast_qc is not None:
        _anat(outdir, "09", "1", "from-FLAIR_to-T1w_mode-image_desc-qc_xfm.json").write_text(
            contrast_qc
        )


def test_a_flagged_contrast_alignment_flags_the_subject(tmp_path):
    from factories import contrast_qc_json

    from atlasflow.reports.cohort import viewer_anchor

    outdir = tmp_path / "results"
    _aligned_subject(outdir, contrast_qc_json(nmi_after=1.012, shift_mm=24.0))
    qc = subject_qc(outdir, "09", ["1"], thresholds=THRESHOLDS)
    assert qc.contrasts == {"1": ["flair"]}  # found from its files
    assert qc.status == "flag"
    assert qc.reasons == [
        "ses-1 FLAIR to T1w: NMI after 1.012 < 1.030 (contrasts.min_nmi)",
        "ses-1 FLAIR to T1w: shift 24.0 mm > 20.0 mm (contrasts.max_shift_mm)",
    ]
    assert qc.summary()["contrast/nmi_after"]["status"] == "flag"
    # the cohort page opens the session's scene, where the T1w flickers against the FLAIR
    assert viewer_anchor(qc) == "view=1/native"
    # numbers within the limits, but the JSON says the alignment failed: flagged with its reason
    _aligned_subject(outdir, contrast_qc_json(qc_pass=False, qc_flags=["another head"]))
    qc = subject_qc(outdir, "09", ["1"], thresholds=THRESHOLDS)
    assert qc.status == "flag" and qc.reasons == ["ses-1 FLAIR to T1w: another head"]
    # told the session has a FLAIR, when the alignment left nothing: incomplete, then failed once
    # its job logged an error
    _anat(outdir, "09", "1", "from-FLAIR_to-T1w_mode-image_desc-qc_xfm.json").unlink()
    qc = subject_qc(outdir, "09", ["1"], thresholds=THRESHOLDS, contrasts={"1": ["flair"]})
    assert qc.status == "incomplete"
    assert "from-FLAIR_to-T1w_mode-image_desc-qc_xfm.json not found" in qc.reasons[0]
    log = outdir / "logs" / "align_flair" / "sub-09_ses-1.log"
    log.parent.mkdir(parents=True)
    log.write_text("atlasflow: error: flair.nii.gz: not aligned to the session's T1w\n")
    qc = subject_qc(outdir, "09", ["1"], thresholds=THRESHOLDS)  # found from its log
    assert qc.contrasts == {"1": ["flair"]} and qc.status == "failed"
    assert qc.reasons == [
        "ses-1 align_flair failed: flair.nii.gz: not aligned to the session's T1w"
    ]


def test_tumour_plot_draws_a_line_per_compartment():
    from PIL import Image as PILImage

    from atlasflow.reports.figures import COMPARTMENT_COLOURS, tumor_volume_plot
    from atlasflow.reports.panels import tumour_compartments

    rows = [
        {
            "session": "1",
            "volume_mm3": 500.0,
            "necrosis_volume_ml": 0.1,
            "oedema_volume_ml": 0.3,
            "enhancing_volume_ml": 0.1,
            "other_volume_ml": None,
        },
        {
            "session": "2",
            "volume_mm3": 900.0,
            "necrosis_volume_ml": 0.2,
            "oedema_volume_ml": 0.5,
            "enhancing_volume_ml": None,
            "other_volume_ml": None,
        },
    ]
    lines = tumour_compartments(rows)
    assert list(lines) == ["necrosis", "oedema", "enhancing"]  # columns without a value left out
    assert lines["oedema"] == [0.3, 0.5] and np.isnan(lines["enhancing"][1])
    assert tumour_compartments([{"session": "1", "volume_mm3": 1.0}]) == {}

    def colours(png: bytes) -> set[tuple[int, int, int]]:
        import io

        pixels = np.asarray(PILImage.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
        return {tuple(int(v) for v in p) for p in np.unique(pixels, axis=0)}

    def rgb(hex_colour: str) -> tuple[int, int, int]:
        return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))

    args = ([0.0, 60.0], [500.0, 900.0], ["1", "2"], ["baseline", "progression"], "sub-x")
    with_lines = colours(tumor_volume_plot(*args, compartments=lines))
    whole_only = colours(tumor_volume_plot(*args))
    for colour in COMPARTMENT_COLOURS.values():
        assert rgb(colour) in with_lines and rgb(colour) not in whole_only


def test_cli_takes_the_contrasts_per_session(reports, tmp_path, capsys):
    outdir = reports["outdir"]
    out = tmp_path / "sub-03.html"
    base = ["report", "subject", "--outdir", str(outdir), "--subject", "03", "--out", str(out)]
    assert cli_main([*base, "--sessions", "1", "2", "--contrasts", "1=flair", "ses-2=FLAIR"]) == 0
    qc = json.loads((tmp_path / "sub-03_qc.json").read_text())
    assert qc["contrasts"] == {"1": ["flair"], "2": ["flair"]} and qc["status"] == "pass"
    # told there is none: no contrast sections, no contrast checks
    assert cli_main([*base, "--sessions", "1", "2", "--contrasts"]) == 0
    assert "FLAIR aligned" not in out.read_text()
    capsys.readouterr()
    assert cli_main([*base, "--sessions", "1", "--contrasts", "1=dwi"]) == 1
    assert "--contrasts '1=dwi': expected SESSION=C1,C2" in capsys.readouterr().err


def test_a_cohort_without_sessions_is_reported_without_ses(tmp_path, capsys):
    """Scans without a session (outputs in sub-S/anat/, no ses- entity), given to the commands as
    the workflow gives them (``--sessions ''``, ``--raw =PATH``, ``--contrasts =flair``,
    ``--scans S:``): both pages, the QC verdict and the figures name no ``ses-``; discovered
    from the folders too (``--subjects``)."""
    from factories import write_contrast_outputs, write_scan_outputs

    outdir = tmp_path / "results"
    template = blob_image(SHAPE, seed=100)
    save_image(template, outdir / "template" / "template_T1w.nii.gz")
    save_image(template, outdir / "atlas" / "atlas_T1w.nii.gz")
    good = _qc(0.41, 0.86, 0.0)
    write_scan_outputs(outdir, "08", "", 8, qc_template=good, qc_atlas=good)
    write_scan_outputs(outdir, "09", "", 9, qc_template=good, qc_atlas=_qc(0.2, 0.31, 0.012))
    write_contrast_outputs(outdir, "09", "", "flair", 9)
    raw = tmp_path / "input" / "sub-09_T1w.nii.gz"
    save_image(blob_image(SHAPE, seed=9), raw)
    assert not any("ses-" in str(p) for p in outdir.rglob("*"))
    pages = outdir / "reports"
    for s in ("08", "09"):
        argv = ["report", "subject", "--outdir", str(outdir), "--subject", s, "--sessions", ""]
        argv += ["--raw", f"={raw}", "--contrasts", "=flair"] if s == "09" else []
        argv += ["--out", str(pages / f"sub-{s}.html"), "--figures-dir", str(pages / s)]
        assert cli_main([*argv, "--min-ncc-after", "0.5"]) == 0
    qc = json.loads((pages / "sub-09_qc.json").read_text())
    assert qc["sessions"] == [""] and qc["contrasts"] == {"": ["flair"]}
    assert qc["status"] == "flag" and qc["reasons"][0].startswith("to atlas: NCC after 0.310")
    page = (pages / "sub-09.html").read_text()
    assert "One scan, without a session." in page and '<h2 id="scan">scan</h2>' in page
    assert 'href="#scan"' in page and "FLAIR aligned" in page
    cohort = ["report", "cohort", "--outdir", str(outdir), "--min-ncc-after", "0.5"]
    assert cli_main([*cohort, "--scans", "08:", "09:", "--out", str(pages / "cohort.html")]) == 0
    # the cohort page of a report command told only the subjects finds their scans in sub-S/anat
    (pages / "sub-08_qc.json").unlink()
    assert cli_main([*cohort, "--subjects", "08", "09", "--out", str(tmp_path / "c2.html")]) == 0
    assert json.loads((pages / "sub-09_qc.json").read_text())["status"] == "flag"
    for html in (pages / "sub-08.html", page, pages / "cohort.html", tmp_path / "c2.html"):
        text = html if isinstance(html, str) else html.read_text()
        assert "ses-" not in text
    assert "sub-08" in (tmp_path / "c2.html").read_text()
    assert "no outputs and no logs" not in (tmp_path / "c2.html").read_text()
    figures = sorted(p.name for p in (pages / "09").iterdir())
    assert "sub-09_template.png" in figures and not any("ses-" in f for f in figures)
    capsys.readouterr()


def test_a_cross_contrast_registration_is_judged_by_its_mutual_information(tmp_path):
    """A FLAIR reference registered to the T1w template (QC JSON ``same_contrast: false``): its
    NCC is shown, not judged; a drop of its mutual information flags it, named after the
    reference's files (from-FLAIR_to-template)."""
    from factories import qc_json

    from atlasflow.layout import Scan
    from atlasflow.registration.qc import QCThresholds
    from atlasflow.reports.checks import stage_checks

    scan = Scan(tmp_path, "01", "1", "flair")
    path = scan.qc_json("template")
    assert path.name == "sub-01_ses-1_from-FLAIR_to-template_mode-image_desc-qc_xfm.json"
    path.parent.mkdir(parents=True)
    path.write_text(qc_json(0.29, 0.42, 0.0, nmi_before=1.012, nmi_after=1.031, same_contrast=False))
    checks, _, _ = stage_checks(scan, "template", QCThresholds())
    status = {c.metric: c.status for c in checks}
    assert status["ncc_after"] == "info" and status["nmi_change"] == "pass", status
    path.write_text(qc_json(0.29, 0.42, 0.0, nmi_before=1.03, nmi_after=1.01, same_contrast=False))
    checks, _, _ = stage_checks(scan, "template", QCThresholds())
    (flag,) = [c for c in checks if c.status == "flag"]
    assert flag.reason() == "ses-1 to template: NMI change -0.020 < -0.005 (a registration must not lower the mutual information)"
    # the same numbers for one contrast: the NCC limit decides
    path.write_text(qc_json(0.29, 0.42, 0.0, nmi_before=1.012, nmi_after=1.031, same_contrast=True))
    checks, _, _ = stage_checks(scan, "template", QCThresholds())
    assert {c.metric: c.status for c in checks}["ncc_after"] == "flag"
