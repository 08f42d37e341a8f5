"""launch(fn, nprocs): run ``fn`` in ``nprocs`` local stage processes with torchrun's env vars."""

from __future__ import annotations

import contextlib
import io
import os
import queue
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import reduction
from typing import Any

import torch
import torch.multiprocessing as mp

GRACE_S = 10.0
# How ranks start. "forkserver": each rank is forked from a server process that imported
# _PRELOAD once (at the first start in this process), so a rank starts in well under a second
# instead of importing torch for seconds of CPU; "spawn" where there is no forkserver.
START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
# Imports only: importing these starts no torch, OpenMP or gloo state (numpy's OpenBLAS starts
# a thread, which it stops and restarts around a fork itself). Not "__main__": the server must
# not run the parent's script. torch._dynamo: a process's first optimizer imports it
# (torch.optim's _disable_dynamo), 2.0-2.7 s of CPU per rank otherwise; with it here a 4-rank
# pool's start and first Pipeline take 7.1 s instead of 10.3 (2-core CPU).
_PRELOAD = (
    "torch",
    "torch.distributed",
    "torch._dynamo",
    "adaptive_pp.runtime.launch",
    "adaptive_pp.runtime.pipeline",
    "adaptive_pp.observability.otel",
)
# torchrun's variables besides those _serve sets: a spawned rank of one host must not inherit
# its parent's node count, agent store or restart count (it would wait on that store).
_INHERITED_PREFIXES = ("GROUP_", "ROLE_", "TORCHELASTIC_")
# gloo's words for a peer that went away: such an error follows from another rank's failure.
_PEER_GONE_MARKS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


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
        # A rank that died without a word (killed) is the likeliest root cause.
        self.failures = sorted(failures, key=lambda f: (f.secondary, f.kind != "Died", f.rank))
        root = self.failures[0]
        others = "".join(
            f"\n  rank {f.rank}: {f.kind}: {f.message.splitlines()[0] if f.message else ''}"
            for f in self.failures[1:]
        )
        super().__init__(
            f"rank {root.rank} failed: {root.kind}: {root.message}"
            + (f"\nthen{others}" if others else "")
            + _where(root)
        )
        self.root = root


def _where(failure: RankFailure, lines: int = 40) -> str:
    """The failed rank's traceback (its last lines), so a log shows where it raised."""
    tail = failure.traceback.rstrip().splitlines()[-lines:]
    if not tail:
        return ""
    return f"\nrank {failure.rank}'s traceback:\n" + "\n".join("  " + t for t in tail)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(rank: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[int, bool, Any]:
    try:
        buf = io.BytesIO()
        torch.save(fn(*args), buf)  # by value: shared-memory handles die with this process
        return rank, True, buf.getvalue()
    except BaseException as exc:
        from ..core.errors import PeerGone

        text = str(exc)
        # Raised because another rank failed: that rank's error is the root cause.
        secondary = (
            isinstance(exc, PeerGone)
            or bool(getattr(exc, "remote", False))
            or any(m in text for m in _PEER_GONE_MARKS)
        )
        failure = RankFailure(rank, type(exc).__name__, text, traceback.format_exc(), secondary)
        return rank, False, failure


class _Inherited:
    """What a spawned rank takes from its parent at its start and a forkserver's child would take
    from the server (as they were when the server started): the environment, stdout and stderr
    (pytest's capfd sees the ranks' output) and the CPU priority (tests/conftest.py's nice)."""

    def __init__(self, env: dict[str, str], priority: int, fds: dict[int, Any]) -> None:
        self.env = env
        self.priority = priority
        self.fds = fds  # target fd -> an fd here or, once sent, a handle to detach() one

    @classmethod
    def here(cls) -> _Inherited:
        """This process's, now."""
        fds: dict[int, Any] = {}
        for fd in (1, 2):
            try:
                os.fstat(fd)
                fds[fd] = fd
            except OSError:
                pass  # closed here: the rank keeps what it has
        return cls(dict(os.environ), os.getpriority(os.PRIO_PROCESS, 0), fds)

    def __reduce__(self) -> tuple[Any, ...]:
        # Called as the Process is pickled for its start: DupFd sends each fd with the child.
        sent = {t: reduction.DupFd(fd) if isinstance(fd, int) else fd for t, fd in self.fds.items()}
        return (_Inherited, (self.env, self.priority, sent))

    def apply(self) -> None:
        """In the rank, before anything else."""
        os.environ.clear()
        os.environ.update(self.env)
        if os.getpriority(os.PRIO_PROCESS, 0) != self.priority:
            # An unprivileged rank cannot raise its priority over the server's: it stays lower.
            with contextlib.suppress(PermissionError):
                os.setpriority(os.PRIO_PROCESS, 0, self.priority)
        for target, handle in self.fds.items():
            fd = handle if isinstance(handle, int) else handle.detach()
            if fd != target:
                (sys.stdout if target == 1 else sys.stderr).flush()
                os.dup2(fd, target)
                os.close(fd)


def _context(method: str | None) -> Any:
    method = method or START_METHOD
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(_PRELOAD))  # no effect once this process's server runs
    return ctx


