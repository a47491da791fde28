"""Dice of IXI label maps between subjects registered through the template (foundation check).

Runs the workflow's template registration on the 10 IXI heads in ../shared/data/ixi10 (whole-head,
PSR orientation) through a manifest, then scores consecutive pairs of subjects by the mean Dice of
their DLMUSE labels in template space (labels present in both, background excluded).

    python benchmarks/ixi_template_dice.py --backend deep --out /tmp/ixi_bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from atlasflow.io.images import load_image
from atlasflow.registration.api import dice_per_label

REPO = Path(__file__).resolve().parents[1]
IXI = REPO.parent / "shared" / "data" / "ixi10"


def write_manifest(folder: Path) -> Path:
    rows = []
    for t1 in sorted((IXI / "t1w").glob("*.nii.gz")):
        labels = IXI / "labels" / t1.name.replace(".nii.gz", "_DLMUSE.nii.gz")
        rows.append(
            {
                "subject": t1.name.split("-")[0],
                "session": "1",
                "t1w": str(t1),
                "labels": str(labels),
            }
        )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="deep", choices=["deep", "ants"])
    parser.add_argument("--refine", type=int, default=0)
    parser.add_argument("--out", default="/tmp/atlasflow_ixi_bench")
    parser.add_argument("--cores", default="2")
    args = parser.parse_args()
    if not IXI.exists():
        print(f"{IXI} is absent: nothing to measure")
        return 0
    out = Path(args.out)
    manifest = write_manifest(out)
    config = out / "config.yaml"
    config.write_text(
        f"cohort: {manifest}\noutdir: {out / 'results'}\n"
        f"registration: {{backend: {args.backend}, refine_steps: {args.refine}}}\n"
    )
    table = pd.read_csv(manifest, dtype=str)
    targets = [
        str(
            out
            / "results"
            / f"sub-{s}"
            / "ses-1"
            / "anat"
            / f"sub-{s}_ses-1_space-template_dseg.nii.gz"
        )
        for s in table["subject"]
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        [
            str(Path(sys.executable).parent / "snakemake"),
            "-s",
            str(REPO / "Snakefile"),
            "--directory",
            str(out),
            "-c",
            args.cores,
            *targets,
            "--configfile",
            str(REPO / "config.yaml"),
            str(config),
        ],
        check=True,
        env=env,
        cwd=out,
    )
    rows = []
    for a, b in zip(table["subject"][:-1], table["subject"][1:], strict=True):
        la = load_image(
            out / "results" / f"sub-{a}/ses-1/anat/sub-{a}_ses-1_space-template_dseg.nii.gz",
            dtype=None,
        ).data
        lb = load_image(
            out / "results" / f"sub-{b}/ses-1/anat/sub-{b}_ses-1_space-template_dseg.nii.gz",
            dtype=None,
        ).data
        dice = dice_per_label(la, lb)
        rows.append({"pair": f"{a}-{b}", "mean_dice": float(np.mean(list(dice.values())))})
    seconds = [
        json.loads(
            (
                out
                / "results"
                / f"sub-{s}/ses-1/anat/sub-{s}_ses-1_from-T1w_to-template_mode-image_desc-qc_xfm.json"
            ).read_text()
        )["seconds"]
        for s in table["subject"]
    ]
    result = pd.DataFrame(rows)
    print(result.to_string(index=False))
    print(
        f"\nbackend={args.backend} refine={args.refine}: mean Dice through the template "
        f"{result['mean_dice'].mean():.3f} over {len(result)} pairs; median registration {np.median(seconds):.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
