"""How much N4 the preprocessing needs: bias-correction settings scored on real scans with labels.

The preprocessing's ``bias_correct`` (:func:`atlasflow.preprocess.steps.bias_correct`: N4 on a
grid shrunk 4x, :data:`~atlasflow.preprocess.steps.N4_ITERATIONS` iterations per fitting level,
one level per entry) is run on each IXI T1w of ``../shared/data/ixi10`` as the workflow gets it
(reoriented, its own head mask), with each setting in turn, and scored with the scan's MUSE labels:

- ``WM CoV``: coefficient of variation of the intensities inside the cerebral white matter
  (labels 81-88), the usual measure of a remaining bias field (lower is better);
- ``lobe CoV``: spread of the mean white-matter intensity of the eight lobes (left/right
  frontal, occipital, parietal, temporal): a slow field shows there first (lower is better);
- ``GM CoV``: the same inside the cortex (labels 100-207);
- ``WM/GM CNR``: (mean WM - mean cortical GM) / pooled standard deviation: a bias model fine
  enough to eat anatomy would lower the tissue contrast it should sharpen (higher is better);
- ``seconds``: N4 alone, one thread.

    python benchmarks/n4_settings.py [--data ../shared/data/ixi10] [--settings 25x4,50x4,25x5,15x4]
        [--out benchmarks/results/n4_settings.md]
"""

from __future__ import annotations

import argparse
import os
import tempfile
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


def parse_setting(text: str) -> tuple[int, ...]:
    iterations, levels = text.lower().split("x")
    return (int(iterations),) * int(levels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi10")
    )
    parser.add_argument("--settings", default="25x4,50x4,25x5,15x4")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    from atlasflow.io.images import load_image, save_image
    from atlasflow.preprocess import steps

    data = Path(args.data)
    settings = ["none", *args.settings.split(",")]
    rows: dict[str, list[dict[str, float]]] = {s: [] for s in settings}
    for scan in sorted((data / "t1w").glob("*.nii.gz")):
        labels_path = data / "labels" / scan.name.replace(".nii.gz", "_DLMUSE.nii.gz")
        if not labels_path.exists():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            reoriented = Path(tmp) / "in.nii.gz"
            image = steps.to_ras(load_image(scan))
            save_image(image, reoriented)
            labels = steps.to_ras(load_image(labels_path)).data.astype(int)
            for setting in settings:
                if setting == "none":
                    out, seconds = image.data.astype(np.float32), 0.0
                else:
                    steps.N4_ITERATIONS = parse_setting(setting)
                    start = time.perf_counter()
                    out = steps.bias_correct(reoriented, Path(tmp) / "n4.nii.gz").data
                    seconds = time.perf_counter() - start
                rows[setting].append({**scores(out, labels), "seconds": seconds})
        print(scan.name, " | ".join(f"{s} WM {rows[s][-1]['WM CoV']:.4f}" for s in settings), flush=True)

    columns = ["WM CoV", "lobe CoV", "GM CoV", "WM/GM CNR", "seconds"]
    lines = [
        "| N4 (iterations x levels) | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for setting in settings:
        means = {c: np.mean([r[c] for r in rows[setting]]) for c in columns}
        lines.append(f"| {setting} | " + " | ".join(f"{means[c]:.4f}" if c != "seconds" else f"{means[c]:.2f}" for c in columns) + " |")
    table = "\n".join(lines) + f"\n\n{len(rows['none'])} scans; means over scans.\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
