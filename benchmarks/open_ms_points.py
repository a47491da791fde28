"""Real multi-contrast registration scored against the dataset authors' transforms (open_ms).

``../shared/data/open_ms/patient01`` holds two sessions of T1W, T2W and FLAIR (whole heads,
0.5-0.72 mm in plane, 3-4 mm slices, LPS, uint16) and the authors' ITK affines: each session's
T1W and T2W to its FLAIR (``*_intrastudy_to_FLAIR.txt``, FLAIR points -> T1W/T2W points) and each
FLAIR to one common space (``*_FLAIR_to_common_space.txt``, common points -> FLAIR points). A
fixed point's reference position in the moving scan follows by composing them.

Score: where the points of the fixed head (voxels above the head threshold, every 4th) land,
compared with where the authors' transforms put them: mean and 90th percentile distance in mm.
Beside atlasflow, in the same run: no registration (world coordinates as the headers give them)
and ANTs affine with mutual information (antspyx ``Affine``, Mattes MI). The inputs are the raw
files as a user has them: no masks, no preprocessing. ``atlasflow`` is the engine given the raw
scans (it finds the heads); ``atlasflow-cli`` is ``atlasflow register`` as typed, which first finds
each scan's brain through the template (its seconds include that). ``atlasflow-affine`` and
``atlasflow-cli-affine`` are the same with ``--affine-only``: where they score as their full
methods, the deformation was left out (``deformation_helps``) and only the affine counts.

    python benchmarks/open_ms_points.py [--data ../shared/data/open_ms] [--methods none,atlasflow,ants]
        [--refine N]   # the atlasflow methods' refinement steps (``atlasflow register --refine``)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])

# (patient, fixed, moving) as session_contrast names
CASES = [
    ("patient01", "study1_FLAIR", "study2_FLAIR"),
    ("patient01", "study1_T1W", "study2_FLAIR"),
    ("patient01", "study1_T1W", "study2_T2W"),
    ("patient01", "study1_FLAIR", "study1_T1W"),
    ("patient01", "study1_FLAIR", "study1_T2W"),
    ("patient04", "study1_FLAIR", "study1_T2W"),
]


def read_itk_matrix(path: Path) -> np.ndarray:
    """An ITK MatrixOffsetTransform text file as a 4x4 RAS map (fixed points -> moving points)."""
    fields = dict(
        line.split(":", 1)
        for line in path.read_text().splitlines()
        if ":" in line and not line.startswith("#")
    )
    params = np.array(fields["Parameters"].split(), float)
    centre = np.array(fields["FixedParameters"].split(), float)
    matrix = params[:9].reshape(3, 3)
    offset = params[9:12] + centre - matrix @ centre
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = offset
    return FLIP @ lps @ FLIP


def to_flair(folder: Path, scan: str) -> np.ndarray:
    """Map of points of ``scan``'s session FLAIR -> points of ``scan`` (identity for the FLAIR)."""
    session, contrast = scan.split("_")
    if contrast == "FLAIR":
        return np.eye(4)
    return read_itk_matrix(folder / f"{session}_{contrast}_intrastudy_to_FLAIR.txt")


def reference_map(folder: Path, fixed: str, moving: str) -> np.ndarray:
    """Fixed world points -> moving world points, by the authors' transforms (RAS mm)."""
    fs, ms = fixed.split("_")[0], moving.split("_")[0]
    common_to_fixed_flair = read_itk_matrix(folder / f"{fs}_FLAIR_to_common_space.txt")
    common_to_moving_flair = read_itk_matrix(folder / f"{ms}_FLAIR_to_common_space.txt")
    fixed_to_flair = np.linalg.inv(to_flair(folder, fixed))
    return (
        to_flair(folder, moving)
        @ common_to_moving_flair
        @ np.linalg.inv(common_to_fixed_flair)
        @ fixed_to_flair
    )


