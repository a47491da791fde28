"""Pairwise registration benchmark on real IXI scans: atlasflow's deep engine beside ANTs.

Pairs: consecutive subjects of ``ixi10`` (fixed = subject i, moving = subject i+1, native grids),
given as one or both of two kinds of input (``--inputs``):

* ``preprocessed``: both brain-masked by their own label map dilated by 2 voxels and
  intensity-normalised to [0, 1] inside it, the masks handed to every method;
* ``raw``: the ixi10 files exactly as on disk (whole heads, integer intensities, PSR), no mask
  files. Every method goes through :func:`atlasflow.registration.api.register_files`, the function
  under ``atlasflow register --fixed F --moving M`` (``--backend ants --ants-type T`` for ANTs, which
  then sees the raw heads without masks, as a user would run it): the deep engine normalises, finds
  each head's brain through the MNI152 template (``--find-masks brain``, the command's default)
  and initialises itself; ``seconds`` is the one its ``metrics.json`` reports (the registration;
  the brain finding, ~4 s per scan, is its ``brain_mask_seconds``, printed apart).

Each (pair, input, method) runs in its own forked process, interleaved, so every method sees the
same machine load and the peak resident memory of one registration can be read per run.

Scores (the same for both inputs): mean Dice over DLMUSE labels present in both subjects
(background excluded; moving labels warped nearest-neighbour through the transform, for raw inputs
the one ``register_files`` wrote), folding fraction (Jacobian determinant <= 0 inside the fixed
subject's dilated label mask), median seconds per pair (registration only: model loading and imports excluded),
peak resident memory. ANTs runs with ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS = the torch thread count.

    python benchmarks/bench_register.py --data ../shared/data/ixi10 --refine-steps 100
    python benchmarks/bench_register.py --inputs both --refine-steps 30 --torch-threads 2

prints a markdown table and writes it to benchmarks/results/register.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

THREADS = os.cpu_count() or 1
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(THREADS))
# torch threads for the deep rows (set by --torch-threads; on a shared, busy machine one thread
# was several times faster than two, because OpenMP workers wait for descheduled siblings).
TORCH_THREADS = [THREADS]


def load_subject(t1: Path, labels: Path):
    """(preprocessed image, labels, dilated label mask, raw file) of one subject."""
    from scipy import ndimage

    from atlasflow.io.images import load_image
    from atlasflow.preprocess.steps import normalise_intensity

    image = load_image(t1)
    lab = load_image(labels, dtype=None)
    mask = ndimage.binary_dilation(lab.data > 0, iterations=2)
    image = image.with_data(normalise_intensity(image.data, mask))
    return image, lab, mask, t1


def run_method(
    method: str, fixed, moving, fixed_mask, moving_mask, refine_steps: int, model: str | None
):
    """Returns (transform, seconds)."""
    import torch

    torch.set_num_threads(TORCH_THREADS[0])
    if method.startswith("ants:"):
        from atlasflow.registration.api import register

        kind = method.split(":", 1)[1]
        reg = register(
            fixed,
            moving,
            backend="ants",
            fixed_mask=fixed_mask,
            moving_mask=moving_mask,
            ants_type=kind,
            affine_only=False,
        )
        return reg.transform, reg.seconds
    from atlasflow.registration.engine import get_model, register_deep

    get_model(model)  # loading is start-up, not registration time
    res = register_deep(
        fixed,
        moving,
        fixed_mask=fixed_mask,
        moving_mask=moving_mask,
        model_path=model,
        refine_steps=refine_steps if method == "deep+refine" else 0,
        affine_only=method == "deep-affine",
    )
    return res.transform, res.seconds


def run_raw(method: str, fixed_path: Path, moving_path: Path, refine_steps: int, model: str | None):
    """Raw files through ``register_files`` (``atlasflow register``): (transform it wrote, seconds
    its metrics report)."""
    import torch

    from atlasflow.io.itk import load_transform
    from atlasflow.preprocess.reference import find_brain
    from atlasflow.registration.api import RegisterOutputs, register_files
    from atlasflow.registration.options import RegistrationOptions

    torch.set_num_threads(TORCH_THREADS[0])
    if method.startswith("ants:"):
        opts = RegistrationOptions(backend="ants", ants_type=method.split(":", 1)[1])
    else:
        from atlasflow.registration.engine import get_model

        get_model(model)  # loading is start-up, not registration time
        opts = RegistrationOptions(
            model_path=model,
            refine_steps=refine_steps if method == "deep+refine" else 0,
            affine_only=method == "deep-affine",
        )
    with tempfile.TemporaryDirectory(prefix="bench-raw-") as tmp:
        outputs = RegisterOutputs.in_dir(tmp)
        # atlasflow finds each raw head's brain (its default); ANTs sees the heads as they are,
        # as antsRegistrationSyN users run it.
        find = None if method.startswith("ants:") else find_brain
        metrics = register_files(fixed_path, moving_path, outputs, options=opts, find_mask=find)
        transform = load_transform(outputs.affine, outputs.warp)
    return transform, metrics["seconds"], metrics.get("brain_mask_seconds", 0.0)


def evaluate(transform, fixed_labels, moving_labels, fixed_mask) -> tuple[float, float]:
    from atlasflow.transforms import apply_transform, folding_fraction

    warped = apply_transform(moving_labels, transform, fixed_labels.grid, "nearest").data
    present = np.intersect1d(np.unique(fixed_labels.data), np.unique(moving_labels.data))
    dices = []
    for lab in present[present != 0]:
        a, b = fixed_labels.data == lab, warped == lab
        dices.append(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return float(np.mean(dices)), folding_fraction(transform.displacement, fixed_mask)


def _child(queue, inputs, method, pair, subjects, refine_steps, model):
    try:
        (
            (fixed, fixed_labels, fixed_mask, fixed_path),
            (moving, moving_labels, moving_mask, moving_path),
        ) = (
            subjects[pair[0]],
            subjects[pair[1]],
        )
        mask_seconds = 0.0
        if inputs == "raw":
            transform, seconds, mask_seconds = run_raw(
                method, fixed_path, moving_path, refine_steps, model
            )
        else:
            transform, seconds = run_method(
                method, fixed, moving, fixed_mask, moving_mask, refine_steps, model
            )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # MB (Linux: KB)
        dice, folding = evaluate(transform, fixed_labels, moving_labels, fixed_mask)
        queue.put((dice, folding, seconds, peak, None, mask_seconds))
    except Exception as exc:  # report, do not hang the benchmark
        queue.put((np.nan, np.nan, np.nan, np.nan, f"{type(exc).__name__}: {exc}", 0.0))


LABELS = {
    "deep": "atlasflow deep (no refinement)",
    "deep+refine": "atlasflow deep + refinement ({steps} steps)",
    "deep-affine": "atlasflow deep affine only",
    "ants:SyN": 'ANTs `type_of_transform="SyN"`',
    "ants:Affine": 'ANTs `"Affine"`',
    "ants:antsRegistrationSyN[s]": 'ANTs `"antsRegistrationSyN[s]"`',
}


def table(
    results: dict, inputs: list[str], methods: list[str], pairs: list[int], steps: int, anchor: str
) -> str:
    """One row per (input, method); the anchor's seconds are those of the same input."""
    rows = [
        "| inputs | method | pairs | mean Dice | folding % | median s/pair | anchor s / method s | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in inputs:
        anchor_s = np.median([results[(kind, anchor, p)][2] for p in pairs])
        for m in methods:
            vals = np.array([results[(kind, m, p)][:4] for p in pairs], float)
            med = float(np.median(vals[:, 2]))
            rows.append(
                f"| {kind} | {LABELS[m].format(steps=steps)} | {len(pairs)} | {np.nanmean(vals[:, 0]):.3f} | "
                f"{100 * np.nanmean(vals[:, 1]):.4f} | {med:.2f} | {anchor_s / med:.1f} | {np.nanmax(vals[:, 3]):.0f} |"
            )
    return "\n".join(rows)


def per_pair(results: dict, inputs: list[str], methods: list[str], pairs: list, steps: int) -> str:
    """Dice of every pair, and raw minus preprocessed where both ran."""
    cols = [(kind, m) for m in methods for kind in inputs]
    head = " | ".join(f"{kind}: {LABELS[m].format(steps=steps)}" for kind, m in cols)
    rows = [f"| pair | {head} |", "|---" * (len(cols) + 1) + "|"]
    for k, pair in enumerate(pairs):
        cells = []
        for kind, m in cols:
            out = results.get((kind, m, k))
            cells.append("" if out is None else f"{out[0]:.3f}")
        rows.append(f"| {pair[0]}-{pair[1]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi10")
    )
    p.add_argument("--inputs", choices=["preprocessed", "raw", "both"], default="preprocessed")
    p.add_argument("--pairs", type=int, default=9)
    p.add_argument(
        "--slow-pairs", type=int, default=3, help="pairs for antsRegistrationSyN[s] (0 skips it)"
    )
    p.add_argument(
        "--slow-inputs",
        choices=["preprocessed", "raw", "both"],
        default=None,
        help="inputs antsRegistrationSyN[s] runs on (default: --inputs)",
    )
    p.add_argument("--refine-steps", type=int, default=100)
    p.add_argument("--model", default=None, help="weights (default: the shipped model)")
    p.add_argument("--methods", default="deep,deep+refine,deep-affine,ants:SyN,ants:Affine")
    p.add_argument(
        "--torch-threads", type=int, default=THREADS, help="torch threads for the deep rows"
    )
    p.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "register.md")
    )
    args = p.parse_args(argv)

    TORCH_THREADS[0] = args.torch_threads
    data = Path(args.data)
    t1s = sorted((data / "t1w").glob("*.nii.gz"))
    labels = sorted((data / "labels").glob("*.nii.gz"))
    if not t1s or len(t1s) != len(labels):
        print(f"{data}: expected t1w/ and labels/ with one label map per image", file=sys.stderr)
        return 1
    subjects = [load_subject(t, lab) for t, lab in zip(t1s, labels, strict=True)]
    pairs = [(i, i + 1) for i in range(min(args.pairs, len(subjects) - 1))]
    methods = args.methods.split(",")
    both = ["preprocessed", "raw"]
    inputs = both if args.inputs == "both" else [args.inputs]
    slow_inputs = (
        inputs
        if args.slow_inputs is None
        else (both if args.slow_inputs == "both" else [args.slow_inputs])
    )
    slow = "ants:antsRegistrationSyN[s]"
    n_slow = min(args.slow_pairs, len(pairs))
    jobs = [(kind, m, k) for k in range(len(pairs)) for m in methods for kind in inputs]
    jobs += [(kind, slow, k) for k in range(n_slow) for kind in slow_inputs]
    ctx = mp.get_context("fork")
    results = {}
    start = time.perf_counter()
    for kind, method, k in jobs:
        queue = ctx.Queue()
        proc = ctx.Process(
            target=_child,
            args=(queue, kind, method, pairs[k], subjects, args.refine_steps, args.model),
        )
        proc.start()
        out = queue.get()
        proc.join()
        results[(kind, method, k)] = out
        note = f" ERROR {out[4]}" if out[4] else ""
        print(
            f"pair {k} {pairs[k]} {kind:12s} {method:30s} dice {out[0]:.4f} folding {out[1]:.5f} "
            f"seconds {out[2]:.2f} brain-finding seconds {out[5]:.2f} peak_MB {out[3]:.0f}{note}  "
            f"[{time.perf_counter() - start:.0f}s]",
            flush=True,
        )

    all_pairs = list(range(len(pairs)))
    text = [
        f"# Pairwise registration, IXI ({len(pairs)} consecutive pairs, native 2 mm grids)\n",
        f"Inputs: {', '.join(inputs)} (see the docstring of benchmarks/bench_register.py: raw = the "
        "files as on disk, no masks, through `register_files` as `atlasflow register` runs them). "
        f"Threads: torch {args.torch_threads}, ITK {os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS']}. "
        f"Refinement steps: {args.refine_steps}. "
        "Seconds exclude imports and model loading. Peak MB = max resident set size of the "
        "forked process doing one registration (includes the Python interpreter, torch/ANTs and "
        "the loaded cohort).",
        f"Command: `python benchmarks/bench_register.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n",
        f"## All {len(pairs)} pairs (anchor: ANTs SyN on the same inputs)\n",
        table(
            results,
            inputs,
            methods,
            all_pairs,
            args.refine_steps,
            "ants:SyN" if "ants:SyN" in methods else methods[0],
        ),
    ]
    if n_slow:
        few = list(range(n_slow))
        text += [
            f"\n## First {n_slow} pairs (anchor: antsRegistrationSyN[s] on the same inputs)\n",
            table(results, slow_inputs, methods + [slow], few, args.refine_steps, slow),
        ]
    finding = [out[5] for (kind, method, _), out in results.items() if kind == "raw" and out[5] > 0]
    if finding:
        text.append(
            f"\nBrain finding of the raw deep runs (both scans of a pair, not in their seconds): "
            f"median {np.median(finding):.2f} s per pair."
        )
    text += [
        "\n## Dice per pair\n",
        per_pair(results, inputs, methods + ([slow] if n_slow else []), pairs, args.refine_steps),
    ]
    report = "\n".join(text) + "\n"
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
