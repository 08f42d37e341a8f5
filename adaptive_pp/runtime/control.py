"""A rank's control plane: heartbeats, step aborts and the JSON exchanges between steps.

Every rank runs two threads beside its stage links, on their own message tag:

- a receiver that takes every control frame from any peer (``dist.recv`` from any source):
  heartbeats, goodbyes, abort notices and the chunks of JSON exchanges;
- a heartbeat thread that sends a beat to every peer each ``interval`` seconds and names a
  peer that has sent nothing for ``timeout`` seconds (frozen or dead) on every rank.

Work is counted in rounds: every collective call of the pipeline (a step, a decision, a
checkpoint load) begins a new round on every rank alike, and frames of older rounds are
dropped, so nothing of an aborted step can leak into the next one. A failure raised on one
rank is sent to every other rank as a notice; they raise the same error (``remote=True``)
wherever they wait: on a link, in an exchange, or at the start of their step.
The exchanges themselves (and the step-scoped messages that PipeDream-2BW posts across
rounds) are in ``exchange``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..core.errors import (
    PipelineError,
    PipelinePoisoned,
    PipelineTimeout,
    StageFrozen,
    rebuild,
)
from ..core.errors import describe as describe_error
from .exchange import BODY as BODY
from .exchange import FRAME as FRAME
from .exchange import HEAD as HEAD
from .exchange import Exchanges, Frame, Wait

CONTROL_TAG = 2  # the stage links use tag 0
MAGIC = 0x41505043  # "APPC"


@dataclass(frozen=True)
class Notice:
    """A failure on ``origin`` in ``round``; ``undone``: every rank rolls the step back."""

    origin: int
    round: int
    undone: bool
    error: dict[str, Any]


class Control(Exchanges):
    """Heartbeats, abort notices and exchanges of one rank (see the module docstring)."""

    def __init__(
        self,
        rank: int,
        world: int,
        *,
        interval: float = 1.0,
        timeout: float | None = 10.0,
        wait_timeout: float = 300.0,
    ) -> None:
        self.rank, self.world = rank, world
        self.peers = [r for r in range(world) if r != rank]
        self.interval, self.timeout, self.wait_timeout = interval, timeout, wait_timeout
        self.round = 0
        self._ident = 0
        self._cond = threading.Condition()
        self._watchers: list[threading.Condition] = [self._cond]
        self._chunks: dict[tuple[int, int, int], tuple[bytearray, list[int]]] = {}
        self._ready: dict[tuple[int, int], dict[int, bytes]] = {}
        self._late_chunks: dict[tuple[int, int, int], tuple[bytearray, list[int]]] = {}
        self._late: dict[tuple[int, int], dict[int, bytes]] = {}
        self._poster: threading.Thread | None = None  # started by the first post(later=True)
        self._outbox: queue.Queue[tuple[int, int, Any] | threading.Event | None] = queue.Queue()
        self._notices: dict[int, Notice] = {}
        self._poison: Notice | None = None
        self._seen = {p: time.monotonic() for p in self.peers}
        self._gone: set[int] = set()
        # gloo completes a send only in wait(), and a send to a stopped peer never completes:
        # the reaper thread waits on each posted frame, in order, so no sender ever blocks.
        self._posted: queue.Queue[tuple[Any, torch.Tensor] | threading.Event | None]
        self._posted = queue.Queue()
        self._reaper = threading.Thread(target=self._reap, name="adaptive_pp-reap", daemon=True)
        self._reaper.start()
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._rx = threading.Thread(target=self._receive, name="adaptive_pp-control", daemon=True)
        self._rx.start()
        self._beat: threading.Thread | None = None
        self._recovering = False
        self._where: list[dict[str, Any]] = []
        self._kill_frozen = False
        self._floor = 0  # poison notices of earlier rounds were cured

    def start(
        self,
        *,
        kill_frozen: bool = True,
        share: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """Learn where every rank runs, then beat and watch the peers (once all are up).

        Returns every rank's ``share`` (JSON-able), gathered in the same exchange, which
        waits up to ``timeout`` (PipelineConfig.init_timeout) for the slowest rank. With
        ``kill_frozen`` a peer named frozen is killed (SIGKILL) if it runs on this host: it
        cannot act on a polite signal, and torchrun would wait 30 s for it to end.
        """
        here = {"pid": os.getpid(), "host": socket.gethostname(), "share": share or {}}
        wait = Wait("the start-up exchange", timeout or self.wait_timeout, "init_timeout")
        self._where = self.all_gather(here, wait)
        self._kill_frozen = kill_frozen
        shared = [w["share"] for w in self._where]
        if self.timeout is None or not self.peers or self._beat is not None:
            return shared
        self._seen = {p: time.monotonic() for p in self.peers}
        self._beat = threading.Thread(target=self._heartbeat, name="adaptive_pp-beat", daemon=True)
        self._beat.start()
        return shared

    # --- rounds and faults ---------------------------------------------------------------

    def begin(self, *, recovering: bool = False) -> int:
        """Start the next round (every rank alike); raise if the pipeline is poisoned.

        ``recovering``: a round that may run while poisoned (loading a checkpoint); ``cure``
        ends the poisoning once it succeeded on every rank.
        """
        with self._cond:
            self._recovering = recovering
            self.round += 1
            self._ident = 0
            self._notices = {r: n for r, n in self._notices.items() if r >= self.round}
            self._ready = {k: v for k, v in self._ready.items() if k[0] >= self.round}
            self._chunks = {k: v for k, v in self._chunks.items() if k[0] >= self.round}
        if self._poison is not None and not recovering:
            raise self._poisoned_error(self._poison)
        return self.round

    def fault(self) -> PipelineError | None:
        """The error this rank must raise now, if another rank failed (None otherwise)."""
        notice = self._notices.get(self.round)
        if notice is None and not self._recovering:
            notice = self._poison
        if notice is None:
            return None
        return rebuild(notice.error, undone=notice.undone)

    def check(self) -> None:
        """Raise ``fault()`` if there is one."""
        exc = self.fault()
        if exc is not None:
            raise exc

    def watch(self, cond: threading.Condition) -> None:
        """Wake waiters on ``cond`` when a fault arrives (a link's mailbox)."""
        self._watchers.append(cond)

    def notify(self, exc: BaseException, *, undone: bool) -> None:
        """Tell every peer that this round failed here with ``exc`` (this rank raises it)."""
        notice = Notice(self.rank, self.round, undone, describe_error(exc))
        notice.error["message"] = notice.error["message"][:8000]
        self._record(notice)
        body = json.dumps(
            {"origin": notice.origin, "undone": undone, "error": notice.error}
        ).encode()
        self._send(self.peers, Frame.NOTICE, self.round, 0, body)

    def poison(self, why: BaseException) -> None:
        """Mark this rank poisoned and tell the peers (a step could not be undone here)."""
        self.notify(why, undone=False)

    def cure(self) -> None:
        """Forget a poisoning (after every rank loaded a consistent checkpoint)."""
        with self._cond:
            self._poison = None
            self._floor = self.round
        self.drop_late()

    @property
    def poisoned(self) -> bool:
        """True after a failure that could not be undone on every rank."""
        return self._poison is not None

    def _poisoned_error(self, notice: Notice) -> PipelinePoisoned:
        err = notice.error
        exc = PipelinePoisoned(
            f"stage {self.rank}: the pipeline is unusable since round {notice.round} failed "
            f"part-way on stage {notice.origin} ({err['kind']}: {err['message']}); the stages "
            "no longer hold one consistent model. Reload a checkpoint on every rank "
            "(pipe.load_checkpoint(path)) or create a new Pipeline.",
            stage=self.rank,
            peer=notice.origin,
        )
        exc.remote = notice.origin != self.rank
        return exc

    def _record(self, notice: Notice) -> None:
        with self._cond:
            if notice.round >= self.round and notice.round not in self._notices:
                self._notices[notice.round] = notice
            if not notice.undone and self._poison is None and notice.round >= self._floor:
                self._poison = notice
        self._wake()

    def _wake(self) -> None:
        for cond in self._watchers:
            with cond:
                cond.notify_all()

    # --- frames ------------------------------------------------------------------------

    def _send(
        self, peers: Iterable[int], kind: Frame, rnd: int, ident: int, data: bytes
    ) -> list[Any]:
        """Post ``data`` to each of ``peers`` in frames of at most FRAME bytes, each frame built
        once (never waits). Posted on the default group's own ``send``: without
        ``torch.distributed.isend``'s checks (see ``transport.isend``)."""
        total = len(data)
        offsets = range(0, total, BODY) if total else range(1)
        frames = []
        for off in offsets:
            chunk = data[off : off + BODY]
            frame = torch.empty(HEAD * 8 + len(chunk), dtype=torch.uint8)
            raw = frame.numpy()
            raw[: HEAD * 8].view(np.int64)[:] = [MAGIC, kind, rnd, ident, total, off, 0, 0]
            raw[HEAD * 8 :] = np.frombuffer(chunk, dtype=np.uint8)
            frames.append(frame)
        world = dist.group.WORLD
        assert world is not None
        works = []
        with self._send_lock:
            for peer in peers:
                for frame in frames:
                    try:
                        work = world.send([frame], peer, CONTROL_TAG)
                    except RuntimeError:
                        break  # a dead peer: the heartbeat names it, the links fail on it
                    self._posted.put((work, frame))
                    works.append(work)
        return works

    def _reap(self) -> None:
        while (item := self._posted.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()  # every frame posted before it has been sent
                continue
            with contextlib.suppress(RuntimeError):  # a dead peer: named elsewhere
                item[0].wait()

    def _receive(self) -> None:
        buf = torch.empty(FRAME, dtype=torch.uint8)
        raw = buf.numpy()
        while len(self._gone) < len(self.peers):
            try:
                src = dist.recv(buf, tag=CONTROL_TAG)
            except BaseException:  # the group went away
                return
            magic, kind, rnd, ident, total, off = raw[: HEAD * 8].view(np.int64)[:6].tolist()
            if magic != MAGIC:
                continue
            now = time.monotonic()
            with self._cond:
                self._seen[src] = now
                if kind == Frame.BYE:
                    self._gone.add(src)
                elif kind == Frame.EXCHANGE and rnd >= self.round:
                    self._file_chunk(src, rnd, ident, total, off, raw, late=False)
                elif kind == Frame.LATE and rnd >= self._floor:
                    self._file_chunk(src, rnd, ident, total, off, raw, late=True)
                elif kind == Frame.NOTICE:
                    body = json.loads(bytes(raw[HEAD * 8 : HEAD * 8 + total]))
                    notice = Notice(body["origin"], rnd, body["undone"], body["error"])
            if kind == Frame.NOTICE:
                self._record(notice)

    # --- heartbeats --------------------------------------------------------------------

    def _heartbeat(self) -> None:
        assert self.timeout is not None
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            self._send([p for p in self.peers if p not in self._gone], Frame.BEAT, 0, 0, b"")
            now = time.monotonic()
            if now - last > self.timeout / 2:  # this process itself was stopped: start over
                self._seen = {p: now for p in self.peers}
            last = now
            silent = [
                p for p in self.peers if p not in self._gone and now - self._seen[p] > self.timeout
            ]
            if silent and self._poison is None:
                self._frozen(silent[0], now - self._seen[silent[0]])

    def blame(self, exc: PipelineError) -> PipelineError:
        """``exc``, or StageFrozen if it is a timeout on a peer that also stopped beating."""
        if not isinstance(exc, PipelineTimeout) or exc.remote or self._beat is None:
            return exc
        # The peer waited for may itself wait on the frozen one: blame whoever is silent.
        silence = {p: self.silent_for(p) for p in self.peers if p not in self._gone}
        p = max(silence, key=lambda q: (silence[q], q == exc.peer), default=None)
        if p is None or silence[p] < 2 * self.interval:
            return exc  # all alive: one is stuck in its own work, as the timeout says
        return self._frozen(p, silence[p])

    def _frozen(self, p: int, silent: float) -> StageFrozen:
        """Name stage ``p`` frozen on every rank; kill it if it runs here and that is wanted."""
        where = self._where[p] if p < len(self._where) else {}
        killed = ""
        if self._kill_frozen and where.get("host") == socket.gethostname():
            try:
                os.kill(int(where["pid"]), signal.SIGKILL)
                killed = f"; killed it (pid {where['pid']}) so that the job ends"
            except (ProcessLookupError, PermissionError):
                pass
        at = f" (pid {where['pid']} on {where['host']})" if where else ""
        exc = StageFrozen(
            f"stage {p} (rank {p}){at} sent no heartbeat for {silent:.1f} s: it is frozen "
            f"or dead (stopped, hung in a kernel, or killed); noticed by stage "
            f"{self.rank}{killed}. PipelineConfig.heartbeat_timeout sets the limit.",
            stage=self.rank,
            peer=p,
        )
        self.poison(exc)
        return exc

    def silent_for(self, peer: int) -> float:
        """Seconds since anything arrived from ``peer``."""
        return time.monotonic() - self._seen.get(peer, time.monotonic())

    def close(self, timeout: float = 5.0) -> None:
        """Say goodbye to every peer and wait for theirs (up to ``timeout``): no rank leaves
        the process group while another still talks to it. Beats stop first, so none is
        posted after the goodbye (a frame nobody receives any more would never complete)."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout)
        self.posted(timeout)  # what the posting thread holds goes before the goodbye
        self._outbox.put(None)
        self._poster = None
        self._send(self.peers, Frame.BYE, 0, 0, b"")
        sent = threading.Event()
        self._posted.put(sent)
        self._rx.join(max(0.0, deadline - time.monotonic()))
        # Delivered before this process may leave (os._exit would drop them).
        sent.wait(max(0.0, deadline - time.monotonic()))
        self._posted.put(None)
