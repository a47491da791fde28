"""Accuracy of registration model files on held-out synthetic pairs (networks only, no IXI).

Pairs come from the last ``--holdout`` SynthSeg label maps (never trained on with the default
``atlasflow train --holdout-maps 4``), drawn with seeds that training does not use, on the whole
80x96x80 2 mm grid: cross-subject pairs with T1-like contrast, cross-subject pairs with random
contrasts, one-map pairs (known displacement) and large-affine pairs. Scores: mean soft Dice over
the 16 label groups before/after the velocity network, and the affine network's mean point error
(voxels) beside that of the identity.

    python benchmarks/heldout_synthetic.py OLD.safetensors NEW.safetensors --cache-dir /tmp/af_cache
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    from atlasflow.nn.model_io import load_model
    from atlasflow.training.pairs import PairGenerator, build_label_set
    from atlasflow.training.train import (
        DEFAULT_LABEL_DIR,
        _affine_points,
        _split_label_set,
        affine_point_error,
        synthetic_dice,
    )

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="model files (.safetensors with sidecar)")
    p.add_argument("--label-dir", default=str(DEFAULT_LABEL_DIR))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--holdout", type=int, default=4)
    p.add_argument("--max-std", type=float, default=3.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not Path(args.label_dir).is_dir():
        print(f"{args.label_dir}: label maps not found", file=sys.stderr)
        return 1
    label_set = build_label_set(args.label_dir, args.cache_dir)
    _, held_out = _split_label_set(label_set, args.holdout)
    points = _affine_points(tuple(label_set.maps.shape[1:]))
    gen = PairGenerator(held_out, seed=4242, max_std=args.max_std, t1_probability=1.0)
    sets = {
        "one_map_T1": [gen.sample("same") for _ in range(6)],
        "cross_T1": [gen.sample("cross") for _ in range(12)],
    }
    affine = [gen.sample("affine") for _ in range(12)]
    other = PairGenerator(held_out, seed=4343, max_std=args.max_std, t1_probability=0.0)
    sets["cross_random_contrast"] = [other.sample("cross") for _ in range(6)]
    eye = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)[None]
    identity = np.mean(
        [(eye @ points - q["affine"] @ points).pow(2).sum(1).sqrt().mean().item() for q in affine]
    )
    print(f"affine point error of the identity: {identity:.2f} voxels")
    for path in args.models:
        model, _ = load_model(path)
        result = {name: synthetic_dice(model, pairs) for name, pairs in sets.items()}
        result["affine_point_error_vox"] = affine_point_error(model, affine, points)
        print(path, json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