def head_points(image, step: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """World coordinates (N, 3) and voxel indices of the fixed head's voxels (every ``step``-th)."""
    data = image.data
    threshold = 0.1 * np.percentile(data[data > 0], 99) if np.any(data > 0) else 0
    idx = np.argwhere(data > threshold)[::step]
    world = idx @ image.affine[:3, :3].T + image.affine[:3, 3]
    return world, idx


def mapped_points(transform, fixed, world: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Where atlasflow's transform (x_m = A (x + u(x))) sends the fixed points."""
    x = world.copy()
    if transform.displacement is not None:
        x = x + transform.displacement.data[idx[:, 0], idx[:, 1], idx[:, 2]]
    return x @ transform.affine[:3, :3].T + transform.affine[:3, 3]


def errors(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.linalg.norm(a - b, axis=1)
    return float(d.mean()), float(np.percentile(d, 90))


def run_case(
    folder: Path, fixed_name: str, moving_name: str, methods: list[str], refine: int = 0
) -> list[dict]:
    from atlasflow.io.images import load_image
    from atlasflow.registration.api import register

    fixed = load_image(folder / f"{fixed_name}.nii.gz")
    moving = load_image(folder / f"{moving_name}.nii.gz")
    world, idx = head_points(fixed)
    ref = (
        world @ reference_map(folder, fixed_name, moving_name)[:3, :3].T
        + reference_map(folder, fixed_name, moving_name)[:3, 3]
    )
    rows = []
    for method in methods:
        start = time.perf_counter()
        if method == "none":
            moved = world
            seconds = 0.0
        elif method in ("atlasflow", "atlasflow-affine"):
            reg = register(
                fixed,
                moving,
                backend="deep",
                affine_only=method.endswith("affine"),
                refine_steps=refine,
            )
            seconds = reg.seconds
            moved = mapped_points(reg.transform, fixed, world, idx)
        elif method in ("atlasflow-cli", "atlasflow-cli-affine"):
            # `atlasflow register --fixed F --moving M` as typed: each scan's brain found through
            # the template (the command's default), then the engine's default path
            import tempfile

            from atlasflow.io.itk import load_transform
            from atlasflow.preprocess.reference import find_brain
            from atlasflow.registration.api import RegisterOutputs, register_files

            with tempfile.TemporaryDirectory() as tmp:
                out = RegisterOutputs.in_dir(tmp)
                metrics = register_files(
                    folder / f"{fixed_name}.nii.gz",
                    folder / f"{moving_name}.nii.gz",
                    out,
                    find_mask=find_brain,
                    refine_steps=refine,
                    affine_only=method.endswith("affine"),
                )
                transform = load_transform(out.affine, out.warp)
            seconds = metrics["seconds"] + metrics.get("brain_mask_seconds", 0.0)
            moved = mapped_points(transform, fixed, world, idx)
        elif method.startswith("ants"):
            kind = "Affine" if method == "ants" else method.split(":", 1)[1]
            reg = register(fixed, moving, backend="ants", ants_type=kind)
            seconds = time.perf_counter() - start
            moved = mapped_points(reg.transform, fixed, world, idx)
        else:
            raise SystemExit(f"unknown method {method}")
        mean, p90 = errors(moved, ref)
        rows.append(
            {
                "case": f"{folder.name} {moving_name} -> {fixed_name}",
                "method": method,
                "mean": mean,
                "p90": p90,
                "seconds": seconds,
            }
        )
        print(
            f"{rows[-1]['case']:45s} {method:10s} mean {mean:6.2f} mm  p90 {p90:6.2f} mm  {seconds:6.1f} s",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "open_ms")
    )
    parser.add_argument("--methods", default="none,atlasflow,ants")
    parser.add_argument(
        "--cases", default="", help="comma-separated case numbers (1-based); default all"
    )
    parser.add_argument(
        "--refine", type=int, default=0, help="refinement steps of the atlasflow methods"
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    chosen = [CASES[int(i) - 1] for i in args.cases.split(",")] if args.cases else CASES
    rows = []
    for patient, fixed, moving in chosen:
        rows += run_case(
            Path(args.data) / patient, fixed, moving, args.methods.split(","), args.refine
        )
    lines = ["| case | method | mean mm | p90 mm | seconds |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['case']} | {r['method']} | {r['mean']:.2f} | {r['p90']:.2f} | {r['seconds']:.1f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
