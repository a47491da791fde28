"""Provenance of a workflow run: what the outputs were made from, in one JSON file.

Owns the provenance record written by the workflow's ``provenance`` rule (``atlasflow provenance``):
package versions, the effective configuration, SHA-256 of every cohort input (T1w, labels, tumour
and brain masks, the manifest itself), of a template given as a file and of the registration weights
in use, the git revision of the workflow, and the platform.

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
) -> dict:
    """The provenance record of a run over the cohort ``table`` with ``config``.

    ``model`` is the weights file in use (None: no network, e.g. the ANTs backend); ``manifest``
    the cohort's CSV file, if it has one. Raises AtlasflowError naming a missing or unreadable file.
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
        },
        "template": {
            "source": config.get("template", "mni152"),
            "files": [{"path": p, **hashes[str(p)]} for p in template],
        },
        "model": _model_record(Path(model), hashes) if model else None,
    }


def write_provenance(path: str | os.PathLike, record: dict) -> Path:
    """Write the record atomically as sorted, indented JSON."""
    from atlasflow.io.atomic import atomic_write_text

    return atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def add_provenance_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``atlasflow provenance``."""
    parser.description = (
        "``atlasflow provenance --config-json JSON --workflow-dir DIR --output FILE [--model W] "
        "[--threads N]``."
    )
    parser.add_argument(
        "--config-json", required=True, help="the effective workflow config, as JSON text"
    )
    parser.add_argument(
        "--workflow-dir",
        required=True,
        help="folder of the Snakefile (git revision, relative cohort)",
    )
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", default=None, help="weights in use (default: from the config)")
    parser.add_argument("--threads", type=int, default=1, help="files hashed at once")


def run_provenance(args: argparse.Namespace) -> int:
    """``atlasflow provenance``: write the run's provenance record."""
    from atlasflow.cohort.planning import SHIPPED_MODEL, cohort_source, resolve_cohort

    try:
        config = json.loads(args.config_json)
    except json.JSONDecodeError as exc:
        raise AtlasflowError(f"--config-json: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AtlasflowError("--config-json: expected a JSON object")
    workdir = Path(args.workflow_dir)
    table = resolve_cohort(config, workdir=workdir, check_data=False)
    source = cohort_source(config, workdir)
    model = args.model or model_in_use(config, SHIPPED_MODEL)
    record = build_provenance(
        config,
        workdir,
        table,
        model=model,
        manifest=source if source is not None and source.is_file() else None,
        threads=max(1, args.threads),
    )
    write_provenance(args.output, record)
    print(
        f"provenance of {record['cohort']['scans']} scans ({len(record['cohort']['files'])} files) -> {args.output}"
    )
    return 0
