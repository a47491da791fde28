"""Why raw IXI inputs score differently from preprocessed ones: one factor at a time.

For each consecutive ixi10 pair, the deep engine (no refinement) runs on:

* ``P``: the preprocessed pair (label-mask dilated by 2 voxels, [0, 1] inside it), masks given:
  the engine's own path (centres of mass, deep affine, test-time LNCC affine);
* ``P-mi``: the same images and masks through the raw-input path
  (:func:`atlasflow.registration.engine._register_prepared`: mutual-information initial
  alignment, the deformation kept only when it raises NMI);
* ``R``: the raw files, no masks (what ``atlasflow register --fixed F --moving M`` does);
* ``R+brain``: the raw files with the dilated label masks given as mask files;
* ``P@R-affine``: preprocessed images, started from R's affine (no affine steps): R's alignment,
  brain-only images;
* ``R@P-affine``: raw heads as the engine prepares them (its own head mask), started from P's
  affine: P's alignment, whole-head images.

Printed per pair and averaged: mean Dice of the full transform and of its affine alone, and whether
the deformation was dropped.

    PYTHONPATH=src python benchmarks/diag_raw_inputs.py --data ../shared/data/ixi10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_register import evaluate, load_subject  # noqa: E402

from atlasflow.io.images import load_image  # noqa: E402
from atlasflow.registration.api import register  # noqa: E402
from atlasflow.registration.engine import _register_prepared, get_model, register_deep  # noqa: E402
from atlasflow.registration.inputs import prepare  # noqa: E402
from atlasflow.registration.options import RegistrationOptions  # noqa: E402
from atlasflow.transforms import Transform  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data/ixi10")
    p.add_argument("--pairs", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(1)
    data = Path(args.data)
    t1s = sorted((data / "t1w").glob("*.nii.gz"))
    labels = sorted((data / "labels").glob("*.nii.gz"))
    subjects = [load_subject(t, lab) for t, lab in zip(t1s, labels, strict=True)]
    raws = [load_image(t) for t in t1s]
    get_model(None)
    opts = RegistrationOptions()
    names = ["P", "P-mi", "R", "R+brain", "P@R-affine", "R@P-affine"]
    scores = {n: [] for n in names}
    for i in range(min(args.pairs, len(subjects) - 1)):
        (pf, fl, fm, _), (pm, ml, mm, _) = subjects[i], subjects[i + 1]
        rf, rm = raws[i], raws[i + 1]
        res = {}
        res["P"] = register_deep(pf, pm, opts, fixed_mask=fm, moving_mask=mm).transform
        masks = dict(
            fixed_mask=fm, moving_mask=mm, cost_mask=None, fixed_labels=None, moving_labels=None
        )
        res["P-mi"] = _register_prepared(pf, pm, opts, masks, None, None).transform
        res["R"] = register(rf, rm, opts).transform
        res["R+brain"] = register(rf, rm, opts, fixed_mask=fm, moving_mask=mm).transform
        res["P@R-affine"] = register_deep(
            pf,
            pm,
            opts,
            fixed_mask=fm,
            moving_mask=mm,
            init_affine=res["R"].affine,
            affine_network=False,
            affine_steps=0,
        ).transform
        qf, qm = prepare(rf), prepare(rm)
        res["R@P-affine"] = register_deep(
            qf.image,
            qm.image,
            opts,
            fixed_mask=qf.mask,
            moving_mask=qm.mask,
            init_affine=res["P"].affine,
            affine_network=False,
            affine_steps=0,
        ).transform
        line = [f"pair {i}-{i + 1}"]
        for n in names:
            t = res[n]
            full, _ = evaluate(t, fl, ml, fm)
            zero = t.displacement.with_data(np.zeros_like(t.displacement.data))
            aff, _ = evaluate(Transform(t.affine, zero), fl, ml, fm)
            dropped = not np.any(t.displacement.data)
            scores[n].append((full, aff, dropped))
            line.append(f"{n} {full:.3f}/{aff:.3f}{' (affine kept)' if dropped else ''}")
        print("  ".join(line), flush=True)
    print(
        "\n| variant | mean Dice (deep, no refinement) | mean Dice (its affine alone) | deformations dropped |"
    )
    print("|---|---|---|---|")
    for n in names:
        v = np.array(scores[n], float)
        print(f"| {n} | {v[:, 0].mean():.3f} | {v[:, 1].mean():.3f} | {int(v[:, 2].sum())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
