"""Client of a served pipeline: split a batch into M micro-batches, stream them, gather outputs.

``PipelineClient(addresses)`` sends micro-batches to stage 0 with at most ``inflight`` of them
in the pipeline at once (default: stages + 1, enough to keep every stage busy), each with a
deadline of ``timeout`` seconds, and returns the outputs in order with the request's
``StepReport``. Any failure is a ``StageError`` naming the stage at fault: the one a server
named, or, when the client cannot tell (stage 0 unreachable, the client's own deadline), the
result of a health check of every stage. Nothing waits longer than the deadlines.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

from adaptive_pp.core.report import StepReport

from . import wire
from .reporting import build_report
from .server import CHANNEL_OPTIONS, FORWARD, HEALTH, ORIGIN


class StageError(RuntimeError):
    """A request that failed; ``stage`` and ``address`` say where (None if unknown)."""

    def __init__(self, message: str, stage: int | None, address: str | None, code: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.address = address
        self.code = code


@dataclass(frozen=True)
class Result:
    """A served request: outputs in input order, the StepReport, per micro-batch latency (s)."""

    output: npt.NDArray[Any]
    report: StepReport
    latencies: tuple[float, ...]


class PipelineClient:
    """Talks to the stage servers at ``addresses`` (stage order); stage 0 takes the input."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        partition: Sequence[int] | None = None,
        timeout: float = 10.0,
        health_timeout: float = 1.0,
        inflight: int | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("a pipeline client needs the address of every stage")
        self.addresses = list(addresses)
        self.partition = tuple(partition or range(len(addresses) + 1))
        self.timeout = timeout
        self.health_timeout = health_timeout
        self.inflight = inflight or len(addresses) + 1
        self._channels = [grpc.insecure_channel(a, options=CHANNEL_OPTIONS) for a in addresses]
        self._forward = self._channels[0].unary_unary(FORWARD)
        self._health = [ch.unary_unary(HEALTH) for ch in self._channels]
        self._requests = 0
        self._first: float | None = None

    def health(self) -> list[dict[str, Any]]:
        """Every stage's health (JSON from its server); StageError naming one that is down."""
        out = []
        for s, call in enumerate(self._health):
            try:
                out.append(json.loads(call(b"", timeout=self.health_timeout)))
            except grpc.RpcError as exc:
                raise StageError(
                    f"stage {s} ({self.addresses[s]}) does not answer a health check within "
                    f"{self.health_timeout:g} s: {exc.code().name} {exc.details()}",
                    s,
                    self.addresses[s],
                    exc.code().name,
                ) from None
        return out

    def wait_ready(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll health until every stage answers; the last StageError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.health()
            except StageError as exc:
                if time.monotonic() > deadline:
                    msg = f"{exc} (still after {timeout:g} s of retries)"
                    raise StageError(msg, exc.stage, exc.address, exc.code) from None
                time.sleep(0.1)

    def infer(
        self, x: npt.NDArray[Any], microbatches: int, *, inflight: int | None = None
    ) -> Result:
        """Serve one request: ``x`` split along dim 0 into ``microbatches`` near-equal parts."""
        if not 1 <= microbatches <= len(x):
            raise ValueError(f"cannot split a batch of {len(x)} into {microbatches} micro-batches")
        parts = np.array_split(x, microbatches)
        window = inflight or self.inflight
        request = self._requests
        self._requests += 1
        sent = [0.0] * microbatches
        received = [0.0] * microbatches
        lock = threading.Lock()

        def stamp(m: int) -> Any:
            def done(_: Any) -> None:
                with lock:
                    received[m] = time.time()

            return done

        pending: deque[tuple[int, Any]] = deque()
        frames: list[wire.Frame] = []
        start = time.time()
        if self._first is None:
            self._first = start
        nxt = 0
        try:
            while nxt < microbatches or pending:
                while nxt < microbatches and len(pending) < window:
                    data = wire.pack(wire.Frame(request, nxt, parts[nxt]))
                    sent[nxt] = time.time()
                    fut = self._forward.future(data, timeout=self.timeout)
                    fut.add_done_callback(stamp(nxt))
                    pending.append((nxt, fut))
                    nxt += 1
                m, fut = pending.popleft()
                try:
                    frames.append(wire.unpack(fut.result()))
                except grpc.RpcError as exc:
                    raise self._error(exc, m) from None
        finally:
            for _, fut in pending:
                fut.cancel()
        end = time.time()
        with lock:
            got = list(received)
        output = np.concatenate([f.array for f in frames])
        report = build_report(
            request=request,
            start=start,
            end=max(end, *got),
            sent=sent,
            received=got,
            timings=[f.timings for f in frames],
            partition=self.partition,
            batch=len(x),
            offset=start - self._first,
        )
        return Result(output, report, tuple(r - t for t, r in zip(sent, got, strict=True)))

    def _error(self, exc: Any, m: int) -> StageError:
        """The StageError for a failed micro-batch ``m``: the stage that said so, else a guess
        from health checks."""
        code = exc.code()
        origin = dict(exc.trailing_metadata() or ()).get(ORIGIN)
        if origin is not None:
            s = int(origin)
            return StageError(exc.details(), s, self.addresses[s], code.name)
        if code == grpc.StatusCode.UNAVAILABLE:
            return StageError(
                f"stage 0 ({self.addresses[0]}) is unreachable (down or not started): "
                f"{exc.details()}",
                0,
                self.addresses[0],
                code.name,
            )
        what = f"micro-batch {m}: {code.name} ({exc.details()})"
        try:
            states = self.health()
        except StageError as down:
            return StageError(f"{what}; {down}", down.stage, down.address, code.name)
        busy = [st for st in states if st.get("busy_for") is not None]
        if busy:
            st = max(busy, key=lambda st: float(st["busy_for"]))
            s = int(st["stage"])
            return StageError(
                f"{what}; stage {s} ({self.addresses[s]}) has been computing micro-batch "
                f"{st['computing']} for {float(st['busy_for']):.2f} s ({st['queued']} queued)",
                s,
                self.addresses[s],
                code.name,
            )
        return StageError(f"{what}; every stage answers its health check", None, None, code.name)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    def __enter__(self) -> PipelineClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
