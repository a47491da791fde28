"""The multi-contrast workflow on real MS patients (open_ms), scored against the authors.

Runs the workflow as a user would -- a manifest of the raw files (T1W, T2W, FLAIR of patient01's
two sessions and patient04's one; whole heads, 3-4 mm slices, LPS, uint16) and ``snakemake`` --
then scores what it wrote:

1. **Within-session alignment.** Each contrast's ``from-<C>_to-T1w`` transform against the
   authors' (``*_intrastudy_to_FLAIR.txt``): where the points of the T1W's brain land, mean and
   90th percentile distance in mm. Beside it, the scanner's own alignment (no registration) and
   ANTs rigid with Mattes mutual information on the same raw files, in the same run.
2. **Lesion change.** The absolute FLAIR difference map of patient01 (study2 -> study1, in
   baseline space) as a voxel-wise detector of the authors' lesion-change mask (``gt.nii.gz``,
   their common space), ROC AUC inside their brain mask, on the study1 FLAIR's grid. Beside it,
   the same map made with ANTs affine registration of the bias-corrected FLAIRs (Mattes MI),
   normalised the same way, in the same run -- on the FLAIR's own grid and passed through
   atlasflow's 2 mm baseline grid (the smoothing its grid brings).

    python benchmarks/open_ms_workflow.py [--data ../shared/data/open_ms] [--work /tmp/open_ms_workflow]
        [--results DIR]   # score an existing run instead of running the workflow
        [--bids]          # give the workflow a BIDS folder of the same files instead of a manifest
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from open_ms_points import read_itk_matrix, reference_map  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SESSIONS = [("p01", "1", "patient01", "study1"), ("p01", "2", "patient01", "study2"), ("p04", "1", "patient04", "study1")]
CONTRASTS = {"flair": ("FLAIR", "FLAIR"), "t2w": ("T2w", "T2W")}  # column: (atlasflow label, file name)


def write_manifest(data: Path, path: Path) -> None:
    rows = ["subject,session,t1w,t2w,flair,acq_date"]
    for subject, session, patient, study in SESSIONS:
        d = data / patient
        rows.append(
            f"{subject},{session},{d / f'{study}_T1W.nii.gz'},{d / f'{study}_T2W.nii.gz'},"
            f"{d / f'{study}_FLAIR.nii.gz'},201{session}-01-01"
        )
    path.write_text("\n".join(rows) + "\n")


def write_bids(data: Path, root: Path) -> None:
    """The same sessions as a BIDS folder of symbolic links (sub-p01/ses-1/anat/sub-p01_ses-1_T1w...)."""
    for subject, session, patient, study in SESSIONS:
        anat = root / f"sub-{subject}" / f"ses-{session}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        for suffix, name in (("T1w", "T1W"), ("T2w", "T2W"), ("FLAIR", "FLAIR")):
            link = anat / f"sub-{subject}_ses-{session}_{suffix}.nii.gz"
            if not link.exists():
                link.symlink_to(data / patient / f"{study}_{name}.nii.gz")
    (root / "sub-p01" / "sub-p01_sessions.tsv").write_text(
        "session_id\tacq_time\nses-1\t2011-01-01T00:00:00\nses-2\t2012-01-01T00:00:00\n"
    )
    (root / "dataset_description.json").write_text('{"Name": "open_ms subset", "BIDSVersion": "1.9.0"}\n')


def run_workflow(manifest: Path, results: Path, cores: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "snakemake", "-c", str(cores), "--configfile", str(REPO / "config.yaml"),
         "--config", f"cohort={manifest}", f"outdir={results}", "-d", str(results.parent / "run"), "-q"],
        cwd=REPO, check=True,
    )  # fmt: skip
    return time.perf_counter() - start


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by ranks (Mann-Whitney), ties shared."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def brain_points(image, mask: np.ndarray, step: int = 3) -> np.ndarray:
    idx = np.argwhere(mask)[::step]
    return idx @ image.affine[:3, :3].T + image.affine[:3, 3]


def point_errors(world: np.ndarray, truth: np.ndarray, points: np.ndarray) -> tuple[float, float]:
    a = points @ world[:3, :3].T + world[:3, 3]
    b = points @ truth[:3, :3].T + truth[:3, 3]
    d = np.linalg.norm(a - b, axis=1)
    return float(d.mean()), float(np.percentile(d, 90))


def ants_rigid(fixed_path: Path, moving_path: Path) -> np.ndarray:
    """ANTs rigid (Mattes MI) of the raw files: fixed world -> moving world (RAS)."""
    import ants

    from atlasflow.io.itk import read_itk_affine

    reg = ants.registration(ants.image_read(str(fixed_path)), ants.image_read(str(moving_path)), type_of_transform="Rigid")
    return read_itk_affine(reg["fwdtransforms"][0])


def score_alignment(data: Path, results: Path, methods: list[str]) -> list[dict]:
    from atlasflow import layout
    from atlasflow.contrasts.plan import ContrastFiles
    from atlasflow.io.images import load_image
    from atlasflow.io.itk import read_itk_affine

    files = ContrastFiles(str(results))
    rows = []
    for subject, session, patient, study in SESSIONS:
        folder = data / patient
        t1_path = folder / f"{study}_T1W.nii.gz"
        t1 = load_image(t1_path)
        mask_path = layout.anat(str(results), "mask", subject, session, desc="brain")
        from atlasflow.transforms import Transform, apply_transform

        mask = apply_transform(load_image(mask_path), Transform.identity(), t1.grid, "nearest").data > 0
        points = brain_points(t1, mask)
        for column, (_, file_label) in CONTRASTS.items():
            truth = reference_map(folder, f"{study}_T1W", f"{study}_{file_label}")
            found = {"none": np.eye(4), "atlasflow": read_itk_affine(files.session_affine(column, subject, session))}
            if "ants" in methods:
                found["ants"] = ants_rigid(t1_path, folder / f"{study}_{file_label}.nii.gz")
            for method, world in found.items():
                mean, p90 = point_errors(world, truth, points)
                rows.append({"case": f"{patient} {study} {file_label} -> T1W", "method": method, "mean": mean, "p90": p90})
                print(f"{rows[-1]['case']:34s} {method:10s} mean {mean:5.2f} mm  p90 {p90:5.2f} mm", flush=True)
    return rows


def _normalised(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    low, high = np.percentile(data[mask], [1, 99])
    return np.clip((data - low) / (high - low), 0, None) * mask


def ants_flair_difference(folder: Path, flair1, mask1: np.ndarray) -> np.ndarray:
    """|FLAIR2 - FLAIR1| on FLAIR1's grid with ANTs affine (Mattes MI) of the N4-corrected scans."""
    import ants

    from atlasflow.registration.api import from_ants

    f1 = ants.n4_bias_field_correction(ants.image_read(str(folder / "study1_FLAIR.nii.gz")))
    f2 = ants.n4_bias_field_correction(ants.image_read(str(folder / "study2_FLAIR.nii.gz")))
    reg = ants.registration(f1, f2, type_of_transform="Affine")
    # ANTs keeps the file's voxel order; the masks are on FLAIR1's grid reordered to RAS
    from atlasflow.transforms import Transform, apply_transform

    warped = apply_transform(from_ants(reg["warpedmovout"]), Transform.identity(), flair1.grid).data
    base = apply_transform(from_ants(f1), Transform.identity(), flair1.grid).data
    # the same normalisation as atlasflow's: brain percentiles 1-99 -> 0-1 (brain: authors' mask)
    return np.abs(_normalised(warped, mask1) - _normalised(base, mask1))