def _serve(
    rank: int,
    nprocs: int,
    port: int,
    jobs: Any,
    results: Any,
    threads: int,
    init_group: bool,
    inherited: _Inherited,
) -> None:
    """A rank: take the parent's environment, set torchrun's env vars, then run jobs until told
    to stop."""
    inherited.apply()
    for key in [k for k in os.environ if k.startswith(_INHERITED_PREFIXES)]:
        del os.environ[key]  # a parent under torchrun: its nodes, store and restarts are not ours
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
    if init_group:
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    while (job := jobs.get()) is not None:
        reply = _call(rank, *job)
        results.put(reply)
        if not reply[1]:
            code = 1
            break
    results.close()
    results.join_thread()
    from ..observability.otel import flush_global

    flush_global()  # os._exit skips the SDK's own flush at exit
    # Leave at once: a process group whose peers died can block interpreter shutdown.
    os._exit(code)


class WorkerPool:
    """``nprocs`` ranks sharing one process group, running jobs together.

    Starting a rank costs CPU (a spawned one imports torch: seconds; see START_METHOD); a pool
    pays that once for many runs (tests, parameter sweeps). A failed job breaks the pool: it is
    shut down, and ``run`` raises LaunchError. ``start_method`` ("spawn", "forkserver") overrides
    START_METHOD.
    """

    def __init__(
        self,
        nprocs: int,
        threads: int = 1,
        _init_group: bool = True,
        start_method: str | None = None,
    ) -> None:
        if nprocs < 1:
            raise ValueError(f"nprocs must be >= 1, got {nprocs}")
        ctx = _context(start_method)
        inherited = _Inherited.here()
        self.nprocs = nprocs
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(nprocs)]
        port = free_port()
        self._procs = [
            ctx.Process(
                target=_serve,
                args=(
                    r,
                    nprocs,
                    port,
                    self._jobs[r],
                    self._results,
                    threads,
                    _init_group,
                    inherited,
                ),
            )
            for r in range(nprocs)
        ]
        for p in self._procs:
            p.start()
        self.broken = False

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> list[Any]:
        """Run ``fn(*args)`` on every rank; results in rank order."""
        if self.broken:
            raise RuntimeError("this WorkerPool was shut down after a failure; make a new one")
        for q in self._jobs:
            q.put((fn, args))
        try:
            return _collect(self._procs, self._results, timeout)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every rank (killing those that do not stop within a few seconds)."""
        if self.broken:
            return
        self.broken = True
        for q in self._jobs:
            q.put(None)
        deadline = time.monotonic() + 5
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _collect(procs: list[Any], results: Any, timeout: float | None) -> list[Any]:
    """One reply per rank; after a failure, GRACE_S for the rest, then LaunchError."""
    nprocs = len(procs)
    out: dict[int, Any] = {}
    failures: dict[int, RankFailure] = {}
    first_failure: float | None = None
    started = time.monotonic()
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
        late = first_failure is not None and now - first_failure > GRACE_S
        over = timeout is not None and now - started > timeout
        if late or over:
            why = (
                f"still running {GRACE_S:.0f} s after a failure; killed"
                if late
                else f"timeout of {timeout} s exceeded; killed"
            )
            for r in range(nprocs):
                if r not in out and r not in failures:
                    failures[r] = RankFailure(r, "Timeout", why, "", late)
            for p in procs:
                if p.is_alive():
                    p.kill()
            break
    if failures:
        raise LaunchError(list(failures.values()))
    return [out[r] for r in range(nprocs)]


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    threads: int = 1,
    timeout: float | None = None,
    start_method: str | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``nprocs`` new ranks; return their results in rank order.

    ``fn`` must be importable (defined at module level). The ranks run on this host: each gets
    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (127.0.0.1) and MASTER_PORT as under a one-node
    torchrun (none of a parent torchrun's GROUP_*, ROLE_*, TORCHELASTIC_* variables) and
    ``threads`` torch threads; several hosts are torchrun's job (docs/MULTIHOST.md).
    ``fn`` creates the process group (Pipeline does). If a rank fails, the others get
    ``GRACE_S`` seconds to exit, then are killed, and a LaunchError leads with the root cause
    (a peer's "stage N is gone" comes after it). Ranks start by ``start_method`` (default
    START_METHOD) and, either way, with this process's environment, stdout, stderr and CPU
    priority as they are now.
    """
    pool = WorkerPool(nprocs, threads, _init_group=False, start_method=start_method)
    try:
        return pool.run(fn, *args, timeout=timeout)
    finally:
        pool.close()


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
