"""Model files: weights as ``safetensors`` plus a checked JSON sidecar.

Owns the on-disk format of a :class:`~atlasflow.nn.networks.RegistrationModel`: the weights file,
and next to it a JSON sidecar with the architecture (:class:`~atlasflow.nn.networks.NetConfig`),
the training hyper-parameters and the SHA-256 and size of the weights. Loading refuses any file
whose hash, size or tensor set does not match (tampered or truncated files raise
:class:`~atlasflow.errors.AtlasflowError`); nothing is ever unpickled.

Both the engine (loading) and training (saving) use it, so neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from atlasflow.errors import AtlasflowError
from atlasflow.io.atomic import atomic_file, atomic_write_text
from atlasflow.nn.networks import NetConfig, RegistrationModel

FORMAT = "atlasflow-registration-v2"
#: Version 1 files (pooled affine network, no ``affine_kind`` in the config) still load.
READABLE_FORMATS = ("atlasflow-registration-v1", FORMAT)


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of the weights file ``path``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(
    model: RegistrationModel, path: str | os.PathLike, hyper: dict | None = None
) -> Path:
    """Write ``path`` (safetensors) and its JSON sidecar atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        sha = _sha256(Path(tmp))
        size = os.path.getsize(tmp)
    sidecar = {
        "format": FORMAT,
        "weights": path.name,
        "sha256": sha,
        "bytes": size,
        "config": model.config.to_dict(),
        "hyper": hyper or {},
    }
    atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(path: str | os.PathLike) -> dict:
    """The sidecar of the weights file ``path``, checked to be an atlasflow model sidecar."""
    side = sidecar_path(path)
    if not side.exists():
        raise AtlasflowError(
            f"{path}: model sidecar {side.name} is missing (architecture and checksum)"
        )
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AtlasflowError(f"{side}: not a readable model sidecar ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        raise AtlasflowError(
            f"{side}: not an atlasflow model sidecar (format {meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    return meta


def load_model(path: str | os.PathLike, device: str = "cpu") -> tuple[RegistrationModel, dict]:
    """Load weights + sidecar; any mismatch (hash, size, tensors) raises AtlasflowError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise AtlasflowError(f"{path}: model weights not found")
    meta = read_sidecar(path)
    if path.stat().st_size != meta.get("bytes"):
        raise AtlasflowError(
            f"{path}: size {path.stat().st_size} bytes differs from the sidecar ({meta.get('bytes')}); truncated or replaced"
        )
    if _sha256(path) != meta.get("sha256"):
        raise AtlasflowError(
            f"{path}: SHA-256 does not match its sidecar; the weights were modified"
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AtlasflowError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        config = NetConfig.from_dict(meta.get("config", {}))
    except (TypeError, ValueError) as exc:
        raise AtlasflowError(f"{path}: sidecar describes an unknown architecture ({exc})") from None
    model = RegistrationModel(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise AtlasflowError(
            f"{path}: weights do not fit the architecture in the sidecar ({exc})"
        ) from None
    model.to(device).eval()
    return model, meta
