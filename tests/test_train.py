"""Training loop, synthetic pairs and the model file format (safetensors + checked sidecar)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from factories import blob_image, tiny_net_config, write_label_maps

from atlasflow.cli.main import main as cli_main
from atlasflow.errors import AtlasflowError
from atlasflow.nn import NetConfig, RegistrationModel
from atlasflow.nn.model_io import load_model, save_model, sidecar_path
from atlasflow.training.pairs import NUM_CLASSES, PairGenerator, build_label_set, group_of
from atlasflow.training.train import TrainSettings, train

TINY = tiny_net_config()


def test_group_table():
    assert group_of(0) == 0 and group_of(502) == 0
    assert group_of(2) == group_of(41) == 1
    assert group_of(3) == group_of(42) == 2
    assert all(0 <= group_of(v) < NUM_CLASSES for v in range(0, 600))


def test_pair_generator_shapes_ranges_and_determinism(tmp_path):
    label_set = build_label_set(
        write_label_maps(tmp_path / "maps"), tmp_path / "cache", shape=(32, 32, 32)
    )
    assert label_set.maps.shape == (2, 32, 32, 32)
    a = PairGenerator(label_set, seed=3).sample("cross")
    b = PairGenerator(label_set, seed=3).sample("cross")
    assert torch.equal(a["fixed"], b["fixed"]) and torch.equal(a["moving"], b["moving"])
    assert a["fixed"].shape == (1, 1, 32, 32, 32)
    assert a["fixed_onehot"].shape == (1, NUM_CLASSES, 32, 32, 32)
    assert torch.allclose(a["fixed_onehot"].sum(1), torch.ones(1, 32, 32, 32))
    assert 0.0 <= a["fixed"].min() and a["fixed"].max() <= 1.0
    assert (a["fixed"][a["fixed_mask"] == 0] == 0).all()
    affine = PairGenerator(label_set, seed=3).sample("affine")
    assert affine["affine"].shape == (1, 3, 4)
    crop = PairGenerator(label_set, seed=3, crop=(16, 16, 16)).sample("same")
    assert crop["moving"].shape == (1, 1, 16, 16, 16)


def test_weights_round_trip_and_tampering(tmp_path):
    torch.manual_seed(0)
    model = RegistrationModel(TINY)
    path = save_model(model, tmp_path / "m.safetensors", {"note": "test"})
    loaded, meta = load_model(path)
    assert meta["hyper"]["note"] == "test"
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval().flow(x), loaded.flow(x))

    raw = path.read_bytes()
    flipped = bytearray(raw)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(AtlasflowError, match="SHA-256"):
        load_model(path)
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AtlasflowError, match="truncated"):
        load_model(path)
    # A consistent sidecar does not make a garbage file loadable.
    path.write_bytes(b"not safetensors at all")
    meta["bytes"] = path.stat().st_size
    import hashlib

    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(AtlasflowError, match="safetensors"):
        load_model(path)
    sidecar_path(path).unlink()
    with pytest.raises(AtlasflowError, match="sidecar"):
        load_model(path)


def test_version_1_files_still_load(tmp_path):
    """Files written before the keypoint affine / correlation features load as what they were."""
    torch.manual_seed(0)
    old_config = NetConfig(
        unet_encoder=[8, 8, 8, 8],
        unet_decoder=[8, 8, 8, 8],
        affine_channels=[4, 8, 8, 8, 8],
        affine_kind="pooled",
        cost_radius=0,
    )
    path = save_model(RegistrationModel(old_config), tmp_path / "old.safetensors")
    meta = json.loads(sidecar_path(path).read_text())
    meta["format"] = "atlasflow-registration-v1"
    for key in ("affine_kind", "affine_keypoints", "cost_radius"):
        del meta["config"][key]
    sidecar_path(path).write_text(json.dumps(meta))
    model, _ = load_model(path)
    assert model.config.affine_kind == "pooled" and model.config.cost_radius == 0
    meta["config"]["affine_kind"] = "transformer"
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(AtlasflowError, match="unknown architecture"):
        load_model(path)


def _dice_loss_on(model, pairs):
    from atlasflow.nn.layers import warp_tensor
    from atlasflow.nn.losses import soft_dice_loss
    from atlasflow.training.train import flow_forward

    with torch.no_grad():
        losses = []
        for pair in pairs:
            _, disp = flow_forward(model, pair["fixed"], pair["moving"])
            losses.append(
                soft_dice_loss(
                    pair["fixed_onehot"], warp_tensor(pair["moving_onehot"], disp)
                ).item()
            )
    return float(np.mean(losses))


def test_tiny_training_run_reduces_the_loss(tmp_path, capsys):
    maps = write_label_maps(tmp_path / "maps")
    out = tmp_path / "model.safetensors"
    torch.manual_seed(0)
    settings = TrainSettings(
        label_dir=maps,
        cache_dir=tmp_path / "cache",
        affine_steps=2,
        flow_steps=150,
        lr=1e-3,
        train_shape=(32, 32, 32),
        log_every=10,
        checkpoint_every=20,
        threads=1,
        seed=0,
    )
    train(out, settings, config=TINY)
    log = capsys.readouterr().out
    assert "flow step 150/150" in log and "seconds" in log and "dice_loss" in log
    label_set = build_label_set(maps, tmp_path / "cache", shape=(32, 32, 32))
    generator = PairGenerator(label_set, seed=99)
    # Cross-subject pairs: the case the networks are for (their shapes differ, no exact answer).
    pairs = [generator.sample("cross") for _ in range(4)]
    trained, meta = load_model(out)
    untrained = RegistrationModel(TINY).eval()
    assert meta["hyper"]["completed_flow_steps"] == 150
    assert _dice_loss_on(trained, pairs) < _dice_loss_on(untrained, pairs) - 0.002


def test_train_main_reports_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"garbage")
    code = cli_main(
        [
            "train",
            "--out",
            str(tmp_path / "m.safetensors"),
            "--label-dir",
            str(tmp_path),
            "--flow-steps",
            "1",
            "--affine-steps",
            "0",
        ]
    )
    assert code == 1
    assert "bad.nii.gz" in capsys.readouterr().err


def test_finetune_runs_on_a_tiny_cohort(tmp_path, capsys):
    from atlasflow.io.images import save_image

    torch.manual_seed(0)
    base = save_model(RegistrationModel(TINY), tmp_path / "base.safetensors")
    paths = []
    for k in range(2):
        path = tmp_path / f"img{k}.nii.gz"
        save_image(blob_image(shape=(20, 24, 18), seed=k), path)
        paths.append(str(path))
    out = tmp_path / "tuned.safetensors"
    code = cli_main(
        [
            "finetune",
            "--images",
            *paths,
            "--init",
            str(base),
            "--out",
            str(out),
            "--steps",
            "3",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    assert "finetune step 1/3" in capsys.readouterr().out
    tuned, meta = load_model(out)
    assert meta["hyper"]["steps"] == 3
    # Against a given fixed image with its own mask (the workflow's atlas_finetune rule).
    fixed_mask = tmp_path / "fixed_mask.nii.gz"
    save_image(blob_image(shape=(20, 24, 18), seed=0).with_data(np.ones((20, 24, 18), np.uint8)), fixed_mask)
    args = ["--images", *paths, "--fixed", paths[0], "--init", str(base), "--out", str(out), "--steps", "2", "--threads", "1"]
    assert cli_main(["finetune", *args, "--fixed-mask", str(fixed_mask)]) == 0
    wrong = tmp_path / "wrong_mask.nii.gz"
    save_image(blob_image(shape=(8, 8, 8)), wrong)
    assert cli_main(["finetune", *args, "--fixed-mask", str(wrong)]) == 1
    err = capsys.readouterr().err
    assert "wrong_mask.nii.gz: mask grid" in err, err
    assert (
        cli_main(
            ["finetune", "--images", str(tmp_path / "missing.nii.gz"), "--init", str(base), "--out", str(out)]
        )
        == 1
    )
