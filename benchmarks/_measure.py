"""Shared helpers of the benchmarks: run a command, report its wall time and peak RSS, print a table."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stderr: str


def measure(
    command: list[str], cwd: str | Path | None = None, env: dict | None = None, stdout: Path | None = None
) -> Run:
    """Wall time and peak RSS of ``command`` and every descendant it waited for.

    os.wait4 returns the child's rusage, whose ru_maxrss (KiB on Linux) covers the child and the
    processes it reaped: the largest resident set in the process tree, not their sum.
    """
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    start = time.perf_counter()
    out = open(stdout, "w") if stdout else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(command, cwd=cwd, env=environment, stdout=out, stderr=subprocess.PIPE, text=True)
    # Drain stderr before waiting, so a chatty child cannot block on a full pipe.
    stderr = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if stdout:
        out.close()
    return Run(seconds, usage.ru_maxrss / 1024, proc.returncode, stderr)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def emit_table(text: str, path: str | None) -> None:
    """Print a benchmark's Markdown result and, when ``path`` is given, also write it there."""
    print("\n" + text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
