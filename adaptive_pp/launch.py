"""launch(fn, nprocs): run ``fn`` in ``nprocs`` local stage processes with torchrun's env vars."""

from __future__ import annotations

import io
import os
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

GRACE_S = 10.0


@dataclass(frozen=True)
class RankFailure:
    """How one rank failed."""

    rank: int
    kind: str
    message: str
    traceback: str
    secondary: bool


class LaunchError(RuntimeError):
    """One or more ranks failed; the message leads with the root cause."""

    def __init__(self, failures: list[RankFailure]) -> None:
        self.failures = sorted(failures, key=lambda f: (f.secondary, f.rank))
        root = self.failures[0]
        others = "".join(
            f"\n  rank {f.rank}: {f.kind}: {f.message.splitlines()[0] if f.message else ''}"
            for f in self.failures[1:]
        )
        super().__init__(
            f"rank {root.rank} failed: {root.kind}: {root.message}"
            + (f"\nthen{others}" if others else "")
        )
        self.root = root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    fn: Callable[..., Any],
    rank: int,
    nprocs: int,
    port: int,
    args: tuple[Any, ...],
    results: Any,
    threads: int,
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    code = 0
    try:
        buf = io.BytesIO()
        torch.save(fn(*args), buf)  # by value: shared-memory handles die with this process
        results.put((rank, True, buf.getvalue()))
    except BaseException as exc:
        from .errors import PeerGone

        code = 1
        results.put(
            (
                rank,
                False,
                RankFailure(
                    rank,
                    type(exc).__name__,
                    str(exc),
                    traceback.format_exc(),
                    isinstance(exc, PeerGone),
                ),
            )
        )
    results.close()
    results.join_thread()
    # Leave at once: a process group whose peers died can block interpreter shutdown.
    os._exit(code)


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    threads: int = 1,
    timeout: float | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``nprocs`` spawned ranks; return their results in rank order.

    ``fn`` must be importable (defined at module level). Each rank gets RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT as under torchrun and ``threads`` torch threads.
    If a rank fails, the others get ``GRACE_S`` seconds to exit, then are killed, and a
    LaunchError leads with the root cause (a peer's "stage N is gone" comes after it).
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, nprocs, port, args, results, threads))
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    failures: dict[int, RankFailure] = {}
    first_failure: float | None = None
    started = time.monotonic()
    try:
        while len(out) + len(failures) < nprocs:
            try:
                rank, ok, value = results.get(timeout=0.1)
                if ok:
                    out[rank] = torch.load(io.BytesIO(value), weights_only=False)
                else:
                    failures[rank] = value
            except queue.Empty:
                for r, p in enumerate(procs):
                    if r not in out and r not in failures and p.exitcode is not None:
                        time.sleep(0.2)  # its last message may still be in the pipe
                        if results.empty():
                            failures[r] = _died(r, p.exitcode)
            now = time.monotonic()
            if failures and first_failure is None:
                first_failure = now
            if first_failure is not None and now - first_failure > GRACE_S:
                for r in range(nprocs):
                    if r not in out and r not in failures:
                        failures[r] = RankFailure(
                            r,
                            "Timeout",
                            f"still running {GRACE_S:.0f} s after a failure; killed",
                            "",
                            True,
                        )
                break
            if timeout is not None and now - started > timeout:
                for r in range(nprocs):
                    if r not in out and r not in failures:
                        failures[r] = RankFailure(
                            r, "Timeout", f"launch timeout of {timeout:.0f} s exceeded", "", False
                        )
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    if failures:
        raise LaunchError(list(failures.values()))
    return [out[r] for r in range(nprocs)]


def _died(rank: int, exitcode: int) -> RankFailure:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        return RankFailure(
            rank, "Died", f"stage {rank} (rank {rank}) died (signal {name})", "", False
        )
    return RankFailure(
        rank, "Died", f"stage {rank} (rank {rank}) exited with code {exitcode}", "", False
    )
