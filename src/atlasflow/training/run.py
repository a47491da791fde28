"""One process's part of a training run: progress, optimisers, checkpoints and segments.

Owns :class:`TrainingRun`, which the loops of :func:`atlasflow.training.train.train` step: the
progress of each phase, each phase's optimiser (new, or continued from a training state), the
files written at a checkpoint (weights + sidecar, then the training state beside them) and this
process's *segment* of the run (device, threads, steps, seconds, how it ended), which the sidecar
and the state list after those of the processes before it, so both say what trained where.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import torch

from atlasflow.nn.model_io import save_model
from atlasflow.nn.networks import RegistrationModel
from atlasflow.training.interrupt import StopOnSignal, TrainingStopped
from atlasflow.training.pairs import PairGenerator
from atlasflow.training.state import (
    Progress,
    TrainState,
    capture_random_state,
    restore_optimiser,
    save_state,
    state_path,
)

PHASES = ("affine", "flow")


class Validation(Protocol):
    """Scores the held-out pairs (``validate(model, tag)``), keeping the history in ``results``."""

    results: dict

    def __call__(self, model: RegistrationModel, tag: str) -> None: ...


def seconds_by_device(segments: list[dict]) -> dict[str, float]:
    """Training seconds per device kind ('cpu', 'cuda') over ``segments``."""
    total: dict[str, float] = {}
    for segment in segments:
        total[segment["device"]] = round(total.get(segment["device"], 0.0) + segment["seconds"], 1)
    return total


class TrainingRun:
    """The state of a run as this process trains it.

    ``hyper`` and ``settings`` are what the sidecar and the training state
    record; ``data`` the label maps' fingerprint; ``state`` the training state continued, if any.
    """

    def __init__(
        self,
        out_path: str | os.PathLike,
        model: RegistrationModel,
        generator: PairGenerator,
        validate: Validation,
        *,
        lr: float,
        hyper: dict,
        settings: dict,
        data: str,
        state: TrainState | None,
    ) -> None:
        self.out, self.state_file = Path(out_path), state_path(out_path)
        self.model, self.generator, self.validate = model, generator, validate
        self.lr, self.hyper, self.settings, self.data = lr, hyper, settings, data
        self.device = next(model.parameters()).device
        self.progress = state.progress if state else Progress()
        self.saved_optimisers = dict(state.optimisers) if state else dict.fromkeys(PHASES)
        self.optimisers: dict[str, torch.optim.Optimizer] = {}
        self.segments = list(state.segments) if state else []
        self.before = sum(segment["seconds"] for segment in self.segments)
        cuda = self.device.type == "cuda"
        self.segment = {
            "device": self.device.type,
            "device_name": torch.cuda.get_device_name(self.device) if cuda else "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "affine_steps": [self.progress.affine_done, self.progress.affine_done],
            "flow_steps": [self.progress.flow_done, self.progress.flow_done],
            "seconds": 0.0,
            "ended": "running",
        }
        self.budget_spent = False  # set when the time budget ended a phase
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of training of the whole run, earlier segments included."""
        return self.before + time.perf_counter() - self.start

    def optimiser(self, phase: str, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Adam:
        """The optimiser of ``phase``: new, or continued as the training state left it."""
        opt = torch.optim.Adam(parameters, lr=self.lr)
        if self.saved_optimisers.get(phase) is not None:
            restore_optimiser(opt, self.saved_optimisers[phase])
        self.optimisers[phase] = opt
        return opt

    def checkpoint(self, tag: str) -> None:
        """Score the held-out pairs, then write the weights and the training state."""
        self.validate(self.model, tag)
        self.save("running")

    def stop_if_asked(self, stop: StopOnSignal, phase: str) -> None:
        """Between two steps, after a SIGINT/SIGTERM: save, then raise :class:`TrainingStopped`."""
        if stop.signum is None:
            return
        p = self.progress
        where = f"{phase} step {p.affine_done if phase == 'affine' else p.flow_done}"
        self.save(f"stopped by {signal.Signals(stop.signum).name}")
        raise TrainingStopped(stop.signum, self.state_file, where)

    def save(self, ended: str) -> None:
        """Weights + sidecar, then the training state (each file atomic); ``ended``: how this
        segment ended so far ('running' at a checkpoint)."""
        p, segment = self.progress, self.segment
        segment["affine_steps"][1], segment["flow_steps"][1] = p.affine_done, p.flow_done
        segment["seconds"] = round(time.perf_counter() - self.start, 1)
        segment["ended"] = ended
        segments = [*self.segments, segment]
        by_device = seconds_by_device(segments)
        record = {
            **self.hyper,
            "completed_affine_steps": p.affine_done,
            "completed_flow_steps": p.flow_done,
            "seconds": round(sum(by_device.values()), 1),
            "seconds_by_device": by_device,
            "segments": segments,
            "validation": self.validate.results,
        }
        save_model(self.model, self.out, record)
        optimisers = {
            phase: self.optimisers[phase].state_dict()
            if phase in self.optimisers
            else self.saved_optimisers.get(phase)
            for phase in PHASES
        }
        state = TrainState(
            progress=p,
            settings=self.settings,
            config=self.model.config.to_dict(),
            data=self.data,
            model=self.model.state_dict(),
            optimisers=optimisers,
            rng=capture_random_state(self.generator.gen),
            validation=self.validate.results,
            segments=segments,
        )
        save_state(self.state_file, state)
