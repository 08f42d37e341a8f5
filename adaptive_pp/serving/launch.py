"""Start every stage server of an export as its own local process, last stage first.

Each process is ``python -m adaptive_pp.serving.server`` on a free port; a stage starts once
the next one has printed its address, so no port is guessed. ``StageProcesses`` is a context
manager that terminates them all (and can kill one, for failure tests).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .manifest import load_manifest
from .server import READY


class LaunchFailed(RuntimeError):
    """A stage server that exited or did not report ready in time."""


class StageProcesses:
    """The running stage servers: ``addresses[s]`` is stage s's ``host:port``."""

    def __init__(self, procs: Sequence[subprocess.Popen[str]], addresses: Sequence[str]) -> None:
        self.procs = list(procs)
        self.addresses = list(addresses)

    def kill(self, stage: int) -> None:
        """Kill stage ``stage``'s server (SIGKILL) and reap it."""
        proc = self.procs[stage]
        proc.kill()
        proc.wait(timeout=10)

    def close(self) -> None:
        """Terminate every server still running (SIGTERM, then SIGKILL after 5 s)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> StageProcesses:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _wait_ready(proc: subprocess.Popen[str], stage: int, timeout: float) -> str:
    """The address a starting stage prints; LaunchFailed if it exits or stays silent."""
    assert proc.stdout is not None
    prefix = READY.format(stage=stage, address="")
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:  # EOF: the process exited
            proc.wait(timeout=5)
            raise LaunchFailed(
                f"stage {stage} server exited with status {proc.returncode} before it was ready "
                "(its error is on stderr above)"
            )
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    proc.kill()
    raise LaunchFailed(f"stage {stage} server did not report ready within {timeout:.0f} s")


def launch_stages(
    export_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    threads: int = 1,
    delays_ms: Sequence[float] = (),
    timeout: float = 60.0,
) -> StageProcesses:
    """Start one server process per stage of ``export_dir``; returns once all are ready.

    ``delays_ms[s]`` adds that many ms to each of stage s's micro-batches (an emulated slow
    device). On failure the servers already started are terminated.
    """
    num = load_manifest(export_dir).num_stages
    procs: list[subprocess.Popen[str]] = []
    addresses: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for stage in reversed(range(num)):
            cmd = [sys.executable, "-m", "adaptive_pp.serving.server", str(export_dir)]
            cmd += ["--stage", str(stage), "--host", host, "--port", "0"]
            cmd += ["--threads", str(threads)]
            if stage < len(delays_ms):
                cmd += ["--delay-ms", str(delays_ms[stage])]
            if addresses:
                cmd += ["--next", addresses[0]]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
            procs.insert(0, proc)
            addresses.insert(0, _wait_ready(proc, stage, timeout))
    except BaseException:
        StageProcesses(procs, addresses).close()
        raise
    return StageProcesses(procs, addresses)