def score_lesion_change(data: Path, results: Path, methods: list[str]) -> list[dict]:
    from atlasflow.contrasts.plan import ContrastFiles
    from atlasflow.io.images import load_image
    from atlasflow.io.itk import read_itk_affine
    from atlasflow.preprocess.steps import to_ras
    from atlasflow.transforms import Transform, apply_transform

    folder = data / "patient01"
    flair1 = to_ras(load_image(folder / "study1_FLAIR.nii.gz"))
    common_to_flair1 = read_itk_matrix(folder / "study1_FLAIR_to_common_space.txt")
    to_common = Transform(np.linalg.inv(common_to_flair1))
    gt = apply_transform(load_image(folder / "gt.nii.gz"), to_common, flair1.grid, "nearest").data > 0
    brain = apply_transform(load_image(folder / "brainmask.nii.gz"), to_common, flair1.grid, "nearest").data > 0
    files = ContrastFiles(str(results))
    ours = load_image(files.difference("flair", "baseline", "p01", "2"))
    flair_to_t1 = np.linalg.inv(read_itk_affine(files.session_affine("flair", "p01", "1")))
    # the absolute map in baseline space (the product), resampled onto the evaluation grid
    ours_abs = ours.with_data(np.abs(ours.data))
    maps = {"atlasflow": apply_transform(ours_abs, Transform(flair_to_t1), flair1.grid, "linear").data}
    if "ants" in methods:
        ants_map = ants_flair_difference(folder, flair1, brain)
        maps["ants-affine"] = ants_map
        # the same map through atlasflow's 2 mm baseline grid and back (its grid's smoothing)
        grid = load_image(files.preproc("flair", "p01", "1")).grid
        on_grid = apply_transform(flair1.with_data(ants_map), Transform(np.linalg.inv(flair_to_t1)), grid, "linear")
        maps["ants-affine-2mm"] = apply_transform(on_grid, Transform(flair_to_t1), flair1.grid, "linear").data
    rows = []
    positive = gt[brain]
    print(f"lesion-change voxels {int(positive.sum())} of {int(brain.sum())} brain voxels (study1 FLAIR grid)")
    for method, values in maps.items():
        value = auc(values[brain], positive)
        rows.append({"method": method, "auc": value})
        print(f"FLAIR |difference| lesion-change AUC  {method:12s} {value:.4f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "open_ms")
    parser.add_argument("--work", type=Path, default=Path("/tmp/open_ms_workflow"))
    parser.add_argument("--results", type=Path, help="score this existing run's outputs")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--methods", default="ants", help="comparisons beside atlasflow: ants or ''")
    parser.add_argument("--bids", action="store_true", help="give the workflow a BIDS folder instead of a manifest")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    results = args.results
    if results is None:
        args.work.mkdir(parents=True, exist_ok=True)
        manifest = args.work / "manifest.csv"
        write_manifest(args.data, manifest)
        if args.bids:
            manifest = args.work / "bids"
            write_bids(args.data, manifest)
        results = args.work / "results"
        print(f"workflow: {run_workflow(manifest, results, args.cores):.0f} s wall, {args.cores} cores")
    score_alignment(args.data, results, methods)
    score_lesion_change(args.data, results, methods)


if __name__ == "__main__":
    main()
