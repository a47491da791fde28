"""The interactive viewer of a subject report: which volumes it shows, in which scenes, and its markup.

A :class:`Scene` is one space with a background image and named overlay layers (a list, so new
contrasts or maps are one more :class:`Layer`): the scan after preprocessing with the session's
other contrasts on its grid, each registration (fixed image, the registered scan, the scan before
registration, the other contrasts carried there, the log-Jacobian of the deformation, label maps)
and, for a follow-up, the change maps on the baseline with each contrast's difference map. Scenes
name flicker pairs (fixed image against registered or unregistered scan, as nipreps reports do;
the T1w against each other contrast; the baseline's contrast against the follow-up's).
Volumes are embedded once per page (:mod:`atlasflow.reports.volumes`), downsampled further when the
page would outgrow :data:`VOLUME_BUDGET`. The page's script (``assets/viewer.js``) draws them with
NiiVue (``assets/niivue.umd.js``, BSD-2, see ``assets/VENDORED.md``), inlined gzipped, so the page
works from ``file://`` with no network; the static figures stay for printing and for browsers
without WebGL2.

A link ``sub-S.html#view=<session>/<stage>[&mark=<name>]`` opens a scene, at a marked point
(``min-jacobian``: the most compressed or folded voxel; ``tumour``: the tumour's centre).
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path

import numpy as np

from atlasflow.contrasts.plan import ContrastFiles
from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Image, load_image
from atlasflow.layout import CohortFiles, Scan, session_entity
from atlasflow.reports.checks import STAGE_TITLES, contrast_label
from atlasflow.reports.html import asset, esc
from atlasflow.reports.inputs import relative, session_prefix
from atlasflow.reports.qc import SubjectQC
from atlasflow.reports.volumes import Embedded, embed

VOLUME_BUDGET = 7_000_000  # bytes of base64 volume data per page before downsampling further
#: A whole subject page (figures, viewer library and volumes) should stay under this: the
#: volumes get what the rest of the page leaves, at most :data:`VOLUME_BUDGET`.
PAGE_BUDGET = 10_000_000
MAP_KINDS = ("signed", "magnitude")
#: Tiers of volumes by what gives way first: the scans, fixed images and labels (``anatomy``),
#: the other contrasts carried into template, atlas or baseline space (``carried``: their own
#: session's scene keeps them on the T1w grid at full resolution), the maps.
TIERS = ("anatomy", "carried", "maps")
# Downsampling factors per tier tried in turn until the volumes fit the budget: the maps
# (log-Jacobian, differences, displacement: smooth, noisy outside the head, so the largest
# to store) give way first, then the carried contrasts, the scans and labels last.
FACTORS = (
    (1, 1, 1),
    (1, 1, 2),
    (1, 2, 2),
    (2, 2, 2),
    (2, 2, 3),
    (2, 3, 3),
    (3, 3, 3),
    (3, 3, 4),
    (4, 4, 4),
)
LOG_JACOBIAN_FLOOR = float(np.log(1e-2))  # folded voxels (det J <= 0) are shown at this value


@dataclass
class Layer:
    """One volume drawn in a scene: colour map (NiiVue's name; for a mask its colour: red, cyan,
    yellow or blue; "labels" for a label map), opacity, shown or not when the scene opens."""

    key: str
    name: str
    colormap: str = "gray"
    opacity: float = 1.0
    visible: bool = True


@dataclass
class Scene:
    """One space: a background (the first layer) and overlays, flicker pairs and marked points."""

    id: str
    title: str
    layers: list[Layer]
    # (label, overlay key, the layer it alternates with: "" for the background)
    flicker: list[tuple[str, str, str]] = field(default_factory=list)
    marks: dict[str, list[float]] = field(default_factory=dict)  # name -> world mm (RAS)
    notes: list[str] = field(default_factory=list)  # inputs that were missing

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "title": self.title,
            "layers": [vars(layer) for layer in self.layers],
            "flicker": [
                {"label": label, "key": key, **({"base": base} if base else {})}
                for label, key, base in self.flicker
            ],
            "marks": self.marks,
            "notes": self.notes,
        }


@dataclass
class _Source:
    path: Path
    name: str
    kind: str
    derive: str = ""  # "log-jacobian": computed from a displacement field
    mark: str = ""  # "tumour": the mask's centre; "min-jacobian": the smallest value
    carried: bool = False  # another contrast carried into a registration's space

    @property
    def tier(self) -> int:
        """Its place in :data:`TIERS` (the column of :data:`FACTORS` it is downsampled by)."""
        return 2 if self.kind in MAP_KINDS else (1 if self.carried else 0)


class _Volumes:
    """The page's volumes, each read and embedded once, keyed by file (and derivation)."""

    def __init__(self, outdir: Path):
        self.outdir = outdir
        self.sources: dict[str, _Source] = {}
        self.marks: dict[str, dict[str, list[float]]] = {}
        self.failed: dict[str, str] = {}

    def add(
        self,
        path: Path | None,
        name: str,
        kind: str,
        notes: list[str],
        derive: str = "",
        mark: str = "",
        carried: bool = False,
    ) -> str | None:
        """The key of the volume at ``path``, or None (reason in ``notes``) when it is absent."""
        if path is None:
            return None
        if not Path(path).exists():
            notes.append(f"{name}: {relative(Path(path), self.outdir)} not found")
            return None
        key = f"v{len(self.sources)}"
        for existing, source in self.sources.items():
            if source.path == Path(path) and source.derive == derive and source.kind == kind:
                return existing
        self.sources[key] = _Source(Path(path), name, kind, derive, mark, carried)
        return key

    def read(self, key: str) -> Image:
        source = self.sources[key]
        if source.derive == "log-jacobian":
            image = log_jacobian(source.path)
        else:
            labels = source.kind in ("labels", "mask")
            image = load_image(source.path, dtype=None if labels else np.float32)
        data = np.asarray(image.data)
        if source.mark == "tumour" and np.any(data > 0):
            at = np.argwhere(data > 0).mean(axis=0)
            self.marks.setdefault(key, {})["tumour"] = _world(image, at)
        if source.mark == "min-jacobian" and np.isfinite(data).any():
            at = np.unravel_index(
                int(np.nanargmin(np.where(np.isfinite(data), data, np.inf))), data.shape
            )
            self.marks.setdefault(key, {})["min-jacobian"] = _world(image, at)
        return image

    def embed_all(
        self, budget: int | None = None
    ) -> tuple[dict[str, Embedded], tuple[int, int, int]]:
        """Every volume embedded at the first downsampling factors of :data:`FACTORS` (one per
        tier of :data:`TIERS`) that fit ``budget`` bytes of base64 (default
        :data:`VOLUME_BUDGET`); the last factors when none do."""
        budget = VOLUME_BUDGET if budget is None else budget
        images: dict[str, Image] = {}
        for key in list(self.sources):
            try:
                images[key] = self.read(key)
            except (AtlasflowError, OSError, ValueError) as exc:
                self.failed[key] = f"{self.sources[key].name}: {exc}"
        done: dict[tuple[str, int], Embedded] = {}

        def at(key: str, factors: tuple[int, int, int]) -> Embedded:
            source = self.sources[key]
            factor = factors[source.tier]
            if (key, factor) not in done:
                done[key, factor] = embed(images[key], key, source.name, source.kind, factor)
            return done[key, factor]

        for factors in FACTORS:
            out = {key: at(key, factors) for key in images}
            size = sum(4 * ((len(e.nifti_gz) + 2) // 3) for e in out.values())
            if size <= budget:
                break
        return out, factors


def log_jacobian(warp: Path) -> Image:
    """log det J of an ITK displacement field on its grid; folded voxels (det J <= 0) at the floor."""
    from atlasflow.io.itk import read_itk_displacement
    from atlasflow.transforms import jacobian_determinant

    field_image = read_itk_displacement(warp)
    det = jacobian_determinant(field_image)
    with np.errstate(divide="ignore", invalid="ignore"):
        log = np.log(np.where(det > 0, det, np.nan))
    log = np.where(np.isfinite(log), np.maximum(log, LOG_JACOBIAN_FLOOR), LOG_JACOBIAN_FLOOR)
    return Image(log.astype(np.float32), field_image.affine)


def _world(image: Image, voxel) -> list[float]:
    xyz = np.asarray(image.affine, float) @ np.array([*map(float, voxel), 1.0])
    return [round(float(v), 2) for v in xyz[:3]]


# ------------------------------------------------------------------------------- scenes


def subject_scenes(outdir: Path, qc: SubjectQC) -> tuple[list[Scene], _Volumes]:
    """The scenes of one subject's viewer and the volumes they draw (not yet read)."""
    files = CohortFiles(outdir, qc.reference)
    cfiles = ContrastFiles(str(outdir), reference=qc.reference)
    volumes = _Volumes(outdir)
    s = qc.subject
    scenes: list[Scene] = []
    for session in qc.sessions:
        scan = files.scan(s, session)
        notes: list[str] = []
        own = session_prefix(session)  # "ses-T " ("" without a session)
        base = volumes.add(scan.preproc, f"{own}preprocessed", "image", notes)
        if base is not None:
            layers = [Layer(base, f"{own}preprocessed")]
            flicker = []
            for c in qc.contrasts.get(session, []):
                name = contrast_label(c)
                path = Path(cfiles.preproc(c, s, session))
                key = volumes.add(path, f"{own}{name}", "image", notes)
                if key:
                    ref = contrast_label(qc.reference)
                    layers.append(Layer(key, f"{name} (on the {ref} grid)", "gray", 1.0, False))
                    flicker.append((f"{ref} vs {name}", key, ""))
            mask = volumes.add(scan.brain_mask, "brain mask", "mask", notes)
            if mask:
                layers.append(Layer(mask, "brain mask", "blue", 0.35, False))
            tumour = volumes.add(scan.tumor_mask, "tumour mask", "mask", [], mark="tumour")
            if tumour:
                layers.append(Layer(tumour, "tumour mask", "red", 0.6, True))
            scenes.append(
                Scene(
                    f"{session}/native",
                    f"{session_prefix(session, ': ')}preprocessed",
                    layers,
                    flicker,
                    notes=notes,
                )
            )

        followup = qc.longitudinal and session != qc.baseline
        for stage in ("template", "atlas", "baseline") if followup else ("template", "atlas"):
            scene = _registration_scene(volumes, files, qc, scan, stage)
            if scene is not None:
                scenes.append(scene)
    return scenes, volumes


def _registration_scene(
    volumes: _Volumes, files: CohortFiles, qc: SubjectQC, scan: Scan, stage: str
) -> Scene | None:
    notes: list[str] = []
    session = scan.session
    fixed_name = {"template": "template", "atlas": "atlas"}.get(
        stage, session_entity(qc.baseline or "") or "baseline"
    )
    own = session_prefix(session)  # "ses-T " ("" without a session)
    fixed = volumes.add(files.fixed(stage, qc.subject, qc.baseline), fixed_name, "image", notes)
    if fixed is None:
        return None
    layers = [Layer(fixed, f"{fixed_name} (fixed)")]
    flicker = []
    after = volumes.add(scan.warped(stage), "registered scan", "image", notes)
    if after:
        layers.append(Layer(after, f"{own}registered", "gray", 1.0, True))
        flicker.append(("fixed vs registered", after, ""))
    before = volumes.add(scan.preproc, f"{own}preprocessed", "image", notes)
    if before:
        layers.append(Layer(before, f"{own}before registration", "gray", 1.0, False))
        flicker.append(("fixed vs before registration", before, ""))
    contrast_maps = _contrast_layers(volumes, qc, scan, stage, layers, flicker, after, notes)
    if stage == "baseline":
        maps = [
            (scan.log_jacobian, "log-Jacobian", "signed", ""),
            (scan.difference, "difference", "signed", ""),
            (scan.displacement, "displacement (mm)", "magnitude", ""),
            *contrast_maps,
        ]
    else:
        maps = [(scan.warp(stage), "log-Jacobian", "signed", "log-jacobian")]
    for path, name, kind, derive in maps:
        mark = "min-jacobian" if name == "log-Jacobian" else ""
        key = volumes.add(path, name, kind, notes, derive, mark)
        if key:
            layers.append(Layer(key, name, "hot" if kind == "magnitude" else "warm", 0.7, False))
    if stage == "atlas":
        for path, name in (
            (scan.atlas_dseg, "labels (subject)"),
            (files.atlas_dseg, "labels (atlas)"),
        ):
            key = volumes.add(path, name, "labels", [])
            if key:
                layers.append(Layer(key, name, "labels", 0.4, False))
    if stage == "baseline":
        base = Scan(scan.outdir, scan.subject, qc.baseline, scan.reference)
        for path, name, colour in (
            (base.tumor_mask, f"tumour {session_entity(qc.baseline or '')}".strip(), "cyan"),
            (scan.tumor_in_baseline, f"tumour {session_entity(session)}".strip(), "yellow"),
        ):
            key = volumes.add(path, name, "mask", [], mark="tumour")
            if key:
                layers.append(Layer(key, name, colour, 0.5, True))
    title = f"{session_prefix(session, ': ')}registration {STAGE_TITLES.get(stage, stage)}"
    return Scene(f"{session}/{stage}", title, layers, flicker, notes=notes)


def _contrast_layers(
    volumes: _Volumes,
    qc: SubjectQC,
    scan: Scan,
    stage: str,
    layers: list[Layer],
    flicker: list[tuple[str, str, str]],
    registered: str | None,
    notes: list[str],
) -> list[tuple[Path, str, str, str]]:
    """The session's other contrasts carried into a registration's space, as hidden layers with a
    flicker against the registered T1w; in baseline space also the baseline's own contrast (a
    flicker baseline vs follow-up) and, returned for the maps, each contrast's difference map."""
    cfiles = ContrastFiles(str(scan.outdir), reference=scan.reference)
    s, session = scan.subject, scan.session
    columns = qc.contrasts.get(session, [])
    if stage == "baseline":
        columns = [c for c in columns if c in qc.contrasts.get(qc.baseline or "", [])]
    maps = []
    for c in columns:
        name = contrast_label(c)
        if stage == "baseline":
            path = Path(cfiles.preproc(c, s, qc.baseline))
            base_name = f"{session_prefix(qc.baseline or '')}{name}"
            base = volumes.add(path, base_name, "image", notes)
            if base:
                layers.append(Layer(base, base_name, "gray", 1.0, False))
        else:
            base = registered
        path = Path(cfiles.in_space(c, stage, s, session))
        own = session_prefix(session)
        key = volumes.add(path, f"{own}{name} registered", "image", notes, carried=True)
        if not key:
            continue
        layers.append(Layer(key, f"{own}{name} registered", "gray", 1.0, False))
        if stage == "baseline" and base:
            flicker.append((f"{session_prefix(qc.baseline or '')}vs {own}{name}", key, base))
        elif base:
            flicker.append((f"registered {contrast_label(qc.reference)} vs {name}", key, base))
        if stage == "baseline":
            difference = Path(cfiles.difference(c, "baseline", s, session))
            maps.append((difference, f"{name} difference", "signed", ""))
    return maps


# -------------------------------------------------------------------------------- markup


@cache
def niivue_gzip_base64() -> str:
    """The vendored NiiVue build, gzipped (deterministically) and base64-encoded, once per process."""
    raw = files("atlasflow.reports").joinpath("assets").joinpath("niivue.umd.js").read_bytes()
    return base64.b64encode(gzip.compress(raw, compresslevel=6, mtime=0)).decode("ascii")


def viewer_data(
    outdir: Path, qc: SubjectQC, budget: int | None = None
) -> tuple[list[Scene], dict[str, Embedded], tuple[int, int, int]]:
    """Scenes with the volumes they draw embedded (and the downsampling factors per tier of
    :data:`TIERS` that fitted ``budget``); layers whose volume failed to load are dropped, the
    reason noted."""
    scenes, volumes = subject_scenes(outdir, qc)
    embedded, factors = volumes.embed_all(budget)
    kept = []
    for scene in scenes:
        planned = scene.layers[0].key if scene.layers else None
        scene.notes += [
            volumes.failed[layer.key] for layer in scene.layers if layer.key in volumes.failed
        ]
        scene.layers = [layer for layer in scene.layers if layer.key in embedded]
        scene.flicker = [
            (label, key, base)
            for label, key, base in scene.flicker
            if key in embedded and (not base or base in embedded)
        ]
        for layer in scene.layers:
            scene.marks.update(volumes.marks.get(layer.key, {}))
        if scene.layers and scene.layers[0].key == planned:
            kept.append(scene)
    return kept, embedded, factors


def volume_budget(other_bytes: int) -> int:
    """Bytes of volumes a page may embed when the rest of it (figures, markup) takes
    ``other_bytes``: what :data:`PAGE_BUDGET` leaves beside them and the viewer library, at most
    :data:`VOLUME_BUDGET`."""
    return max(0, min(VOLUME_BUDGET, PAGE_BUDGET - other_bytes - len(niivue_gzip_base64())))


def viewer_html(
    outdir: Path, qc: SubjectQC, initial: str | None = None, other_bytes: int = 0
) -> str:
    """The viewer section of a subject page (empty when no volume could be read); ``other_bytes``:
    the size of the rest of the page (see :func:`volume_budget`)."""
    scenes, embedded, factors = viewer_data(outdir, qc, volume_budget(other_bytes))
    if not scenes:
        return ""
    config = {
        "scenes": [scene.to_json() for scene in scenes],
        "volumes": {key: e.meta() for key, e in embedded.items()},
        "initial": initial or scenes[0].id,
        "factors": list(factors),
    }
    options = "".join(f'<option value="{esc(sc.id)}">{esc(sc.title)}</option>' for sc in scenes)
    data = "".join(
        f'<script type="application/octet-stream" id="viewer-vol-{key}" data-encoding="base64">'
        f"{e.base64}</script>\n"
        for key, e in embedded.items()
    )
    shrunk = [
        f"{what} {f}\u00d7"
        for what, f in (
            ("maps", factors[2]),
            ("other contrasts outside their session's scene", factors[1]),
            ("scans and labels", factors[0]),
        )
        if f > 1
    ]
    coarser = (
        f" To keep this page small, {' and '.join(shrunk)} coarser than computed." if shrunk else ""
    )
    return (
        '<h2 id="viewer">Viewer</h2>\n'
        '<div class="viewer" id="viewer-root">'
        '<div class="viewer-controls"><label>Scene <select id="viewer-scene">'
        f"{options}</select></label>"
        '<span id="viewer-flicker"></span>'
        '<label>Slice <select id="viewer-axis"><option value="2">axial</option>'
        '<option value="1">coronal</option><option value="0">sagittal</option></select>'
        '<input type="range" id="viewer-slice" min="0" max="1000" value="500"></label></div>'
        '<div class="viewer-main"><div class="viewer-canvas"><canvas id="viewer-canvas"></canvas></div>'
        '<div class="viewer-layers" id="viewer-layers"></div></div>'
        '<div class="viewer-status" id="viewer-location">Click or drag on the images to move the '
        "cross-hair; the values of every layer at that point are shown here.</div>"
        '<p class="muted viewer-help">Scroll over a view to move through its slices; right-drag to '
        "adjust contrast. Flicker alternates the fixed image with the chosen scan, as nipreps reports "
        "do, or the session's reference scan with another contrast: misalignment shows up as movement. Labels and masks keep their values; other volumes are "
        f"stored with 8-bit precision (the step is given per layer).{coarser}</p>"
        '<p class="viewer-fallback" id="viewer-fallback" hidden>This browser cannot draw the viewer '
        "(WebGL2 is needed); the figures below show the same volumes.</p>"
        "<noscript><p>The viewer needs JavaScript; the figures below show the same volumes.</p></noscript>"
        f'</div>\n<script type="application/json" id="viewer-config">{_json(config)}</script>\n'
        f"{data}"
        '<script type="application/octet-stream" id="viewer-lib" data-encoding="base64+gzip">'
        f"{niivue_gzip_base64()}</script>\n"
        f"<script>\n{asset('viewer.js')}</script>\n"
    )


def _json(value: Mapping | list) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True).replace("</", "<\\/")
