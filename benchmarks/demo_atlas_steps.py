"""Shape-update settings on the demo cohort: how close each atlas iteration gets to the true template.

Reruns the atlas iterations in one process, from a finished demo run's iteration 0 and member
affines (`atlas/iter-0/`), once per setting (gradient step, sharpening, refinement steps), and prints
per iteration the NCC of the template with the demo's true template (inside the true brain), the
mean velocity norm and the velocity bias ratio. The demo's control subjects are the true template
warped by velocity fields centred on their mean, so the true template is the members' centre.

    python benchmarks/demo_atlas_steps.py --results R --demo D [--steps 0.25 1.0] [--sharpen yes|no|both]
        [--refine 0 30] [--carry yes|no|both] [--iterations 4]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from atlasflow.atlas import build as atlas
from atlasflow.io.images import load_image
from atlasflow.registration.api import ncc
from atlasflow.transforms import Transform, apply_transform


def members(results: Path) -> list[atlas.Member]:
    """The atlas members of a finished run: every subject with an iteration-0 affine."""
    out = []
    for affine in sorted((results / "atlas" / "iter-0" / "affines").glob("*.mat")):
        scan = affine.name.split("_from-")[0]
        subject, session = scan.split("_")
        anat = results / subject / session / "anat"
        out.append(atlas.Member(scan, str(anat / f"{scan}_desc-preproc_T1w.nii.gz"), str(anat / f"{scan}_desc-brain_mask.nii.gz"), str(affine)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--demo", type=Path, required=True)
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--steps", type=float, nargs="+", default=[0.25, 1.0])
    p.add_argument("--sharpen", choices=["yes", "no", "both"], default="yes")
    p.add_argument("--refine", type=int, nargs="+", default=[0])
    p.add_argument("--carry", choices=["yes", "no", "both"], default="yes", help="carried velocities (atlas.carry_velocity)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    truth = load_image(args.demo / "truth" / "template_T1w.nii.gz")
    truth_dseg = load_image(args.demo / "truth" / "template_dseg.nii.gz", dtype=None)
    start = args.results / "atlas" / "iter-0" / "template_T1w.nii.gz"
    grid = load_image(start).grid
    truth_on_grid = apply_transform(truth, Transform.identity(), grid, "linear").data
    brain = apply_transform(truth_dseg, Transform.identity(), grid, "nearest").data > 0
    mask = args.results / "template" / "template_desc-brain_mask.nii.gz"
    cohort = members(args.results)
    yes_no = {"yes": [True], "no": [False], "both": [True, False]}
    print(
        "| gradient step | sharpen | refine | carry | NCC to the true template, iterations 0..N "
        "| mean velocity norm mm | bias ratio | members' NCC to their template |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for step, sharp, refine, carry in itertools.product(args.steps, yes_no[args.sharpen], args.refine, yes_no[args.carry]):
        previous = start
        scores, norms, ratios, members_ncc = [ncc(load_image(start).data, truth_on_grid, brain)], [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            members_i, mean_velocity = cohort, None
            for i in range(1, args.iterations + 1):
                out = Path(tmp) / f"iter-{i}"
                velocities = [out / f"{m.name}_velocity.nii" for m in cohort] if carry else None
                metrics = atlas.run_iteration(
                    members_i, previous, mask, out / "t.nii.gz", out / "m.json", out / "members.tsv",
                    options={"backend": "deep", "refine_steps": refine, "affine_steps": 0}, iteration=i,
                    gradient_step=step, do_sharpen=sharp, workers=args.workers,
                    previous_mean_velocity=mean_velocity, out_velocities=velocities,
                    out_mean_velocity=out / "mean_velocity.nii" if carry else None,
                )
                if carry:
                    members_i = [replace(m, velocity=str(v)) for m, v in zip(cohort, velocities, strict=True)]
                    mean_velocity = out / "mean_velocity.nii"
                previous = out / "t.nii.gz"
                scores.append(ncc(load_image(previous).data, truth_on_grid, brain))
                norms.append(metrics["mean_velocity_norm_mean_mm"])
                ratios.append(metrics["velocity_bias_ratio"])
                members_ncc.append(metrics["ncc_to_template_mean"])
        print(
            f"| {step:g} | {'yes' if sharp else 'no'} | {refine} | {'yes' if carry else 'no'} | "
            f"{' -> '.join(f'{s:.4f}' for s in scores)} | {' -> '.join(f'{n:.3f}' for n in norms)} | "
            f"{' -> '.join(f'{r:.2f}' for r in ratios)} | {' -> '.join(f'{r:.3f}' for r in members_ncc)} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
