"""Peak memory of the atlas label vote vs the number of members (10, 50, 200).

    python benchmarks/bench_averaging.py [--sizes 10 50 200] [--spacing 2] [--labels 16]

Builds, on the MNI152 template grid at --spacing mm, a few distinct synthetic members (warped
T1w = template with smooth multiplicative noise, a smooth random velocity field, QC metrics
JSON, a label map with --labels labels), then for each size links that many
members (cycling over the distinct ones) and runs `atlasflow atlas vote` on them in a fresh
process. Prints wall seconds and peak RSS (MB); flat memory = streaming over members.
(`atlas init` and `atlas iteration` register their members, and average in the same job: they are
measured by benchmarks/ixi_atlas.py and the estimate's calibration, not here. The file-only
`atlas iterate` command this benchmark also timed until session 10 was never used by the
workflow and is gone.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))
from _measure import load_average, measure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DISTINCT = 4


def make_members(work: Path, spacing: float, n_labels: int) -> dict[str, list[Path]]:
    from atlasflow.io.images import Image, load_image, save_image

    src = work / "distinct"
    template, mask = src / "template_T1w.nii.gz", src / "template_mask.nii.gz"
    if not template.exists():
        subprocess.run(
            [BIN / "atlasflow", "template", "--spacing", str(spacing), "--out-image", str(template), "--out-mask", str(mask)],
            check=True,
        )
    ref = load_image(template)
    files: dict[str, list[Path]] = {k: [] for k in ("warped", "velocity", "metrics", "labels")}
    rng = np.random.default_rng(0)
    # Label map: template intensity deciles (inside the brain) split into n_labels bands.
    inside = ref.data > 0.05
    edges = np.quantile(ref.data[inside], np.linspace(0, 1, n_labels + 1)[1:-1])
    for k in range(DISTINCT):
        paths = {
            "warped": src / f"m{k}_warped_T1w.nii.gz",
            "velocity": src / f"m{k}_velocity_xfm.nii.gz",
            "metrics": src / f"m{k}_qc.json",
            "labels": src / f"m{k}_dseg.nii.gz",
        }
        if not paths["labels"].exists():
            noise = ndimage.gaussian_filter(rng.standard_normal(ref.data.shape), 3)
            save_image(ref.with_data((ref.data * (1 + 0.5 * noise)).astype(np.float32)), paths["warped"], dtype=np.float32)
            field = np.stack([ndimage.gaussian_filter(rng.standard_normal(ref.data.shape), 4) * 20 for _ in range(3)], -1)
            save_image(Image(field.astype(np.float32), ref.affine), paths["velocity"], dtype=np.float32)
            paths["metrics"].write_text(json.dumps({"ncc_after": 0.9, "folding_fraction": 0.0}))
            labels = np.where(inside, 1 + np.digitize(np.roll(ref.data, k, axis=0), edges), 0)
            save_image(ref.with_data(labels.astype(np.uint8)), paths["labels"], dtype=np.uint8)
        for key, path in paths.items():
            files[key].append(path)
    files["template"], files["mask"] = [template], [mask]
    return files


def link_members(work: Path, n: int, files: dict[str, list[Path]]) -> dict[str, list[str]]:
    folder = work / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    linked: dict[str, list[str]] = {}
    for key in ("warped", "velocity", "metrics", "labels"):
        linked[key] = []
        for i in range(n):
            target = files[key][i % DISTINCT]
            link = folder / f"sub-{i:04d}_{target.name.split('_', 1)[1]}"
            if not link.is_symlink():
                link.symlink_to(target)
            linked[key].append(str(link))
    return linked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--labels", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("/tmp/atlasflow-bench-averaging"))
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/averaging.md")
    args = parser.parse_args(argv)
    work = args.work / f"{args.spacing:g}mm"
    files = make_members(work, args.spacing, args.labels)
    template = str(files["template"][0])
    af = [str(BIN / "atlasflow"), "--threads", "1", "atlas"]
    lines = [
        "| members | atlas vote s / MB |",
        "|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for n in args.sizes:
        m = link_members(work, n, files)
        out = work / f"n{n}" / "out"
        out.mkdir(exist_ok=True)
        commands = [
            af + ["vote", "--labels", *m["labels"], "--output", str(out / "dseg.nii.gz"),
                  "--out-probseg", str(out / "probseg.nii.gz")],
        ]
        cells = []
        for command in commands:
            run = measure(command)
            if run.returncode:
                raise SystemExit(f"{' '.join(command[:5])} failed: {run.stderr.strip()[-2000:]}")
            cells.append(f"{run.seconds:.1f} / {run.peak_rss_mb:.0f}")
        line = f"| {n} | " + " | ".join(cells) + " |"
        lines.append(line)
        print(line, flush=True)
    from atlasflow.io.images import load_image

    shape = load_image(template).data.shape
    note = (
        f"\nGrid {shape[0]}x{shape[1]}x{shape[2]} at {args.spacing:g} mm, {args.labels} labels; "
        f"{load_average()} at the end of the run.\n"
    )
    print(note)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        f"Averaging peak memory (`python benchmarks/bench_averaging.py --spacing {args.spacing:g} --labels {args.labels}`): "
        "wall seconds / peak RSS MB\n\n" + "\n".join(lines) + "\n" + note
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
