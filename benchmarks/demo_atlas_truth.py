"""How close each atlas iteration of a demo run is to the demo's true template.

The demo cohort is the true template warped by known random diffeomorphisms, so an atlas built
from it should approach that template (up to the cohort's mean deformation, which the unbiased
atlas keeps by design). For every `atlas/iter-{i}/template_T1w.nii.gz` of a finished run this prints
the normalised cross-correlation with the true template (resampled onto the atlas grid) inside the
true brain, next to the iteration's metrics; then the same for the final atlas of every contrast
(`atlas/atlas_T2w.nii.gz`, `atlas_FLAIR.nii.gz` against `truth/template_T2w.nii.gz`, ...).

    python benchmarks/demo_atlas_truth.py --results results --demo demo_data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from atlasflow.io.images import load_image
from atlasflow.registration.api import ncc
from atlasflow.transforms import Transform, apply_transform


def truth_correlations(results: Path, demo: Path) -> pd.DataFrame:
    truth = load_image(demo / "truth" / "template_T1w.nii.gz")
    truth_dseg = load_image(demo / "truth" / "template_dseg.nii.gz", dtype=None)
    rows = []
    iterations = sorted(results.glob("atlas/iter-*/template_T1w.nii.gz"), key=lambda p: int(p.parent.name[5:]))
    for path in iterations:
        atlas = load_image(path)
        on_grid = apply_transform(truth, Transform.identity(), atlas.grid, "linear")
        brain = apply_transform(truth_dseg, Transform.identity(), atlas.grid, "nearest").data > 0
        rows.append({"iteration": int(path.parent.name[5:]), "ncc_to_true_template": ncc(atlas.data, on_grid.data, brain)})
    frame = pd.DataFrame(rows)
    metrics_path = results / "atlas" / "metrics.tsv"
    if metrics_path.exists():
        frame = frame.merge(pd.read_csv(metrics_path, sep="\t"), on="iteration", how="left")
    return frame


def contrast_correlations(results: Path, demo: Path) -> pd.DataFrame:
    """The final atlas of each contrast the run made against the demo's true template of it."""
    truth_dseg = load_image(demo / "truth" / "template_dseg.nii.gz", dtype=None)
    rows = []
    for name in ("T1w", "T2w", "FLAIR"):
        atlas_path, truth_path = results / "atlas" / f"atlas_{name}.nii.gz", demo / "truth" / f"template_{name}.nii.gz"
        if not (atlas_path.exists() and truth_path.exists()):
            continue
        atlas = load_image(atlas_path)
        truth = apply_transform(load_image(truth_path), Transform.identity(), atlas.grid, "linear")
        brain = apply_transform(truth_dseg, Transform.identity(), atlas.grid, "nearest").data > 0
        rows.append({"contrast": name, "ncc_to_true_template": ncc(atlas.data, truth.data, brain)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results")
    p.add_argument("--demo", default="demo_data")
    args = p.parse_args(argv)
    frame = truth_correlations(Path(args.results), Path(args.demo))
    if frame.empty:
        print(f"no atlas iterations under {args.results}/atlas", file=sys.stderr)
        return 1
    cols = [c for c in ("iteration", "ncc_to_true_template", "mean_velocity_norm_mean_mm", "template_change_rms", "ncc_to_template_mean") if c in frame]
    print(frame[cols].to_markdown(index=False, floatfmt=".4f"))
    contrasts = contrast_correlations(Path(args.results), Path(args.demo))
    if not contrasts.empty:
        print()
        print(contrasts.to_markdown(index=False, floatfmt=".4f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
