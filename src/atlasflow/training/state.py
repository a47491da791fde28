"""Training-state files: what ``atlasflow train --resume`` needs to continue a stopped run.

Owns the on-disk format of a training state and what must match to resume from it. One
safetensors file beside the weights (:func:`state_path`: ``<out>.train-state.safetensors``),
written atomically (a crash mid-write leaves the previous state), read without unpickling:

* tensors: both networks' weights (``model.*``), the optimisers' moments (``optim.<phase>.<i>.<key>``)
  and the random generators' states (``rng.torch``: torch's CPU generator, which built the
  networks; ``rng.pairs``: the synthetic pair generator, the only one training draws from;
  ``rng.cuda.<i>``: each CUDA device's, when the run used CUDA);
* the metadata entry ``state`` (JSON): the progress of each phase, the settings and architecture
  the run started with, a fingerprint of its label maps, the optimisers' hyper-parameters, numpy's
  and Python's global random states, the held-out validation history and the *segments* (one per
  process that trained: device, threads, steps, seconds, how it ended).

Another device: every tensor is read on the CPU; :func:`to_device` moves weights and moments to
the training device (random states and step counters stay on the CPU, where torch's
``set_rng_state`` functions and a non-capturable Adam want them) and :func:`restore_optimiser`
gives each moment its parameter's device, dtype and layout.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from atlasflow.errors import AtlasflowError
from atlasflow.io.atomic import atomic_file

FORMAT = "atlasflow-train-state-v1"

#: Settings a resumed run may change: how long and how it runs, not what it learns. The label
#: folder may move (another machine) but its maps must be the same (the data fingerprint).
OVERRIDABLE = (
    "affine_steps",
    "flow_steps",
    "time_budget",
    "checkpoint_every",
    "log_every",
    "threads",
    "device",
    "label_dir",
    "cache_dir",
)
#: Settings of :class:`~atlasflow.training.train.TrainSettings` that have no flag.
NOT_FLAGS = ("train_shape", "validation_pairs")


def state_path(out_path: str | os.PathLike) -> Path:
    """The training state written beside the weights ``out_path``."""
    out = Path(out_path)
    return out.with_name(out.name.removesuffix(".safetensors") + ".train-state.safetensors")


@dataclass
class Progress:
    """Steps done in each phase; the affine phase is finished once the flow phase may start."""

    affine_done: int = 0
    affine_finished: bool = False
    flow_done: int = 0


@dataclass
class TrainState:
    """One training state, as saved and as loaded (tensors on the device asked for)."""

    progress: Progress
    settings: dict  # TrainSettings as JSON values (train.settings_to_dict)
    config: dict  # NetConfig.to_dict()
    data: str  # LabelSet.fingerprint() of all the label maps (training and held out)
    model: dict[str, torch.Tensor]
    optimisers: dict[str, dict | None]  # torch state_dict() of each phase's optimiser
    rng: dict  # capture_random_state()
    validation: dict = field(default_factory=dict)
    segments: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------ random states


def capture_random_state(pairs: torch.Generator) -> dict:
    """Every random state a training run has: torch (CPU and, once used, each CUDA device),
    numpy's and Python's global generators, and the pair generator ``pairs``."""
    cuda = (
        [s.clone() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else []
    )
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "pairs": pairs.get_state(),
        "cuda": cuda,
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }


def restore_random_state(rng: dict, pairs: torch.Generator) -> None:
    """Set every generator :func:`capture_random_state` saw back to the state in ``rng``. CUDA
    states are restored on as many devices as both runs have (a run resumed on another kind of
    device starts its CUDA generators from the seed; training draws nothing from them)."""
    torch.set_rng_state(rng["torch"])
    pairs.set_state(rng["pairs"])
    if rng["cuda"] and torch.cuda.is_available():
        for index, state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.array(keys, np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ------------------------------------------------------------------------------ devices


def _stays_on_cpu(name: str) -> bool:
    """Random states, and optimiser step counters (torch keeps those on the CPU unless the
    optimiser is capturable, and moves them itself then)."""
    return name.startswith("rng.") or (name.startswith("optim.") and name.endswith(".step"))


def to_device(tensors: dict[str, torch.Tensor], device: str | torch.device) -> dict:
    """``map_location``: weights and optimiser moments onto ``device``; random states and step
    counters stay on the CPU, where a run that never stopped has them."""
    return {
        name: tensor if _stays_on_cpu(name) else tensor.to(device)
        for name, tensor in tensors.items()
    }


def restore_optimiser(opt: torch.optim.Optimizer, saved: dict) -> None:
    """Load ``saved`` (a state_dict) into ``opt``, every moment on its parameter's device, with its
    dtype and memory layout (the networks are channels-last), as a run that never stopped has it.
    Step counters stay where torch keeps them (on the CPU unless the optimiser is capturable)."""
    opt.load_state_dict(saved)
    for group in opt.param_groups:
        for param in group["params"]:
            moments = opt.state.get(param, {})
            for key, value in moments.items():
                if key != "step" and torch.is_tensor(value) and value.shape == param.shape:
                    moments[key] = torch.empty_like(param).copy_(value)


# ------------------------------------------------------------------------------ the file


def _optimiser_parts(name: str, saved: dict | None) -> tuple[dict, dict | None]:
    """(tensors, JSON) of one optimiser state_dict: tensors named ``optim.<name>.<i>.<key>``."""
    if saved is None:
        return {}, None
    tensors, scalars = {}, {}
    for index, moments in saved["state"].items():
        for key, value in moments.items():
            if torch.is_tensor(value):
                tensors[f"optim.{name}.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": saved["param_groups"], "scalars": scalars}


def _optimiser_from_parts(name: str, tensors: dict, meta: dict | None) -> dict | None:
    if meta is None:
        return None
    state: dict[int, dict] = {}
    prefix = f"optim.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, _, moment = key[len(prefix) :].partition(".")
            state.setdefault(int(index), {})[moment] = value
    for index, scalars in meta["scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    # JSON turned tuples (betas) into lists; "params" is the one list of a group.
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def save_state(path: str | os.PathLike, state: TrainState) -> Path:
    """Write ``state`` to ``path`` atomically (tensors copied to the CPU first)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in state.model.items()}
    optimisers = {}
    for name, saved in state.optimisers.items():
        parts, optimisers[name] = _optimiser_parts(name, saved)
        tensors.update(parts)
    rng = state.rng
    tensors["rng.torch"], tensors["rng.pairs"] = rng["torch"], rng["pairs"]
    tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(rng["cuda"])})
    meta = {
        "format": FORMAT,
        "progress": vars(state.progress),
        "settings": state.settings,
        "config": state.config,
        "data": state.data,
        "optimisers": optimisers,
        "numpy_random": rng["numpy"],
        "python_random": rng["python"],
        "cuda_devices": len(rng["cuda"]),
        "validation": state.validation,
        "segments": state.segments,
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    path = Path(path)
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT, "state": json.dumps(meta)})
    return path


