"""Provenance of a workflow run: what the outputs were made from, in one JSON file.

Owns the provenance record written by the workflow's ``provenance`` rule (``atlasflow provenance``):
package versions, the effective configuration, SHA-256 of every cohort input (T1w, labels, tumour
and brain masks, the manifest itself), of a template given as a file and of the registration weights
in use, which files a BIDS cohort took among several and which it skipped, the git revision of the
workflow, and the platform. Also the output folder's BIDS-derivatives ``dataset_description.json``
and ``provenance/skipped_inputs.tsv`` (inputs skipped or passed over, with the reason; the
``skipped_inputs`` rule, read by the cohort report).

This module stays light at import (no numpy, no torch): the Snakefile calls :func:`package_versions`
and :func:`git_commit` at parse time, in every Snakemake process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from atlasflow.cohort.columns import IMAGE_COLUMNS
from atlasflow.cohort.selection import CohortNotes
from atlasflow.errors import AtlasflowError

FORMAT = "atlasflow-provenance-v1"
#: Distributions whose versions decide what the workflow computes (import names differ: antspyx is `ants`).
PACKAGES = ("atlasflow", "torch", "antspyx", "snakemake", "nibabel", "numpy", "nilearn", "scipy")
CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """SHA-256 of a file, read in fixed-size chunks into one reused buffer (constant memory)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buffer):
                digest.update(view[:n])
    except OSError as exc:
        raise AtlasflowError(
            f"{path}: cannot be read for its checksum ({exc.strerror or exc})"
        ) from None
    return digest.hexdigest()


def hash_files(paths: Iterable[str | os.PathLike], threads: int = 1) -> dict[str, dict]:
    """``{path: {"sha256", "bytes"}}`` for every distinct path.

    hashlib releases the GIL on large buffers, so threads overlap reading and hashing on big cohorts.
    """
    unique = list(dict.fromkeys(str(p) for p in paths))

    def one(path: str) -> tuple[str, dict]:
        digest = sha256_file(path)
        return path, {"sha256": digest, "bytes": Path(path).stat().st_size}

    if threads > 1 and len(unique) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return dict(pool.map(one, unique))
    return dict(map(one, unique))


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None when absent) and of Python itself."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def _git(directory: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(directory), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(directory: str | os.PathLike) -> str | None:
    """Commit of the git checkout holding the workflow's Snakefile; None outside git.

    Asking whether the Snakefile is tracked (not just whether some parent folder is a repository)
    keeps a workflow unpacked inside an unrelated repository from reporting that one's revision.
    """
    directory = Path(directory)
    if (
        not (directory / "Snakefile").exists()
        or _git(directory, "ls-files", "--error-unmatch", "Snakefile") is None
    ):
        return None
    return _git(directory, "rev-parse", "HEAD")


def git_revision(directory: str | os.PathLike) -> dict | None:
    """``{"commit", "dirty"}`` of the workflow checkout (dirty: tracked files differ from the commit)."""
    commit = git_commit(directory)
    if commit is None:
        return None
    status = _git(Path(directory), "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def platform_info() -> dict:
    uname = platform.uname()
    return {
        "system": uname.system,
        "release": uname.release,
        "machine": uname.machine,
        "node": uname.node,
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable,
        "cpu_count": os.cpu_count(),
    }


def cohort_files(table) -> list[dict]:
    """One entry per (scan, role, file) of a cohort table (``workflow.resolve_cohort`` columns)."""
    files = []
    for row in table.itertuples(index=False):
        for role in IMAGE_COLUMNS:
            path = getattr(row, role, "")
            if isinstance(path, str) and path:
                files.append(
                    {"subject": row.subject, "session": row.session, "role": role, "path": path}
                )
    return files


def model_in_use(config: dict, shipped: str | os.PathLike | None) -> Path | None:
    """The weights file the registrations load: the configured one, the shipped one, or none (ANTs)."""
    registration = config.get("registration", {})
    if registration.get("model"):
        return Path(registration["model"])
    if registration.get("backend", "deep") == "deep" and shipped is not None:
        return Path(shipped)
    return None


def _model_record(path: Path, hashes: dict[str, dict]) -> dict:
    record = {"path": str(path), **hashes[str(path)]}
    sidecar = path.with_name(path.name.removesuffix(".safetensors") + ".json")
    if sidecar.exists():
        try:
            claimed = json.loads(sidecar.read_text()).get("sha256")
        except (OSError, json.JSONDecodeError, AttributeError):
            claimed = None
        record["sidecar"] = str(sidecar)
        record["sidecar_sha256_matches"] = claimed == record["sha256"]
    return record


def build_provenance(
    config: dict,
    workflow_dir: str | os.PathLike,
    table,
    model: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    threads: int = 1,
    notes: CohortNotes | None = None,
) -> dict:
    """The provenance record of a run over the cohort ``table`` with ``config``.

    ``model`` is the weights file in use (None: no network, e.g. the ANTs backend); ``manifest``
    the cohort's CSV file, if it has one; ``notes`` what reading a BIDS cohort chose and skipped.
    Raises AtlasflowError naming a missing or unreadable file.
    """
    files = cohort_files(table)
    template = [
        config[k] for k in ("template", "template_mask") if config.get(k) and config[k] != "mni152"
    ]
    cohort = config.get("cohort")
    manifest = str(manifest) if manifest else None
    extra = [p for p in (*template, manifest, model) if p]
    for path in [f["path"] for f in files] + [str(p) for p in extra]:
        if not Path(path).is_file():
            raise AtlasflowError(f"{path}: input file not found; cannot record its checksum")
    hashes = hash_files([f["path"] for f in files] + [str(p) for p in extra], threads=threads)
    versions = package_versions()
    return {
        "format": FORMAT,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "atlasflow_version": versions["atlasflow"],
        "packages": versions,
        "platform": platform_info(),
        "workflow": {
            "directory": str(Path(workflow_dir).resolve()),
            "git": git_revision(workflow_dir),
        },
        "working_directory": os.getcwd(),
        "config": config,
        "cohort": {
            "source": cohort if cohort else "demo",
            "manifest": {"path": manifest, **hashes[str(manifest)]} if manifest else None,
            "scans": int(len(table)),
            "files": [{**f, **hashes[f["path"]]} for f in files],
            "choices": [c.as_dict() for c in notes.choices] if notes else [],
            "skipped": [{"path": p, "reason": r} for p, r in notes.skipped] if notes else [],
        },
        "template": {
            "source": config.get("template", "mni152"),
            "files": [{"path": p, **hashes[str(p)]} for p in template],
        },
        "model": _model_record(Path(model), hashes) if model else None,
    }


#: BIDS version whose derivatives conventions the outputs follow.
BIDS_VERSION = "1.9.0"
SKIPPED_COLUMNS = ("path", "status", "reason")


def dataset_description(source: str | os.PathLike | None, version: str | None) -> dict:
    """The BIDS-derivatives ``dataset_description.json`` of an output folder made by atlasflow
    ``version`` from the cohort ``source`` (a BIDS folder is named as the source dataset, with
    its DOI when its own description gives one). Holds no time: reruns write the same bytes."""
    description: dict = {
        "Name": "atlasflow",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "atlasflow",
                "Version": version or "unknown",
                "Description": "preprocessing, deep registration, population atlas and "
                "longitudinal change maps of brain MRI",
            }
        ],
    }
    if source is not None and Path(source).is_dir():
        origin: dict = {"URL": Path(source).resolve().as_uri()}
        try:
            own = json.loads((Path(source) / "dataset_description.json").read_text("utf-8"))
        except (OSError, ValueError):
            own = {}
        if isinstance(own, dict) and isinstance(own.get("DatasetDOI"), str):
            origin["DOI"] = own["DatasetDOI"]
        description["SourceDatasets"] = [origin]
    return description


