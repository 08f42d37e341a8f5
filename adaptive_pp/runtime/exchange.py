"""The JSON exchanges of the control plane (``Control`` inherits them): round-scoped
collectives between steps, and step-scoped messages that outlive their round.

- ``all_gather`` / ``broadcast`` / ``barrier``: every rank calls them in the same order within
  a round; each waits for its sources (raising a peer's failure meanwhile). Frames of an older
  round are dropped on arrival, so nothing of an aborted step leaks into the next one.
- ``post`` / ``take``: a message filed under (the round it belongs to, a slot), sent without
  waiting and collected whenever the receiver wants it, in that round or any later one (until
  a checkpoint load cures the pipeline, ``drop_late``). PipeDream-2BW delivers each step's loss
  and report parts this way, so that no rank waits for its peers at the end of a step.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterable
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np

from ..core.errors import PipelineError, PipelineTimeout

HEAD = 8  # int64 values in a frame header
FRAME = 1 << 16  # bytes per frame; longer JSON travels in several
BODY = FRAME - HEAD * 8

Key = tuple[int, int]  # (round, ident or slot)


class Frame(IntEnum):
    """What a control frame carries."""

    BEAT = 1
    BYE = 2
    NOTICE = 3
    EXCHANGE = 4
    LATE = 5  # a step-scoped message (``post``): kept across rounds


class Wait(NamedTuple):
    """What an exchange waits for, how long, and the setting that says so."""

    what: str
    seconds: float
    setting: str


class Exchanges:
    """The exchanges of ``Control`` (the attributes and methods below are Control's)."""

    rank: int
    world: int
    peers: list[int]
    round: int
    wait_timeout: float
    _ident: int
    _cond: threading.Condition
    _chunks: dict[tuple[int, int, int], tuple[bytearray, list[int]]]
    _ready: dict[Key, dict[int, bytes]]
    _late_chunks: dict[tuple[int, int, int], tuple[bytearray, list[int]]]
    _late: dict[Key, dict[int, bytes]]
    _poster: threading.Thread | None
    _outbox: queue.Queue[tuple[int, int, Any] | threading.Event | None]

    def fault(self) -> PipelineError | None:
        raise NotImplementedError

    def _send(
        self, peers: Iterable[int], kind: Frame, rnd: int, ident: int, data: bytes
    ) -> list[Any]:
        raise NotImplementedError

    def all_gather(self, obj: Any, what: str | Wait = "the end-of-step exchange") -> list[Any]:
        """Every rank's JSON-able ``obj`` in rank order; raises a peer's failure meanwhile."""
        self._ident += 1
        data = json.dumps(obj).encode()
        self._send(self.peers, Frame.EXCHANGE, self.round, self._ident, data)
        got = self._collect(self._ident, self.peers, what)
        got[self.rank] = json.loads(data)
        return [got[r] for r in range(self.world)]

    def broadcast(self, obj: Any, src: int = 0, what: str = "a broadcast") -> Any:
        """Rank ``src``'s JSON-able ``obj`` on every rank (``obj`` is ignored elsewhere)."""
        self._ident += 1
        if self.rank != src:
            return self._collect(self._ident, [src], what)[src]
        data = json.dumps(obj).encode()
        self._send(self.peers, Frame.EXCHANGE, self.round, self._ident, data)
        return json.loads(data)

    def barrier(self, what: str) -> None:
        """Wait until every rank got here (interruptible, unlike dist.barrier)."""
        self.all_gather(None, what)

    def post(self, rnd: int, slot: int, obj: Any, *, later: bool = False) -> None:
        """Send JSON-able ``obj`` to every peer under (``rnd``, ``slot``) without waiting.

        ``later``: hand it to the posting thread, which encodes and frames it while the
        caller goes on (``obj`` must not change meanwhile); ``posted`` waits for it.
        """
        if not later:
            self._post_now(rnd, slot, obj)
            return
        if self._poster is None:
            self._poster = threading.Thread(target=self._post_loop, name="adaptive_pp-post")
            self._poster.daemon = True
            self._poster.start()
        self._outbox.put((rnd, slot, obj))

    def posted(self, timeout: float | None = None) -> None:
        """Wait until the posting thread has handed every message to the sender (no-op when
        none was started, or after ``close``)."""
        if self._poster is not None:
            done = threading.Event()
            self._outbox.put(done)
            done.wait(timeout)

    def _post_now(self, rnd: int, slot: int, obj: Any) -> None:
        self._send(self.peers, Frame.LATE, rnd, slot, json.dumps(obj).encode())

    def _post_loop(self) -> None:
        while (item := self._outbox.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            self._post_now(*item)

    def take(self, rnd: int, slot: int, sources: list[int], what: str) -> dict[int, Any]:
        """What ``sources`` posted under (``rnd``, ``slot``), waiting for it if need be (a
        peer's failure is raised meanwhile); each message is taken once."""
        return self._wait_for(self._late, (rnd, slot), sources, what)

    def drop_late(self) -> None:
        """Forget the posted messages of rounds before this one (after a cure)."""
        with self._cond:
            self._late = {k: v for k, v in self._late.items() if k[0] >= self.round}
            self._late_chunks = {k: v for k, v in self._late_chunks.items() if k[0] >= self.round}

    def _collect(self, ident: int, sources: list[int], what: str | Wait) -> dict[int, Any]:
        return self._wait_for(self._ready, (self.round, ident), sources, what)

    def _wait_for(
        self, boxes: dict[Key, dict[int, bytes]], key: Key, sources: list[int], what: str | Wait
    ) -> dict[int, Any]:
        wait = what if isinstance(what, Wait) else Wait(what, self.wait_timeout, "recv_timeout")
        deadline = time.monotonic() + wait.seconds
        with self._cond:
            while True:
                box = boxes.get(key, {})
                if all(s in box for s in sources):
                    break
                exc = self.fault()
                if exc is not None:
                    raise exc
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [s for s in sources if s not in box]
                    raise PipelineTimeout(
                        f"stage {self.rank} waited {wait.seconds:.0f} s for stage "
                        f"{missing[0]} in {wait.what}; is it stuck? (raise "
                        f"PipelineConfig.{wait.setting} if its work is that slow)",
                        stage=self.rank,
                        peer=missing[0],
                    )
                self._cond.wait(min(left, 1.0))
            got = {s: box.pop(s) for s in sources}
            if not box:
                boxes.pop(key, None)
        return {s: json.loads(data) for s, data in got.items()}

    def _file_chunk(
        self, src: int, rnd: int, ident: int, total: int, off: int, raw: np.ndarray, late: bool
    ) -> None:
        """File one chunk of an exchange or a posted message (caller holds the lock); notify
        when it is whole."""
        n = min(BODY, total - off)
        key = (rnd, ident, src)
        chunks = self._late_chunks if late else self._chunks
        data, got = chunks.setdefault(key, (bytearray(total), [0]))
        data[off : off + n] = raw[HEAD * 8 : HEAD * 8 + n].tobytes()
        got[0] += n
        if got[0] >= total:
            del chunks[key]
            (self._late if late else self._ready).setdefault((rnd, ident), {})[src] = bytes(data)
            self._cond.notify_all()