def read_state_meta(path: str | os.PathLike) -> dict:
    """The JSON part of the training state ``path`` (no tensors are read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise AtlasflowError(
            f"{path}: no training state here (one is written every --checkpoint-every steps "
            "and when a run stops)"
        )
    try:
        with safe_open(str(path), "pt") as fh:
            header = fh.metadata() or {}
        meta = json.loads(header.get("state", "null"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AtlasflowError(f"{path}: not a readable training state ({exc})") from None
    if header.get("format") != FORMAT or not isinstance(meta, dict):
        raise AtlasflowError(
            f"{path}: not an atlasflow training state (format {header.get('format')!r})"
        )
    return meta


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> TrainState:
    """Read the training state ``path``; weights and moments on ``device`` (:func:`to_device`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_state_meta(path)
    try:
        tensors = to_device(load_file(str(path), device="cpu"), device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AtlasflowError(f"{path}: not a readable training state ({exc})") from None
    rng = {
        "torch": tensors["rng.torch"],
        "pairs": tensors["rng.pairs"],
        "cuda": [tensors[f"rng.cuda.{i}"] for i in range(meta["cuda_devices"])],
        "numpy": meta["numpy_random"],
        "python": meta["python_random"],
    }
    return TrainState(
        progress=Progress(**meta["progress"]),
        settings=meta["settings"],
        config=meta["config"],
        data=meta["data"],
        model={k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")},
        optimisers={
            name: _optimiser_from_parts(name, tensors, part)
            for name, part in meta["optimisers"].items()
        },
        rng=rng,
        validation=meta["validation"],
        segments=meta["segments"],
    )


# ------------------------------------------------------------------------------ resuming


def _setting_name(key: str) -> str:
    return key if key in NOT_FLAGS else "--" + key.replace("_", "-")


def check_resume(
    path: str | os.PathLike, state: TrainState, settings: dict, config: dict | None
) -> None:
    """Refuse, in one line naming the setting, a resume that would not continue the same run:
    a setting outside :data:`OVERRIDABLE` that differs, another architecture, or a schedule below
    the steps already done. (The label maps are checked once read: :func:`check_data`.)"""
    recorded, progress = state.settings, state.progress
    for key, value in settings.items():
        if key in OVERRIDABLE or key not in recorded or recorded[key] == value:
            continue
        changeable = ", ".join(_setting_name(k) for k in OVERRIDABLE)
        raise AtlasflowError(
            f"{path}: {_setting_name(key)} is {value!r} here but {recorded[key]!r} in the training "
            f"state; a resumed run may change only {changeable} (start a new run with --init for "
            "other settings)"
        )
    if config is not None and config != state.config:
        raise AtlasflowError(f"{path}: the training state holds another network architecture")
    if settings["flow_steps"] < progress.flow_done:
        raise AtlasflowError(
            f"{path}: --flow-steps {settings['flow_steps']} is below the {progress.flow_done} flow "
            "steps already done"
        )
    if progress.affine_finished and settings["affine_steps"] != recorded["affine_steps"]:
        raise AtlasflowError(
            f"{path}: the affine phase already finished (after {progress.affine_done} steps); "
            f"--affine-steps cannot change now (it was {recorded['affine_steps']})"
        )
    if settings["affine_steps"] < progress.affine_done:
        raise AtlasflowError(
            f"{path}: --affine-steps {settings['affine_steps']} is below the "
            f"{progress.affine_done} affine steps already done"
        )


def check_data(path: str | os.PathLike, state: TrainState, data: str, label_dir: object) -> None:
    """Refuse label maps (fingerprint ``data``, read from ``label_dir``) other than the state's."""
    if data != state.data:
        raise AtlasflowError(
            f"{path}: the label maps ({label_dir or 'nilearn MNI152'}) differ from those the "
            "training state trained on; give --label-dir the same maps"
        )
