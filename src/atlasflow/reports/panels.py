"""The figures of the pages: each a :class:`Panel` drawn from workflow outputs, or the reason not.

A panel's builder loads its inputs through :class:`_Inputs`, which turns an absent or unreadable
file into :class:`Missing` with the reason; the panel then shows that reason in its place, so a
report never breaks on a missing figure. Drawing is :mod:`atlasflow.reports.figures`' job; this
module decides which files feed which figure, and names every figure (its PNG's stem).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import atlasflow.reports.figures as fg
from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Image, load_image
from atlasflow.layout import DEFAULT_REFERENCE, CohortFiles, scan_id, session_entity
from atlasflow.reports.checks import STAGE_TITLES
from atlasflow.reports.inputs import read_metrics, relative, strip_prefix
from atlasflow.reports.montage import Volume, centre_of, foreground_centre, ras_image
from atlasflow.reports.qc import SubjectQC

STAGE_IMAGES = {"template": "template", "atlas": "atlas", "baseline": "baseline scan"}


class Missing(Exception):
    """A figure's input is absent or unusable; the message is the reason shown in its place."""


@dataclass
class Panel:
    """One rendered figure (or the reason it could not be drawn)."""

    name: str  # file stem for the exported PNG, e.g. sub-01_ses-1_template (sub-01_template)
    title: str
    caption: str
    png: bytes | None = None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)  # rows of the figure that were missing


class _Inputs:
    """Loads report inputs once per report, turning absence into :class:`Missing` with a reason."""

    def __init__(self, outdir: Path):
        self.outdir = outdir
        self._cache: dict[tuple[Path, bool], object] = {}

    def image(self, path: Path | None, what: str, labels: bool = False):
        if path is None:
            raise Missing(f"{what}: not available")
        key = (Path(path), labels)
        if key not in self._cache:
            if not Path(path).exists():
                raise Missing(f"{what}: {relative(Path(path), self.outdir)} not found")
            try:
                self._cache[key] = load_image(path, dtype=None if labels else np.float32)
            except AtlasflowError as exc:
                raise Missing(f"{what}: {exc}") from None
        return self._cache[key]

    def volume(self, path: Path | None, what: str, labels: bool = False) -> Volume:
        return Volume.from_image(self.image(path, what, labels))

    def maybe(
        self, path: Path | None, what: str, notes: list[str], labels: bool = False
    ) -> Volume | None:
        """The volume, or None with the reason appended to ``notes``."""
        try:
            return self.volume(path, what, labels)
        except Missing as exc:
            notes.append(str(exc))
            return None


def _render(panel: Panel, build: Callable[[list[str]], bytes]) -> Panel:
    try:
        panel.png = build(panel.notes)
    except Missing as exc:
        panel.reason = str(exc)
    return panel


def _on_grid(
    volume: Volume | None, reference: Volume, what: str, notes: list[str]
) -> Volume | None:
    if volume is not None and not volume.same_grid(reference):
        notes.append(
            f"{what}: grid {volume.shape} does not match the fixed image {reference.shape}"
        )
        return None
    return volume


