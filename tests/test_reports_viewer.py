"""The subject report's viewer data: quantisation and downsampling of embedded volumes, their
NIfTI bytes, the scenes planned from workflow outputs, the page-size budget and the cohort links.
(The viewer drawing in a real browser is in test_reports_browser.py.)"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from factories import REPORT_SESSIONS, REPORT_THRESHOLDS, blob_image, report_outputs

from atlasflow.io.images import Image
from atlasflow.reports.cohort import viewer_anchor, write_cohort_report
from atlasflow.reports.html import asset
from atlasflow.reports.qc import subject_qc
from atlasflow.reports.subject import write_subject_report
from atlasflow.reports.viewer import (
    PAGE_BUDGET,
    VOLUME_BUDGET,
    niivue_gzip_base64,
    viewer_data,
    volume_budget,
)
from atlasflow.reports.volumes import dequantise, downsample, embed, quantise

ASSETS = Path(__file__).resolve().parents[1] / "src" / "atlasflow" / "reports" / "assets"


def read_back(nifti_gz: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(nifti_gz))


# ------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("kind", ["image", "magnitude", "signed"])
def test_quantise_round_trip_is_within_half_a_step(kind):
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, (20, 18, 16)).astype(np.float32)
    if kind != "signed":
        data = np.abs(data)
    q = quantise(data, kind)
    assert q.codes.dtype == np.uint8
    error = np.abs(dequantise(q) - data)
    assert error.max() <= q.step / 2 + 1e-5 * np.abs(data).max()
    # the step is the range over the codes: 255 of them (254 for a map symmetric about zero)
    span = 2 * np.abs(data).max() if kind == "signed" else data.max() - data.min()
    assert q.step == pytest.approx(span / (254 if kind == "signed" else 255), rel=1e-6)


def test_signed_maps_keep_zero_exact_and_non_finite_values_do_not_spread():
    data = np.linspace(-0.7, 0.3, 1000).reshape(10, 10, 10).astype(np.float32)
    data[0, 0, 0] = 0.0
    data[1, 1, 1] = np.nan
    data[2, 2, 2] = np.inf
    q = quantise(data, "signed")
    back = dequantise(q)
    assert back[0, 0, 0] == 0.0
    assert np.isfinite(back).all()
    assert back.min() >= -0.7 - 1e-6 and back.max() <= 0.7 + 1e-6


def test_labels_keep_their_values_in_8_or_16_bits():
    labels = np.array([[[0, 2, 41]]], np.int16)
    q = quantise(labels, "labels")
    assert q.codes.dtype == np.uint8 and np.array_equal(dequantise(q), labels)
    big = np.array([[[0, 2, 2035]]], np.int32)  # FreeSurfer-style cortical label values
    q = quantise(big, "labels")
    assert q.codes.dtype == np.uint16 and np.array_equal(dequantise(q), big)
    with pytest.raises(ValueError, match="0..65535"):
        quantise(-big, "labels")
    with pytest.raises(ValueError, match="unknown volume kind"):
        quantise(big, "colour")


# -------------------------------------------------------------------------- downsampling


def test_downsampled_grid_sits_on_the_block_centres():
    image = blob_image((24, 28, 20), spacing=2.0)
    world = np.stack(np.meshgrid(*[np.arange(s) for s in image.data.shape], indexing="ij"), -1)
    world = world @ image.affine[:3, :3].T + image.affine[:3, 3]
    small = downsample(image, 2)
    assert small.data.shape == (12, 14, 10)
    # a block's mean equals the mean over its voxels; its centre is the mean of their positions
    assert small.data[3, 4, 5] == pytest.approx(image.data[6:8, 8:10, 10:12].mean(), rel=1e-5)
    centre = small.affine @ np.array([3, 4, 5, 1.0])
    assert np.allclose(centre[:3], world[6:8, 8:10, 10:12].reshape(-1, 3).mean(0))
    # odd sizes: the partial block at the edge is dropped
    assert downsample(blob_image((25, 27, 21)), 2).data.shape == (12, 13, 10)


def test_downsampled_labels_are_voxels_of_the_original_with_their_positions():
    labels = np.random.default_rng(1).integers(0, 5, (12, 12, 12)).astype(np.uint8)
    image = Image(labels, np.diag([1.5, 1.5, 1.5, 1.0]))
    small = downsample(image, 3, labels=True)
    assert small.data.shape == (4, 4, 4)
    for ijk in [(0, 0, 0), (1, 2, 3), (3, 3, 3)]:
        world = small.affine @ np.array([*ijk, 1.0])
        original = np.linalg.solve(image.affine, world)[:3]
        assert np.allclose(original, np.round(original))
        assert small.data[ijk] == labels[tuple(np.round(original).astype(int))]


# ---------------------------------------------------------------------------- NIfTI bytes


def test_embedded_nifti_reads_back_in_ras_with_values_within_half_a_step():
    image = blob_image((24, 28, 20), spacing=2.0)
    # stored LAS, as many scanners write: the page carries RAS voxel order, same world positions
    flipped = Image(image.data[::-1].copy(), image.affine @ np.diag([-1.0, 1, 1, 1]))
    flipped.affine[0, 3] = image.affine[0, 3] + 2.0 * 23
    e = embed(flipped, "v0", "scan", "image")
    nii = read_back(e.nifti_gz)
    assert nib.aff2axcodes(nii.affine) == ("R", "A", "S")
    assert np.allclose(nii.affine, image.affine)
    assert np.abs(nii.get_fdata() - image.data).max() <= e.step / 2 + 1e-5
    assert nii.header["cal_min"] == pytest.approx(e.display[0])
    assert embed(flipped, "v0", "scan", "image").nifti_gz == e.nifti_gz  # deterministic


def test_a_2mm_brain_sized_volume_embeds_in_a_few_hundred_kilobytes():
    """Size bound: a 91x109x91 (MNI 2 mm) image with noise, the worst case for compression."""
    image = blob_image((91, 109, 91), spacing=2.0)
    image.data += np.random.default_rng(0).normal(0, 0.02, image.data.shape).astype(np.float32)
    e = embed(image, "v0", "scan", "image")
    assert len(e.base64) < 1_100_000  # raw uint8 would be 900 kB, base64 of it 1.2 MB
    assert len(embed(image, "v0", "scan", "image", factor=2).base64) < len(e.base64) / 6


# ------------------------------------------------------------------------------- scenes


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer")
    outdir, raw = report_outputs(root)
    return outdir, raw


def test_scenes_of_a_longitudinal_subject(outputs):
    outdir, _ = outputs
    qc = subject_qc(outdir, "03", REPORT_SESSIONS["03"], thresholds=REPORT_THRESHOLDS)
    scenes, embedded, factors = viewer_data(outdir, qc)
    assert factors == (1, 1, 1)
    ids = [s.id for s in scenes]
    assert ids == [
        "1/native",
        "1/template",
        "1/atlas",
        "2/native",
        "2/template",
        "2/atlas",
        "2/baseline",
    ]
    by_id = {s.id: s for s in scenes}
    for scene in scenes:  # every layer is embedded, and the template is embedded once
        assert all(layer.key in embedded for layer in scene.layers)
    assert by_id["1/template"].layers[0].key == by_id["2/template"].layers[0].key
    baseline = by_id["2/baseline"]
    assert [layer.name for layer in baseline.layers] == [
        "ses-1 (fixed)",
        "ses-2 registered",
        "ses-2 before registration",
        "ses-1 FLAIR",
        "ses-2 FLAIR registered",
        "log-Jacobian",
        "difference",
        "displacement (mm)",
        "FLAIR difference",
        "tumour ses-1",
        "tumour ses-2",
    ]
    assert [label for label, _, _ in baseline.flicker] == [
        "fixed vs registered",
        "fixed vs before registration",
        "ses-1 vs ses-2 FLAIR",
    ]
    # marks: the follow-up tumour's centre (voxels 9..14 of a 2 mm grid centred on 0) and the
    # smallest log-Jacobian of the registration to the atlas
    assert np.allclose(
        baseline.marks["tumour"], (np.array([11.5, 13.5, 9.5]) - [11.5, 13.5, 9.5]) * 2
    )
    assert "min-jacobian" in by_id["1/atlas"].marks
    kinds = {embedded[layer.key].kind for layer in by_id["1/atlas"].layers}
    assert kinds == {"image", "signed", "labels"}


def test_every_contrast_is_a_layer_with_a_flicker_against_the_t1w(outputs):
    outdir, _ = outputs
    qc = subject_qc(outdir, "03", REPORT_SESSIONS["03"], thresholds=REPORT_THRESHOLDS)
    scenes, embedded, _ = viewer_data(outdir, qc)
    by_id = {s.id: s for s in scenes}

    def source(scene: str, name: str) -> str:
        layer = next(la for la in by_id[scene].layers if la.name == name)
        return embedded[layer.key].name

    # the session's scene: the FLAIR on the T1w grid, hidden, flickered against the T1w itself
    native = by_id["2/native"]
    assert [la.name for la in native.layers][:2] == [
        "ses-2 preprocessed",
        "FLAIR (on the T1w grid)",
    ]
    assert not native.layers[1].visible and embedded[native.layers[1].key].kind == "image"
    assert native.flicker == [("T1w vs FLAIR", native.layers[1].key, "")]
    # template and atlas: the FLAIR carried there, flickered against the registered T1w
    for stage in ("template", "atlas"):
        scene = by_id[f"1/{stage}"]
        flair = next(la for la in scene.layers if la.name == "ses-1 FLAIR registered")
        registered = next(la for la in scene.layers if la.name == "ses-1 registered")
        assert ("registered T1w vs FLAIR", flair.key, registered.key) in scene.flicker
    assert source("1/atlas", "ses-1 FLAIR registered") == "ses-1 FLAIR registered"
    # baseline space: the follow-up's FLAIR there, over the baseline's own FLAIR (embedded once,
    # shared with the baseline's session scene), and the FLAIR difference map
    baseline = by_id["2/baseline"]
    base_flair = next(la for la in baseline.layers if la.name == "ses-1 FLAIR")
    assert base_flair.key == by_id["1/native"].layers[1].key
    followup = next(la for la in baseline.layers if la.name == "ses-2 FLAIR registered")
    assert baseline.flicker[-1] == ("ses-1 vs ses-2 FLAIR", followup.key, base_flair.key)
    difference = next(la for la in baseline.layers if la.name == "FLAIR difference")
    assert embedded[difference.key].kind == "signed" and not difference.visible
    config = baseline.to_json()
    assert config["flicker"][-1] == {
        "label": "ses-1 vs ses-2 FLAIR",
        "key": baseline.flicker[-1][1],
        "base": base_flair.key,
    }
    assert "base" not in config["flicker"][0]
    # a subject without other contrasts has no such layers
    plain = subject_qc(outdir, "01", REPORT_SESSIONS["01"], thresholds=REPORT_THRESHOLDS)
    names = [la.name for sc in viewer_data(outdir, plain)[0] for la in sc.layers]
    assert not any("FLAIR" in n for n in names)


def test_missing_outputs_are_named_and_their_layers_left_out(outputs):
    outdir, _ = outputs
    qc = subject_qc(outdir, "02", REPORT_SESSIONS["02"], thresholds=REPORT_THRESHOLDS)
    scenes, embedded, _ = viewer_data(outdir, qc)
    atlas = {s.id: s for s in scenes}["1/atlas"]
    assert [layer.name for layer in atlas.layers][:2] == [
        "atlas (fixed)",
        "ses-1 before registration",
    ]
    assert any("space-atlas_T1w.nii.gz not found" in n for n in atlas.notes)
    assert any("to-atlas_mode-image_xfm.nii.gz not found" in n for n in atlas.notes)
    # sub-04 failed before registration: the preprocessed scan and the template it missed
    qc = subject_qc(outdir, "04", REPORT_SESSIONS["04"], thresholds=REPORT_THRESHOLDS)
    assert [s.id for s in viewer_data(outdir, qc)[0]] == ["1/native", "1/template", "1/atlas"]


def test_volumes_are_downsampled_to_fit_the_page_budget(outputs):
    outdir, _ = outputs
    qc = subject_qc(outdir, "03", REPORT_SESSIONS["03"], thresholds=REPORT_THRESHOLDS)
    full = viewer_data(outdir, qc)[1]
    total = sum(len(e.base64) for e in full.values())
    maps = sum(len(e.base64) for e in full.values() if e.kind in ("signed", "magnitude"))
    # maps give way first: a budget they break alone is met by downsampling only them
    _, fewer, factors = viewer_data(outdir, qc, budget=total - maps // 2)
    assert factors == (1, 1, 2)
    assert all(
        (e.shape[0] <= full[k].shape[0] // 2) == (e.kind in ("signed", "magnitude"))
        for k, e in fewer.items()
    )
    # then the other contrasts carried into template, atlas and baseline space; the T1w, the
    # fixed images and each contrast on its own session's T1w grid keep their resolution
    carried = {k for k, e in full.items() if e.name.endswith("FLAIR registered")}
    assert len(carried) == 5  # ses-1 and ses-2 to template and atlas, ses-2 to baseline
    small_maps = sum(len(e.base64) for e in fewer.values() if e.kind in ("signed", "magnitude"))
    budget = total - maps + small_maps - sum(len(full[k].base64) for k in carried) // 2
    _, less, factors = viewer_data(outdir, qc, budget=budget)
    assert factors == (1, 2, 2)
    for k, e in less.items():
        coarse = e.kind in ("signed", "magnitude") or k in carried
        assert (e.shape[0] <= full[k].shape[0] // 2) == coarse, e.name
    _, small, factors = viewer_data(outdir, qc, budget=total // 3)
    assert factors[0] >= 2
    assert sum(len(e.base64) for e in small.values()) <= total // 3
    assert all(e.shape[0] <= full[k].shape[0] // 2 for k, e in small.items())


def test_subject_page_carries_the_viewer_and_stays_small(outputs, tmp_path):
    outdir, raw = outputs
    page = tmp_path / "sub-03.html"
    write_subject_report(
        outdir,
        "03",
        REPORT_SESSIONS["03"],
        page,
        raw_inputs={"1": str(raw["03"])},
        thresholds=REPORT_THRESHOLDS,
    )
    html = page.read_text()
    assert page.stat().st_size < 10_000_000
    # the volumes get what the figures and markup leave of the page budget
    assert volume_budget(0) == VOLUME_BUDGET
    assert volume_budget(PAGE_BUDGET - 3_000_000) == 3_000_000 - len(niivue_gzip_base64())
    assert volume_budget(PAGE_BUDGET) == 0
    config = json.loads(re.search(r'id="viewer-config">(.*?)</script>', html).group(1))
    assert config["initial"] == "1/native"
    for key in config["volumes"]:
        assert f'id="viewer-vol-{key}"' in html
    assert 'id="viewer-lib" data-encoding="base64+gzip"' in html
    assert "<img" in html  # the static figures remain
    lean = tmp_path / "lean.html"
    write_subject_report(
        outdir, "03", REPORT_SESSIONS["03"], lean, thresholds=REPORT_THRESHOLDS, with_viewer=False
    )
    assert "viewer-config" not in lean.read_text()


def test_cohort_rows_open_the_viewer_at_the_flagged_registration(outputs, tmp_path):
    outdir, _ = outputs
    reports = tmp_path / "reports"
    for s, sessions in REPORT_SESSIONS.items():
        write_subject_report(
            outdir, s, sessions, reports / f"sub-{s}.html", thresholds=REPORT_THRESHOLDS
        )
    verdicts = {
        q.subject: q
        for q in write_cohort_report(
            outdir, list(REPORT_SESSIONS), reports / "cohort.html", thresholds=REPORT_THRESHOLDS
        )
    }
    # sub-02 is flagged for folding to the atlas (and NCC): the first flagged check opens its scene
    assert viewer_anchor(verdicts["02"]).startswith("view=1/atlas")
    assert viewer_anchor(verdicts["01"]) == "viewer"
    html = (reports / "cohort.html").read_text()
    assert f'href="sub-02.html#{viewer_anchor(verdicts["02"]).replace("&", "&amp;")}"' in html
    assert 'href="sub-01.html#viewer"' in html


def test_vendored_niivue_is_the_recorded_release():
    """The build in the package is byte for byte the one VENDORED.md names (npm @niivue/niivue)."""
    notes = (ASSETS / "VENDORED.md").read_text()
    digest = hashlib.sha256((ASSETS / "niivue.umd.js").read_bytes()).hexdigest()
    assert digest in notes
    assert "BSD 2-Clause" in (ASSETS / "NIIVUE_LICENSE.txt").read_text()
    assert "DecompressionStream" in asset("viewer.js")