def write_skipped_inputs(path: str | os.PathLike, rows: Iterable[Sequence[str]]) -> Path:
    """Write (path, status, reason) rows as a TSV with a header (header only when none)."""
    from atlasflow.io.atomic import atomic_write_text

    def clean(value: str) -> str:
        return " ".join(str(value).split())  # no tab or newline inside a cell

    lines = ["\t".join(SKIPPED_COLUMNS)]
    lines += ["\t".join(clean(v) for v in row) for row in rows]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def write_json(path: str | os.PathLike, record: dict) -> Path:
    """Write a JSON document atomically, sorted and indented."""
    from atlasflow.io.atomic import atomic_write_text

    return atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def write_provenance(path: str | os.PathLike, record: dict) -> Path:
    """Write the record atomically as sorted, indented JSON."""
    return write_json(path, record)


def add_provenance_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``atlasflow provenance``."""
    parser.description = (
        "``atlasflow provenance --config-json JSON --workflow-dir DIR [--output FILE] "
        "[--description FILE] [--skipped FILE] [--model W] [--threads N]``."
    )
    parser.add_argument(
        "--config-json", required=True, help="the effective workflow config, as JSON text"
    )
    parser.add_argument(
        "--workflow-dir",
        required=True,
        help="folder of the Snakefile (git revision, relative cohort)",
    )
    parser.add_argument("--output", default=None, help="the provenance record (JSON)")
    parser.add_argument(
        "--description", default=None, help="write the BIDS-derivatives dataset_description.json"
    )
    parser.add_argument(
        "--skipped", default=None, help="write the skipped and passed-over inputs (TSV)"
    )
    parser.add_argument("--model", default=None, help="weights in use (default: from the config)")
    parser.add_argument("--threads", type=int, default=1, help="files hashed at once")


def run_provenance(args: argparse.Namespace) -> int:
    """``atlasflow provenance``: write the run's provenance record, the output folder's
    ``dataset_description.json`` and the skipped-inputs table (each when asked for)."""
    from atlasflow.cohort.planning import SHIPPED_MODEL, cohort_source, resolve_cohort

    try:
        config = json.loads(args.config_json)
    except json.JSONDecodeError as exc:
        raise AtlasflowError(f"--config-json: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AtlasflowError("--config-json: expected a JSON object")
    if not (args.output or args.description or args.skipped):
        raise AtlasflowError("nothing to write: give --output, --description or --skipped")
    workdir = Path(args.workflow_dir)
    notes = CohortNotes()
    table = resolve_cohort(config, workdir=workdir, check_data=False, notes=notes)
    source = cohort_source(config, workdir)
    if args.skipped:
        write_skipped_inputs(args.skipped, notes.skipped_rows())
        print(f"{len(notes.skipped_rows())} inputs skipped or passed over -> {args.skipped}")
    if args.description:
        write_json(args.description, dataset_description(source, package_versions()["atlasflow"]))
        print(f"dataset description -> {args.description}")
    if not args.output:
        return 0
    model = args.model or model_in_use(config, SHIPPED_MODEL)
    record = build_provenance(
        config,
        workdir,
        table,
        model=model,
        manifest=source if source is not None and source.is_file() else None,
        threads=max(1, args.threads),
        notes=notes,
    )
    write_provenance(args.output, record)
    print(
        f"provenance of {record['cohort']['scans']} scans ({len(record['cohort']['files'])} files) -> {args.output}"
    )
    return 0
