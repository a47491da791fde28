"""Raw IXI pairs with brain masks from the workflow's template path (no labels): how good are the
masks (:func:`atlasflow.preprocess.steps.brain_mask` with nilearn's MNI152: the template fixed, the
raw head moving, no N4) and what the deep engine (no refinement) scores with them as mask files.
Companion of diag_raw_inputs.py; results in benchmarks/results/register_raw_v1.md.

    PYTHONPATH=src python benchmarks/diag_template_mask.py ../shared/data/ixi10
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_register import evaluate, load_subject  # noqa: E402

from atlasflow.io.images import load_image  # noqa: E402
from atlasflow.preprocess.reference import load_mni152  # noqa: E402
from atlasflow.preprocess.steps import brain_mask  # noqa: E402
from atlasflow.registration.api import register  # noqa: E402
from atlasflow.registration.engine import get_model  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    data = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/ixi10")
    t1s = sorted((data / "t1w").glob("*.nii.gz"))
    labels = sorted((data / "labels").glob("*.nii.gz"))
    subjects = [load_subject(t, lab) for t, lab in zip(t1s, labels, strict=True)]
    template, template_mask = load_mni152()
    get_model(None)
    masks = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, t1 in enumerate(t1s):
            start = time.perf_counter()
            out = Path(tmp) / f"mask{i}.nii.gz"
            mask = brain_mask(t1, out, template=template, template_mask=template_mask).data > 0
            ref, brain = subjects[i][2], subjects[i][1].data > 0
            print(
                f"subject {i} template mask {time.perf_counter() - start:.1f}s, Dice vs dilated "
                f"labels {2 * (mask & ref).sum() / (mask.sum() + ref.sum()):.3f}, labels covered "
                f"{(mask & brain).sum() / brain.sum():.3f}",
                flush=True,
            )
            masks.append(mask)
    raws = [load_image(t) for t in t1s]
    scores = []
    for i in range(len(t1s) - 1):
        reg = register(raws[i], raws[i + 1], fixed_mask=masks[i], moving_mask=masks[i + 1])
        dice, _ = evaluate(reg.transform, subjects[i][1], subjects[i + 1][1], subjects[i][2])
        scores.append(dice)
        print(f"pair {i}-{i + 1} raw + template masks, deep: Dice {dice:.3f} ({reg.seconds:.1f}s)")
    print(f"mean Dice {np.mean(scores):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
