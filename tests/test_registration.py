"""The registration entry point and its file outputs (ANTs backend; the deep one in
test_registration_engine.py)."""

import json

import numpy as np
import pytest
from factories import blob_image, translated

from atlasflow.cli.main import main
from atlasflow.errors import AtlasflowError
from atlasflow.io.images import load_image, save_image
from atlasflow.registration.api import dice_per_label, from_ants, ncc, register, to_ants
from atlasflow.transforms import apply_transform


def shifted_pair():
    fixed = blob_image((28, 30, 26), seed=1)
    truth = np.eye(4)
    truth[:3, 3] = [4.0, -3.0, 2.0]  # mm
    # moving sampled so that x_moving = truth @ x_fixed is the correspondence
    moving = translated(fixed, truth[:3, 3])
    return fixed, moving, truth


def test_ants_image_conversion_round_trip():
    image = blob_image()
    image.affine[:3, :3] = image.affine[:3, :3] @ np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]])
    back = from_ants(to_ants(image))
    np.testing.assert_allclose(back.affine, image.affine, atol=1e-5)
    np.testing.assert_allclose(back.data, image.data)


def test_ants_backend_recovers_a_translation():
    fixed, moving, truth = shifted_pair()
    reg = register(fixed, moving, backend="ants", ants_type="Rigid")
    np.testing.assert_allclose(reg.transform.affine[:3, 3], truth[:3, 3], atol=0.6)
    warped = apply_transform(moving, reg.transform, fixed.grid)
    assert ncc(fixed.data, warped.data) > ncc(fixed.data, moving.data)


def test_unknown_backend_is_a_clear_error(blob):
    with pytest.raises(AtlasflowError, match="unknown registration backend"):
        register(blob, blob, backend="elastix")


def test_dice_per_label():
    a = np.array([0, 1, 1, 2, 2, 3])
    b = np.array([0, 1, 2, 2, 2, 0])
    d = dice_per_label(a, b)
    assert d == {1: pytest.approx(2 / 3), 2: pytest.approx(0.8)}


def test_register_command_writes_every_output(tmp_path, capsys):
    fixed, moving, _ = shifted_pair()
    labels = moving.with_data((moving.data > 0.5).astype(np.uint8) * 2)
    save_image(fixed, tmp_path / "f.nii.gz")
    save_image(moving, tmp_path / "m.nii.gz")
    save_image(labels, tmp_path / "l.nii.gz")
    code = main(
        [
            "register",
            "--fixed",
            str(tmp_path / "f.nii.gz"),
            "--moving",
            str(tmp_path / "m.nii.gz"),
            "--moving-labels",
            str(tmp_path / "l.nii.gz"),
            "--out-dir",
            str(tmp_path / "out"),
            "--backend",
            "ants",
            "--ants-type",
            "SyN",
        ]
    )
    assert code == 0
    out = tmp_path / "out"
    for name in (
        "warped.nii.gz",
        "affine.mat",
        "warp.nii.gz",
        "inverse_warp.nii.gz",
        "warped_labels.nii.gz",
        "metrics.json",
    ):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ncc_after"] > metrics["ncc_before"]
    assert metrics["folding_fraction"] < 0.01
    assert metrics["seconds"] > 0
    warped_labels = load_image(out / "warped_labels.nii.gz", dtype=None).data
    assert set(np.unique(warped_labels)) <= {0, 2}


