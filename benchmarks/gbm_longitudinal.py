"""Longitudinal stage on the 5 real glioblastoma patients of ../shared/data/tumor_progression.

Writes a manifest (pre/post post-contrast T1, tumour masks, dates from supplementary.csv), runs the
workflow up to every patient's tumour table (preprocessing, follow-up -> baseline registration with
the tumours excluded, change maps), and prints one row per patient: normalised cross-correlation
outside the tumour with the identity, after affine alone and after the full registration, tumour
volumes, growth rate and response category; then the registration's (Jacobian) volume change of the
baseline tumour against the masks' change, with the table's agreement ratio and flag.

    python benchmarks/gbm_longitudinal.py [--backend deep|ants] [--refine-steps N] [--work DIR]
        [--true-spacing 0.9 0.9 5]

Headers of these scans say 1 mm isotropic while the true spacing is about 0.9x0.9x5 mm (see the data
README): volumes are in header mm^3, ratios between timepoints are valid. With ``--true-spacing``
the workflow gets copies (in the work folder) whose headers give these voxel sizes, as a user whose
files kept their headers has them; the brain finder cannot fit a template to a head squashed 5x.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tumor_progression"


def respaced(path: Path, spacing: list[float], folder: Path) -> Path:
    """A copy of ``path`` in ``folder`` whose header gives ``spacing`` mm voxels (axis directions and
    the first voxel's position kept)."""
    import nibabel as nib
    import numpy as np

    image = nib.load(path)
    affine = image.affine.copy()
    affine[:3, :3] = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0) * np.asarray(spacing)
    out = folder / f"{path.parent.name}_{path.name}"
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), out)
    return out


def write_manifest(work: Path, spacing: list[float] | None = None) -> Path:
    dates = {}
    with open(DATA / "supplementary.csv", newline="") as fh:
        for row in csv.DictReader(fh, skipinitialspace=True):
            dates[row["id"].strip()] = (row["initialDate"].strip(), row["endDate"].strip())
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["subject", "session", "t1w", "tumor_mask", "acq_date"])
        for patient in sorted(dates):
            for session, stem, date in (("pre", "Pre", dates[patient][0]), ("post", "Post", dates[patient][1])):
                folder = DATA / patient
                scan, mask = folder / f"{stem}_Scan_T1.nii.gz", folder / f"{stem}_Mask.nii.gz"
                if spacing:
                    scan, mask = (respaced(f, spacing, work / "data") for f in (scan, mask))
                out.writerow([f"gbm{patient}", session, scan, mask, date])
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["deep", "ants"], default="deep")
    p.add_argument("--refine-steps", type=int, default=None, help="default: the config's")
    p.add_argument("--work", default="/tmp/atlasflow_gbm")
    p.add_argument("--cores", default="2")
    p.add_argument("--true-spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="give the workflow copies with these voxel sizes")
    args = p.parse_args(argv)
    if not DATA.is_dir():
        print(f"{DATA} not found: nothing to benchmark", file=sys.stderr)
        return 1
    work = Path(args.work) / args.backend
    work.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(work, args.true_spacing)
    out = work / "results"
    patients = [f"gbm{p.name}" for p in sorted(DATA.iterdir()) if p.is_dir()]
    targets = [str(out / f"sub-{s}" / "longitudinal" / f"sub-{s}_tumor.tsv") for s in patients]
    registration = {"backend": args.backend}
    if args.refine_steps is not None:
        registration["refine_steps"] = args.refine_steps
    configfile = work / "config.yaml"
    configfile.write_text(json.dumps({"cohort": str(manifest), "outdir": str(out), "registration": registration}))
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(ROOT),
           "--cores", args.cores, "--configfile", str(configfile), "--", *targets]
    # Rules call the `atlasflow` console command: the interpreter's own bin folder must be on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - start
    print(f"\nbackend {args.backend}, wall time {wall:.0f} s (cached jobs not rerun)\n")
    print("| patient | NCC outside tumour: identity | affine | registered | folding % | pre mm3 | post mm3 | change % | growth mm3/day | category |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    jacobian_rows = []
    for s in patients:
        qc = json.loads(next((out / f"sub-{s}" / "ses-post" / "anat").glob("*to-baseline*desc-qc_xfm.json")).read_text())
        with open(out / f"sub-{s}" / "longitudinal" / f"sub-{s}_tumor.tsv", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        pre, post = rows[0], rows[-1]
        print(
            f"| {s} | {qc.get('ncc_outside_tumor_before', qc['ncc_before']):.3f} | {qc['ncc_outside_tumor_affine']:.3f} "
            f"| {qc['ncc_outside_tumor_after']:.3f} | {100 * qc['folding_fraction']:.4f} | {pre['volume_mm3']} "
            f"| {post['volume_mm3']} | {post.get('change_from_baseline_pct', '')} | {post.get('growth_rate_mm3_per_day', '')} "
            f"| {post.get('response', '')} |"
        )
        jacobian_rows.append(
            f"| {s} | {float(pre['volume_mm3']) / 1000:.3f} | {float(post['volume_mm3']) / 1000:.3f} "
            f"| {post.get('response_compartment', '')} | {_num(post.get('change_from_baseline_pct'))} "
            f"| {_num(post.get('jacobian_volume_change_pct'))} | {_num(post.get('jacobian_mask_agreement'), '.2f')} "
            f"| {post.get('jacobian_mask_flag', '')} |"
        )
    print("\nJacobian volume change against the masks' (whole tumour; the masks are binary)\n")
    print("| patient | pre ml | post ml | judged on | mask change % | Jacobian change % | Jacobian / mask | flag |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(jacobian_rows))
    return 0


def _num(value: str | None, spec: str = "+.1f") -> str:
    return format(float(value), spec) if value not in (None, "") else ""


if __name__ == "__main__":
    sys.exit(main())
