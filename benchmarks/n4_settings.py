"""Bias correction scored on real scans with labels: atlasflow's N4 beside ANTs' N4, side by side.

Each IXI T1w of ``../shared/data/ixi10`` is taken as the workflow gets it (reoriented, its own
head mask, every 4th voxel for the estimate) and corrected by

- ``atlasflow IxL``: :func:`atlasflow.preprocess.n4.correct` with I iterations at each of L fitting
  levels (the workflow's ``bias_correct``; its default is
  :data:`atlasflow.preprocess.n4.N4_ITERATIONS`);
- ``ANTs IxL``: ``ants.n4_bias_field_correction`` with the same mask and shrink factor (ANTs'
  own default is 50x4; the workflow used ANTs at 25x4 before it had its own N4).

Scores, with the scan's MUSE labels:

- ``WM CoV``: coefficient of variation inside the cerebral white matter (labels 81-88), the usual
  measure of a remaining bias field (lower is better);
- ``lobe CoV``: spread of the mean white-matter intensity of the eight lobes: a slow field shows
  there first (lower is better);
- ``GM CoV``: the same inside the cortex (labels 100-207);
- ``WM/GM CNR``: (mean WM - mean cortical GM) / pooled standard deviation: a bias model fine enough
  to eat anatomy lowers the tissue contrast it should sharpen (higher is better);
- ``known field``: the scan is also multiplied by a known smooth field (a random sum of plane
  waves, 20 % standard deviation, like a 1.5 T head coil) and corrected again; the score is the
  root mean square, inside the head, of (log of the corrected scan / the corrected original). 0
  means the added field was removed entirely (lower is better);
- ``seconds``: one correction, one thread.

``--scans`` adds scans without labels (whole heads, thick slices, other contrasts), scored by the
known field and the time only.

    python benchmarks/n4_settings.py [--data ../shared/data/ixi10]
        [--settings atlasflow:30x4,atlasflow:25x4,ants:25x4,ants:50x4] [--scans F [F ...]]
        [--out benchmarks/results/n4_settings.md]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

WM = range(81, 89)
GM = range(100, 208)


def scores(image: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    wm = np.isin(labels, WM)
    gm = np.isin(labels, GM)
    lobes = np.array([image[labels == k].mean() for k in WM])
    pooled = np.sqrt(0.5 * (image[wm].var() + image[gm].var()))
    return {
        "WM CoV": float(image[wm].std() / image[wm].mean()),
        "lobe CoV": float(lobes.std() / lobes.mean()),
        "GM CoV": float(image[gm].std() / image[gm].mean()),
        "WM/GM CNR": float((image[wm].mean() - image[gm].mean()) / pooled),
    }


def parse_setting(text: str) -> tuple[str, tuple[int, ...]]:
    method, _, size = text.partition(":")
    iterations, levels = size.lower().split("x")
    return method, (int(iterations),) * int(levels)


def known_field(shape: tuple[int, ...], spacing: np.ndarray, seed: int) -> np.ndarray:
    """A smooth multiplicative field: exp of a sum of random plane waves, wavelengths 150-400 mm,
    normalised to a 0.2 standard deviation in the log domain."""
    from atlasflow.io.images import Grid
    from atlasflow.synth.fields import smooth_field

    grid = Grid(shape, np.diag([*spacing, 1.0]))
    log_field = smooth_field(np.random.default_rng(seed), grid, 1, (150.0, 400.0), 1.0, 6)[..., 0]
    log_field = (log_field - log_field.mean()) / max(float(log_field.std()), 1e-9) * 0.2
    return np.exp(log_field).astype(np.float32)


def run(method: str, iterations: tuple[int, ...], data: np.ndarray, mask: np.ndarray, spacing, shrink: int):
    if method == "atlasflow":
        from atlasflow.preprocess import n4

        return n4.correct(data, mask, spacing, iterations=iterations, shrink=shrink)
    import ants

    def image(values: np.ndarray):
        return ants.from_numpy(np.ascontiguousarray(values, np.float32), spacing=tuple(float(s) for s in spacing))

    out = ants.n4_bias_field_correction(
        image(data),
        mask=image(mask.astype(np.float32)),
        shrink_factor=shrink,
        convergence={"iters": list(iterations), "tol": 1e-7},
    )
    return out.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi10")
    )
    parser.add_argument("--settings", default="atlasflow:30x4,atlasflow:25x4,ants:25x4,ants:50x4")
    parser.add_argument("--scans", nargs="*", default=[], help="unlabelled scans: known field and time only")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    from atlasflow.io.images import load_image
    from atlasflow.preprocess import n4, steps

    data = Path(args.data)
    settings = ["none", *args.settings.split(",")]
    rows: dict[str, list[dict[str, float]]] = {s: [] for s in settings}
    for number, scan in enumerate(sorted((data / "t1w").glob("*.nii.gz"))):
        labels_path = data / "labels" / scan.name.replace(".nii.gz", "_DLMUSE.nii.gz")
        if not labels_path.exists():
            continue
        image = steps.to_ras(load_image(scan))
        labels = steps.to_ras(load_image(labels_path)).data.astype(int)
        mask = steps.head_mask(image)
        spacing = image.grid.spacing
        shrink = n4.shrink_factor(image.data.shape)
        field = known_field(image.data.shape, spacing, seed=number)
        inside = mask & (image.data > 0)
        for setting in settings:
            if setting == "none":
                out, biased, seconds = image.data.astype(np.float32), image.data * field, 0.0
            else:
                method, iterations = parse_setting(setting)
                start = time.perf_counter()
                out = run(method, iterations, image.data, mask, spacing, shrink)
                seconds = time.perf_counter() - start
                biased = run(method, iterations, image.data * field, mask, spacing, shrink)
            ratio = np.log(biased[inside] / out[inside])
            left = float(np.sqrt(np.mean((ratio - ratio.mean()) ** 2)))
            rows[setting].append({**scores(out, labels), "known field": left, "seconds": seconds})
        print(scan.name, " | ".join(f"{s} WM {rows[s][-1]['WM CoV']:.4f}" for s in settings), flush=True)

    columns = ["WM CoV", "lobe CoV", "GM CoV", "WM/GM CNR", "known field", "seconds"]
    lines = ["| bias correction | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for setting in settings:
        means = {c: np.mean([r[c] for r in rows[setting]]) for c in columns}
        lines.append(
            f"| {setting} | "
            + " | ".join(f"{means[c]:.4f}" if c != "seconds" else f"{means[c]:.2f}" for c in columns)
            + " |"
        )
    table = "\n".join(lines) + f"\n\n{len(rows['none'])} scans; means over scans.\n"
    if args.scans:
        table += "\n" + unlabelled(args.scans, settings[1:])
    print(table)
    if args.out:
        Path(args.out).write_text(table)


def unlabelled(paths: list[str], settings: list[str]) -> str:
    """Known-field score and seconds per scan and setting (markdown table)."""
    from atlasflow.io.images import load_image
    from atlasflow.preprocess import n4, steps

    lines = ["| scan | shape, mm | " + " | ".join(settings) + " |", "|---" * (len(settings) + 2) + "|"]
    for number, path in enumerate(paths):
        image = steps.to_ras(load_image(path))
        mask = steps.head_mask(image)
        spacing = image.grid.spacing
        shrink = n4.shrink_factor(image.data.shape)
        field = known_field(image.data.shape, spacing, seed=100 + number)
        inside = mask & (image.data > 0)
        cells = []
        for setting in settings:
            method, iterations = parse_setting(setting)
            start = time.perf_counter()
            out = run(method, iterations, image.data, mask, spacing, shrink)
            seconds = time.perf_counter() - start
            ratio = np.log(run(method, iterations, image.data * field, mask, spacing, shrink)[inside] / out[inside])
            cells.append(f"{np.sqrt(np.mean((ratio - ratio.mean()) ** 2)):.4f} ({seconds:.2f} s)")
        where = f"{'x'.join(map(str, image.data.shape))}, {'x'.join(f'{v:.2g}' for v in spacing)}"
        lines.append(f"| {Path(path).parent.name}/{Path(path).name} | {where} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "Unlabelled scans: known field left (seconds of one correction)\n\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