def save_figures(panels: Sequence[Panel], figures_dir: str | Path) -> list[Path]:
    """Write every panel as ``<name>.png`` (a grey 'missing' PNG when it could not be drawn)."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in panels:
        png = (
            panel.png
            if panel.png is not None
            else fg.placeholder_png(panel.title, panel.reason or "no input")
        )
        path = figures_dir / f"{panel.name}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(png)
        tmp.replace(path)
        written.append(path)
    return written


# ------------------------------------------------------------------------------ subject


def subject_panels(
    outdir: Path, qc: SubjectQC, raw_inputs: Mapping[str, str] | None = None
) -> list[tuple[str, list[Panel]]]:
    """Every figure of a subject report, grouped by section (session, or 'longitudinal')."""
    from atlasflow.io.itk import read_itk_displacement
    from atlasflow.transforms import Transform, apply_transform

    inputs = _Inputs(outdir)
    files = CohortFiles(outdir, qc.reference)
    raw_inputs = {strip_prefix(k, "ses-"): v for k, v in (raw_inputs or {}).items()}
    s = qc.subject
    sections: list[tuple[str, list[Panel]]] = []

    if qc.longitudinal:
        panels = [
            _render(
                Panel(
                    f"sub-{s}_tumor",
                    "Tumour volume over time",
                    "Tumour volume from the masks at every session; point colour = response category."
                    + (
                        f" Lines per compartment: {', '.join(parts)}."
                        if (parts := list(tumour_compartments(qc.tumor)))
                        else ""
                    ),
                ),
                lambda notes: _tumor_plot(qc, files.tumor_table(s)),
            )
        ]
        sections.append(("longitudinal", panels))

    for session in qc.sessions:
        scan = files.scan(s, session)
        stem = scan_id(s, session)
        panels = []

        def build_inputs(notes: list[str], scan=scan, session=session) -> bytes:
            raw_path = raw_inputs.get(session)
            if raw_path is None:
                notes.append("input: raw input path not given to the report")
                raw = None
            else:
                raw = inputs.maybe(Path(raw_path), "input", notes)
            pre = inputs.maybe(scan.preproc, "preprocessed", notes)
            mask = (
                inputs.maybe(scan.brain_mask, "brain mask", notes, labels=True)
                if pre is not None
                else None
            )
            mask = _on_grid(mask, pre, "brain mask", notes) if pre is not None else None
            if raw is None and pre is None:
                raise Missing("; ".join(notes))
            return fg.anatomy_rows(
                [
                    ("input", raw, None),
                    ("preprocessed + brain mask", pre, None if mask is None else mask.data),
                ]
            )

        panels.append(
            _render(
                Panel(
                    f"{stem}_inputs",
                    "Input and preprocessed image",
                    "Top: the scan as given (turned to RAS for display). Bottom: after reorientation, "
                    "bias correction, intensity scaling to [0, 1] and resampling; blue outline = brain mask.",
                ),
                build_inputs,
            )
        )

        followup = qc.longitudinal and session != qc.baseline
        for stage in ("template", "atlas", "baseline") if followup else ("template", "atlas"):

            def build_overlay(notes: list[str], scan=scan, stage=stage) -> bytes:
                fixed_image = inputs.image(files.fixed(stage, s, qc.baseline), stage)
                fixed = Volume.from_image(fixed_image)
                before = None
                try:
                    moving = inputs.image(scan.preproc, "preprocessed")
                    before = Volume.from_image(
                        apply_transform(moving, Transform.identity(), fixed_image.grid)
                    )
                except Missing as exc:
                    notes.append(str(exc))
                after = _on_grid(
                    inputs.maybe(scan.warped(stage), "registered", notes),
                    fixed,
                    "registered",
                    notes,
                )
                if before is None and after is None:
                    raise Missing("; ".join(notes))
                return fg.registration_overlay(
                    fixed, [("before (no transform)", before), ("after registration", after)]
                )

            panels.append(
                _render(
                    Panel(
                        f"{stem}_{stage}",
                        f"Registration {STAGE_TITLES[stage]}",
                        f"Red lines: edges of the {STAGE_IMAGES[stage]}. Top: the preprocessed scan "
                        "placed on its grid as it is; bottom: after registration. Aligned when the red "
                        "edges follow the scan's own boundaries.",
                    ),
                    build_overlay,
                )
            )

        def build_jacobian(notes: list[str], scan=scan) -> bytes:
            rows = []
            for stage in ("template", "atlas"):
                what = f"displacement field {STAGE_TITLES[stage]}"
                background = inputs.maybe(files.fixed(stage, s, qc.baseline), stage, [])
                det = centre = None
                if not scan.warp(stage).exists():
                    notes.append(f"{what}: {relative(scan.warp(stage), outdir)} not found")
                else:
                    try:
                        field = ras_image(read_itk_displacement(scan.warp(stage)))
                        on_grid = (
                            background is not None and background.shape == field.data.shape[:3]
                        )
                        centre = foreground_centre(background) if on_grid else None
                        det = jacobian_on_views(field, centre)
                    except AtlasflowError as exc:
                        notes.append(f"{what}: {exc}")
                rows.append((STAGE_TITLES[stage], det, background, centre))
            if all(r[1] is None for r in rows):
                raise Missing("; ".join(notes))
            return fg.jacobian_rows(rows)

        panels.append(
            _render(
                Panel(
                    f"{stem}_jacobian",
                    "Jacobian determinant",
                    "Local volume change of the deformation (after the affine part), on the fixed grid: "
                    "red = expansion, blue = contraction, bright green = folding (det J <= 0).",
                ),
                build_jacobian,
            )
        )

        if followup:
            base = files.scan(s, qc.baseline)

            def build_change(notes: list[str], scan=scan, base=base) -> bytes:
                background = inputs.volume(base.preproc, "baseline preprocessed image")
                maps = [
                    ("log-Jacobian", scan.log_jacobian, "", True),
                    ("difference", scan.difference, "a.u.", True),
                    ("displacement", scan.displacement, "mm", False),
                ]
                rows = [
                    (
                        label,
                        _on_grid(inputs.maybe(path, label, notes), background, label, notes),
                        unit,
                        signed,
                    )
                    for label, path, unit, signed in maps
                ]
                if all(r[1] is None for r in rows):
                    raise Missing("; ".join(notes))
                tb = _on_grid(
                    inputs.maybe(base.tumor_mask, "baseline tumour mask", [], labels=True),
                    background,
                    "",
                    [],
                )
                tf = _on_grid(
                    inputs.maybe(scan.tumor_in_baseline, "follow-up tumour mask", [], labels=True),
                    background,
                    "",
                    [],
                )
                return fg.change_maps(
                    background,
                    rows,
                    None if tb is None else tb.data > 0,
                    None if tf is None else tf.data > 0,
                )

            panels.append(
                _render(
                    Panel(
                        f"{stem}_change",
                        f"Change since baseline ({session_entity(qc.baseline or '')})",
                        "On the baseline image, sliced through the tumour: log-Jacobian (red = growth, "
                        "blue = shrinkage), intensity difference after registration, displacement "
                        "magnitude (mass effect). Outlines: baseline tumour cyan, follow-up tumour yellow.",
                    ),
                    build_change,
                )
            )
        sections.append((session, panels))
    return sections


def jacobian_on_views(field: Image, centre: Sequence[int] | None) -> Volume:
    """Jacobian determinant of a RAS-ordered displacement field on the three view planes only.

    Each plane is computed from a three-voxel slab around it with
    :func:`atlasflow.transforms.jacobian_determinant` (central differences need one neighbour on
    each side), NaN elsewhere: a whole 2 mm field costs about a second, the planes milliseconds.
    """
    from atlasflow.transforms import jacobian_determinant

    shape = field.data.shape[:3]
    centre = tuple(int(c) for c in (centre if centre is not None else centre_of(None, shape)))
    det = np.full(shape, np.nan, np.float32)
    for axis in range(3):
        at = int(np.clip(centre[axis], 0, shape[axis] - 1))
        lo, hi = max(at - 1, 0), min(at + 2, shape[axis])
        if hi - lo < 2:  # a single-voxel axis has no derivative along it
            continue
        slab = np.take(field.data, np.arange(lo, hi), axis=axis)
        plane = np.take(jacobian_determinant(Image(slab, field.affine)), at - lo, axis=axis)
        index = [slice(None)] * 3
        index[axis] = at
        det[tuple(index)] = plane
    return Volume(det, np.sqrt((np.asarray(field.affine)[:3, :3] ** 2).sum(axis=0)))


def _tumor_plot(qc: SubjectQC, table: Path) -> bytes:
    if not qc.tumor:
        raise Missing(f"tumour table: {table.name} not found or empty")
    rows = qc.tumor
    days = [
        r.get("days_since_baseline") if r.get("days_since_baseline") is not None else float(i)
        for i, r in enumerate(rows)
    ]
    volumes = [
        r.get("volume_mm3") if r.get("volume_mm3") is not None else float("nan") for r in rows
    ]
    response = qc.response or "baseline only"
    return fg.tumor_volume_plot(
        days,
        volumes,
        [r["session"] for r in rows],
        [r.get("response", "") for r in rows],
        f"sub-{qc.subject}: {response.replace('_', ' ')}",
        compartments=tumour_compartments(rows),
    )


def tumour_compartments(rows: Sequence[Mapping]) -> dict[str, list[float]]:
    """Compartment -> volume (mL) per row, from the tumour table's ``<name>_volume_ml`` columns
    that hold a value (multi-label masks); {} for binary masks. NaN where a row has none."""
    suffix = "_volume_ml"
    names = [k for k in (rows[0] if rows else {}) if k.endswith(suffix)]
    return {
        key[: -len(suffix)]: [np.nan if r.get(key) is None else float(r[key]) for r in rows]
        for key in names
        if any(r.get(key) is not None for r in rows)
    }


# ------------------------------------------------------------------------------- cohort


def cohort_panels(
    outdir: Path, iterations: int | None = None, reference: str = DEFAULT_REFERENCE
) -> list[Panel]:
    """Atlas at every iteration (in the ``reference`` contrast), convergence curves and the
    tumour-frequency map."""
    files = CohortFiles(outdir, reference)
    inputs = _Inputs(outdir)
    found = files.found_iterations()
    metrics = read_metrics(files.metrics)
    last = max(
        [
            iterations or 0,
            *found,
            *[int(r["iteration"]) for r in metrics if r.get("iteration") is not None],
        ]
    )
    panels = []

    def build_iterations(notes: list[str]) -> bytes:
        columns = [
            (f"iter-{i}", inputs.maybe(files.iteration(i), f"iter-{i}", notes))
            for i in range(last + 1)
        ]
        if all(v is None for _, v in columns):
            raise Missing("; ".join(notes) or "no atlas iterations found")
        return fg.atlas_iterations(columns)

    panels.append(
        _render(
            Panel(
                "atlas_iterations",
                "Atlas at every iteration",
                "Iteration 0 is the affine mean of the cohort; each later iteration registers every member "
                "to the previous template, averages and pulls the average to the cohort's centre. "
                "Sharper columns to the right mean the members agree.",
            ),
            build_iterations,
        )
    )

    def build_convergence(notes: list[str]) -> bytes:
        if not files.metrics.exists():
            raise Missing(f"atlas metrics: {relative(files.metrics, outdir)} not found")
        if not metrics:
            raise Missing(f"atlas metrics: {relative(files.metrics, outdir)} has no rows")
        x = [r["iteration"] for r in metrics]
        groups = [
            ("template change (RMS)", {"rms": "template_change_rms"}),
            (
                "mean velocity norm (mm)",
                {"mean": "mean_velocity_norm_mean_mm", "max": "mean_velocity_norm_max_mm"},
            ),
            ("NCC of members to template", {"mean": "ncc_to_template_mean"}),
            ("folding fraction", {"max": "folding_fraction_max", "mean": "folding_fraction_mean"}),
        ]
        series = []
        for title, keys in groups:
            curves = {
                label: [np.nan if r.get(k) is None else r[k] for r in metrics]
                for label, k in keys.items()
                if any(r.get(k) is not None for r in metrics)
            }
            if curves:
                series.append((title, curves))
        if not series:
            raise Missing(
                f"atlas metrics: {relative(files.metrics, outdir)} has none of the expected columns"
            )
        return fg.convergence_plot(x, series)

    panels.append(
        _render(
            Panel(
                "atlas_convergence",
                "Atlas convergence",
                "Per-iteration metrics from atlas/metrics.tsv: the template change and the mean velocity "
                "should shrink, the members' NCC to the template should rise and level off.",
            ),
            build_convergence,
        )
    )

    def build_frequency(notes: list[str]) -> bytes:
        frequency = inputs.volume(files.tumor_frequency, "tumour frequency map")
        background = inputs.maybe(files.atlas, "atlas", notes)
        unit = "fraction of subjects" if float(np.nanmax(frequency.data)) <= 1.0 else "subjects"
        return fg.frequency_map(background, frequency, unit)

    panels.append(
        _render(
            Panel(
                "tumor_frequency",
                "Tumour frequency in atlas space",
                "Tumour masks of the cohort carried into atlas space: how often each voxel is tumour "
                "(red rarely, yellow always); sliced through the most frequent voxel.",
            ),
            build_frequency,
        )
    )
    return panels
