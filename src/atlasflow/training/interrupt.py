"""Stopping a training run cleanly: SIGINT (Ctrl-C) and SIGTERM (``kill``, a cluster's time limit).

Owns :class:`StopOnSignal`, which turns the first SIGINT or SIGTERM into a request that the
training loop sees between steps (it then writes the weights and the training state and raises
:class:`TrainingStopped`), so a stopped run loses nothing and continues with ``--resume``. A
second signal stops at once, as it would have without the handler; every file is written
atomically, so that never leaves a half-written one (only the steps since the last state).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """A run stopped by a signal after writing its state; ``exit_code``: 128 + the signal."""

    def __init__(self, signum: int, state: Path, where: str) -> None:
        self.signum, self.state, self.where = signum, state, where
        self.exit_code = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after {where}; state in {state}"
        )


class StopOnSignal:
    """While active (``with``), the first SIGINT/SIGTERM sets :attr:`signum` instead of stopping
    the process. Only the main thread can handle signals; elsewhere it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # No printing here: a handler that writes to a stream the loop is writing to can fail.
        if self.signum is None:
            self.signum = signum
            return
        self.__exit__()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)