def test_register_command_reports_missing_input_in_one_line(tmp_path, capsys):
    code = main(
        [
            "register",
            "--fixed",
            str(tmp_path / "nope.nii.gz"),
            "--moving",
            str(tmp_path / "x.nii.gz"),
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.nii.gz" in err[0] and "not found" in err[0]
    assert not (tmp_path / "warped.nii.gz").exists()


def test_qc_flags_name_the_failed_check_and_its_threshold():
    from atlasflow.registration.api import QCThresholds, qc_flags

    good = {"folding_fraction": 0.0, "ncc_before": 0.3, "ncc_after": 0.8}
    assert qc_flags(good, QCThresholds()) == []
    folded = {**good, "folding_fraction": 0.01}
    (flag,) = qc_flags(folded, QCThresholds(max_folding_fraction=0.001))
    assert "folding" in flag and "0.001" in flag
    worse = {**good, "ncc_before": 0.9, "ncc_after": 0.45}
    flags = qc_flags(worse, QCThresholds(min_ncc_after=0.5))
    assert len(flags) == 2 and any("lowered" in f for f in flags)


def test_flagged_registration_keeps_its_outputs_and_says_why_in_the_metrics(tmp_path, capsys):
    """QC bounds outside what a registration reached: outputs are written, qc_pass is false and
    qc_flags names each failed check with its bound (what the reports show). The deep backend's
    affine is deterministic; ANTs' (random sampling, threads) diverged now and then on this small
    pair, which adds a third, legitimate flag."""
    fixed, moving, _ = shifted_pair()
    save_image(fixed, tmp_path / "f.nii.gz")
    save_image(moving, tmp_path / "m.nii.gz")
    args = [
        "register",
        "--fixed",
        str(tmp_path / "f.nii.gz"),
        "--moving",
        str(tmp_path / "m.nii.gz"),
        "--out-dir",
        str(tmp_path / "out"),
        "--backend",
        "deep",
        "--affine-only",
    ]
    assert main([*args, "--min-ncc", "1.5", "--max-folding", "-1"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["qc_pass"] is False
    assert len(metrics["qc_flags"]) == 2
    assert any("1.5" in f for f in metrics["qc_flags"]) and any(
        "folding" in f for f in metrics["qc_flags"]
    )
    assert (tmp_path / "out" / "warped.nii.gz").exists()
    assert main([*args, "--min-ncc", "0.0", "--max-folding", "1"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["qc_pass"] is True and metrics["qc_flags"] == []


# ------------------------------------------------------------------- registration options

WORKFLOW_CONFIG = {
    "registration": {
        "backend": "deep",
        "refine_steps": 30,
        "model": None,
        "device": "cpu",
        "ants_type": "SyN",
        "seed": 0,
    },
    "atlas": {"refine_steps": 0, "affine_steps": 0},
    "longitudinal": {"refine_steps": 100, "tumor_weight": 1.0, "exclusion_margin_mm": 4.0},
}


def test_workflow_flags_keep_their_spelling():
    """Rules pass these strings as params: a changed spelling would rerun every registration."""
    from atlasflow.registration.options import workflow_flags

    assert (
        workflow_flags(WORKFLOW_CONFIG, "register")
        == "--backend deep --refine 30 --device cpu --ants-type SyN --seed 0 "
    )
    assert (
        workflow_flags(WORKFLOW_CONFIG, "atlas_init")
        == "--backend deep --refine 0 --device cpu --ants-type SyN --seed 0 "
    )
    assert workflow_flags(WORKFLOW_CONFIG, "atlas") == (
        "--backend deep --refine 0 --device cpu --ants-type SyN --seed 0  --affine-steps 0"
    )
    config = {
        **WORKFLOW_CONFIG,
        "registration": {**WORKFLOW_CONFIG["registration"], "model": "w.safetensors", "seed": 3},
    }
    assert workflow_flags(config, "longitudinal") == (
        "--backend deep --refine 100 --device cpu --ants-type SyN --seed 3 --model w.safetensors "
        "--tumor-weight 1.0 --exclusion-margin 4.0"
    )


@pytest.mark.parametrize(
    "stage, command",
    [
        ("register", ["register", "--fixed", "f", "--moving", "m"]),
        ("atlas_init", ["atlas", "init", "--output", "o"]),
        ("atlas", ["atlas", "iteration", "--output", "o"]),
        ("longitudinal", ["longitudinal", "pair"]),
    ],
)
def test_flags_read_back_as_the_options_they_came_from(stage, command):
    from atlasflow.cli.main import build_parser
    from atlasflow.registration.options import RegistrationOptions, workflow_flags

    config = {
        **WORKFLOW_CONFIG,
        "registration": {**WORKFLOW_CONFIG["registration"], "model": "w.pt", "backend": "ants"},
    }
    args = build_parser().parse_args([*command, *workflow_flags(config, stage).split()])
    assert RegistrationOptions.from_args(args) == RegistrationOptions.from_config(config, stage)
    # and a command line without them gives the defaults
    assert (
        RegistrationOptions.from_args(build_parser().parse_args(command)) == RegistrationOptions()
    )


def test_options_take_keyword_changes_and_refuse_unknown_names():
    from atlasflow.registration.options import RegistrationOptions

    options = RegistrationOptions.of({"backend": "ants"}, refine_steps=5)
    assert (options.backend, options.refine_steps, options.seed) == ("ants", 5, 0)
    with pytest.raises(TypeError):
        RegistrationOptions.of(options, refine=5)


# ---------------------------------------------------------------- QC across contrasts


def _tissue_phantom(seed: int = 0):
    """Three 'tissues' in nested shells (CSF outside, GM, WM inside) and a T1w-like and a
    T2w-like image of them (CSF dark / bright), with a little noise."""
    ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, 32)] * 3, indexing="ij"), -1)
    r = np.sqrt((ijk**2).sum(-1)) + 0.08 * np.sin(5 * ijk[..., 0]) * np.cos(4 * ijk[..., 1])
    tissue = np.select([r < 0.45, r < 0.7, r < 0.85], [3, 2, 1], 0)
    rng = np.random.default_rng(seed)
    t1 = np.choose(tissue, [0.0, 0.3, 0.6, 1.0]) + rng.normal(0, 0.02, tissue.shape)
    t2 = np.choose(tissue, [0.0, 1.0, 0.7, 0.45]) + rng.normal(0, 0.02, tissue.shape)
    return tissue > 0, t1.astype(np.float32), t2.astype(np.float32)


def test_mutual_information_and_intensity_agreement_tell_contrasts_apart():
    from atlasflow.registration.qc import intensity_agreement, nmi

    mask, t1, t2 = _tissue_phantom()
    rng = np.random.default_rng(1)
    assert nmi(t1, t1 * 3 + 100, mask) > 1.5  # one image determines the other
    _, t1_again, _ = _tissue_phantom(seed=5)  # the same anatomy, other noise
    assert abs(nmi(t1, t2, mask) - nmi(t1, t1_again, mask)) < 0.1  # contrast does not matter to MI
    assert nmi(t1, rng.permutation(t1.ravel()).reshape(t1.shape), mask) < 1.05  # unrelated
    assert intensity_agreement(t1, t1 * 2 + 5, mask) > 0.95
    assert intensity_agreement(t1, t2, mask) < 0.0  # CSF dark in one, bright in the other
    shifted = np.roll(t2, 6, axis=0)
    assert nmi(t1, shifted, mask) < nmi(t1, t2, mask) - 0.05  # misaligned: less information


def test_qc_judges_a_cross_contrast_pair_by_mutual_information_not_ncc():
    from atlasflow.registration.api import QCThresholds, qc_flags

    # a good T2w -> T1w registration: NCC low (even negative), mutual information up
    good = {"folding_fraction": 0.0, "ncc_before": -0.2, "ncc_after": -0.3, "nmi_before": 1.06,
            "nmi_after": 1.12, "same_contrast": False}  # fmt: skip
    assert qc_flags(good, QCThresholds()) == []
    # the same numbers for one contrast: the NCC limits apply
    assert len(qc_flags({**good, "same_contrast": True}, QCThresholds())) == 2
    # a broken one: the mutual information fell
    (flag,) = qc_flags({**good, "nmi_after": 1.03}, QCThresholds())
    assert "mutual information" in flag and "1.060 -> 1.030" in flag


def test_register_and_measure_records_mutual_information_and_the_contrast_verdict():
    from atlasflow.io.images import Image
    from atlasflow.registration.api import register_and_measure
    from atlasflow.registration.options import RegistrationOptions

    mask, t1, t2 = _tissue_phantom()
    _, t1_again, _ = _tissue_phantom(seed=5)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    options = RegistrationOptions(backend="deep", affine_only=True)
    # scanner-like intensities: the engine's contrast-independent path
    fixed = Image(t1 * 900 + 40, affine)
    cross = register_and_measure(fixed, Image(t2 * 700 + 25, affine), options).metrics
    same = register_and_measure(fixed, Image(t1_again * 400 + 10, affine), options).metrics
    assert cross["same_contrast"] is False and same["same_contrast"] is True
    for metrics in (cross, same):
        assert metrics["nmi_after"] >= metrics["nmi_before"] - 0.01


def test_a_pair_declared_cross_contrast_takes_the_contrast_independent_path_without_refinement():
    """--cross-contrast (a FLAIR reference onto the T1w template): the QC judges the pair by its
    mutual information even where the intensities rise together, and the one-contrast
    refinement steps are not run (the same result with 0 or 30 of them)."""
    from atlasflow.io.images import Image
    from atlasflow.registration.api import register_and_measure
    from atlasflow.registration.options import RegistrationOptions

    mask, t1, _ = _tissue_phantom()
    _, other, _ = _tissue_phantom(seed=5)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed, moving = Image(t1, affine), Image(np.sqrt(np.clip(other, 0, 1)), affine)  # rises with t1
    plain = register_and_measure(fixed, moving, RegistrationOptions(refine_steps=0)).metrics
    assert plain["same_contrast"] is True and "cross_contrast" not in plain
    results = [
        register_and_measure(
            fixed, moving, RegistrationOptions(cross_contrast=True, refine_steps=steps), fixed_mask=mask
        )
        for steps in (0, 30)
    ]
    for measured in results:
        assert measured.metrics["cross_contrast"] is True and measured.metrics["same_contrast"] is False
        assert measured.metrics["nmi_after"] >= measured.metrics["nmi_before"] - 0.01
    np.testing.assert_array_equal(results[0].warped.data, results[1].warped.data)
    # the flag reaches every registering command and reads back into the options
    from atlasflow.registration.options import RegistrationOptions as Options

    parser = __import__("argparse").ArgumentParser()
    Options.add_arguments(parser, "register")
    assert Options.from_args(parser.parse_args(["--cross-contrast"])).cross_contrast is True
    assert Options.from_args(parser.parse_args([])).cross_contrast is False
