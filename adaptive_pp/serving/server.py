"""One stage of a served pipeline: a gRPC server that runs its ONNX file and forwards onwards.

Service ``adaptive_pp.Stage`` (generic handlers, raw bytes, no generated code):

- ``Forward``: a frame (``wire``) holding one micro-batch. The input is checked against the
  stage's ``TensorSpec`` (INVALID_ARGUMENT otherwise), queued for the stage's one compute
  thread (micro-batches run in arrival order, one at a time), then the output frame, with this
  stage's timing appended, goes to the next stage with what is left of the deadline; the last
  stage returns it, and the answer travels back up the chain to the client.
- ``Health``: JSON with the stage, its input spec, what it has served, its queue and how long
  it has been computing the current micro-batch (answered by another thread, so a busy or
  stuck stage still answers).

Every error a stage raises names it (``stage N: ...``) and sets the trailing metadata key
``ORIGIN`` to its number; an upstream stage passes such errors through unchanged, and names
the next stage itself when that one cannot be reached or answers too late. Each stage keeps a
small part of the remaining deadline (``_margin``) for its own answer, so the deepest stage in
trouble is the one reported.

Run one stage with ``python -m adaptive_pp.serving.server EXPORT_DIR --stage N --port P
[--next HOST:PORT]`` (``adaptive-pp serve`` does the same); it prints
``adaptive-pp stage N serving on HOST:PORT`` when ready (``--port 0`` picks a free port).
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

from . import wire
from .commands import add_stage_arguments
from .manifest import INPUT_NAME, OUTPUT_NAME, StageSpec, load_manifest

SERVICE = "adaptive_pp.Stage"
FORWARD, HEALTH = f"/{SERVICE}/Forward", f"/{SERVICE}/Health"
ORIGIN = "adaptive-pp-stage"  # trailing metadata: the stage an error comes from
READY = "adaptive-pp stage {stage} serving on {address}"
MAX_MESSAGE = 256 << 20  # bytes a frame may have (gRPC's default is 4 MiB)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


def _margin(remaining: float) -> float:
    """Seconds of a deadline a stage keeps for its own answer (the rest goes downstream)."""
    return min(0.2, 0.1 * remaining)


@dataclass(eq=False)
class _Job:
    """One micro-batch on a stage's compute queue."""

    array: npt.NDArray[Any]
    microbatch: int
    arrived: float
    done: threading.Event = field(default_factory=threading.Event)
    start: float = 0.0
    end: float = 0.0
    output: npt.NDArray[Any] | None = None
    error: str | None = None
    cancelled: bool = False


class StageWorker:
    """The stage's ONNX session and its one compute thread, fed by a FIFO queue."""

    def __init__(self, path: str | Path, *, threads: int = 1, delay: float = 0.0) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped]

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.delay = delay
        self.served = 0
        self.failed = 0
        self.current: _Job | None = None
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="stage-compute", daemon=True)
        self._thread.start()

    def submit(self, array: npt.NDArray[Any], microbatch: int, arrived: float) -> _Job:
        job = _Job(array, microbatch, arrived)
        self._queue.put(job)
        return job

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled:  # its caller gave up (deadline) before it started
                continue
            self.current = job
            job.start = time.time()
            try:
                out = self.session.run([OUTPUT_NAME], {INPUT_NAME: job.array})[0]
                if self.delay > 0:  # an emulated slow device (tests, experiments)
                    time.sleep(self.delay)
                job.output = np.asarray(out)
                self.served += 1
            except Exception as exc:  # onnxruntime's errors have no common base class
                job.error = f"{type(exc).__name__}: {exc}"
                self.failed += 1
            job.end = time.time()
            self.current = None
            job.done.set()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)


class StageService:
    """The handlers of one stage: check, compute, forward, and say who failed."""

    def __init__(self, spec: StageSpec, worker: StageWorker, next_address: str | None) -> None:
        self.spec = spec
        self.worker = worker
        self.next_address = next_address
        self._channel = None
        self._next = None
        if next_address is not None:
            self._channel = grpc.insecure_channel(next_address, options=CHANNEL_OPTIONS)
            self._next = self._channel.unary_unary(FORWARD)

    def _abort(self, context: Any, code: Any, message: str, origin: int | None = None) -> NoReturn:
        stage = self.spec.stage if origin is None else origin
        context.set_trailing_metadata(((ORIGIN, str(stage)),))
        context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    def forward(self, request: bytes, context: Any) -> bytes:
        arrived = time.time()
        s = self.spec.stage
        try:
            frame = wire.unpack(request)
        except wire.WireError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"stage {s}: {exc}")
        what = f"micro-batch {frame.microbatch} of request {frame.request}"
        problem = self.spec.input.problem(frame.array)
        if problem is not None:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"stage {s}: {what}: {problem}")
        job = self.worker.submit(frame.array, frame.microbatch, arrived)
        remaining = context.time_remaining()
        budget = None if remaining is None else max(0.0, remaining - _margin(remaining))
        if not job.done.wait(budget):
            job.cancelled = True
            state = (
                f"computing for {time.time() - job.start:.3f} s"
                if job.start
                else f"still queued ({self.worker.queued} queued)"
            )
            self._abort(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"stage {s} is too slow: {what} is {state} at its deadline",
            )
        if job.error is not None or job.output is None:
            msg = f"stage {s}: onnxruntime failed on {what}: {job.error}"
            self._abort(context, grpc.StatusCode.INTERNAL, msg)
        out = wire.Frame(
            frame.request,
            frame.microbatch,
            job.output,
            (*frame.timings, (s, arrived, job.start, job.end)),
        )
        data = wire.pack(out)
        if self._next is None:
            return data
        remaining = context.time_remaining()
        timeout = None if remaining is None else max(0.0, remaining - _margin(remaining))
        try:
            return bytes(self._next(data, timeout=timeout))
        except grpc.RpcError as exc:
            self._pass_on(context, exc, what)

    def _pass_on(self, context: Any, exc: Any, what: str) -> NoReturn:
        """Re-raise a downstream error: as is if a stage named itself, else naming stage s+1."""
        origin = dict(exc.trailing_metadata() or ()).get(ORIGIN)
        if origin is not None:
            self._abort(context, exc.code(), exc.details(), int(origin))
        nxt = self.spec.stage + 1
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            why = f"did not answer {what} before its deadline"
        elif code == grpc.StatusCode.UNAVAILABLE:
            why = "is unreachable (down or not started)"
        else:
            why = f"failed ({code.name})"
        self._abort(context, code, f"stage {nxt} ({self.next_address}) {why}: {exc.details()}", nxt)

    def health(self, request: bytes, context: Any) -> bytes:
        job = self.worker.current
        state = {
            "stage": self.spec.stage,
            "ready": True,
            "input": self.spec.input.to_dict(),
            "output": self.spec.output.to_dict(),
            "next": self.next_address,
            "served": self.worker.served,
            "failed": self.worker.failed,
            "queued": self.worker.queued,
            "computing": None if job is None else job.microbatch,
            "busy_for": None if job is None else time.time() - job.start,
        }
        return json.dumps(state).encode()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


def start_server(
    export_dir: str | Path,
    stage: int,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    next_address: str | None = None,
    threads: int = 1,
    delay: float = 0.0,
    max_workers: int = 64,
) -> tuple[Any, StageService, str]:
    """Start stage ``stage``'s server in this process: (grpc server, service, its address)."""
    manifest = load_manifest(export_dir)
    if not 0 <= stage < manifest.num_stages:
        raise ValueError(f"stage {stage} does not exist (stages 0..{manifest.num_stages - 1})")
    last = stage == manifest.num_stages - 1
    if last and next_address is not None:
        raise ValueError(f"stage {stage} is the last stage; it takes no --next")
    if not last and next_address is None:
        raise ValueError(f"stage {stage} needs --next HOST:PORT (the address of stage {stage + 1})")
    spec = manifest.stages[stage]
    worker = StageWorker(Path(export_dir) / spec.file, threads=threads, delay=delay)
    service = StageService(spec, worker, next_address)
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Forward": grpc.unary_unary_rpc_method_handler(service.forward),
            "Health": grpc.unary_unary_rpc_method_handler(service.health),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"stage{stage}"),
        handlers=[handler],
        options=CHANNEL_OPTIONS,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"stage {stage}: cannot listen on {host}:{port}")
    server.start()
    return server, service, f"{host}:{bound}"


def serve(args: argparse.Namespace) -> int:
    """Run one stage until SIGINT or SIGTERM (``adaptive-pp serve --stage``)."""
    server, service, address = start_server(
        args.export_dir,
        args.stage,
        host=args.host,
        port=args.port,
        next_address=args.next,
        threads=args.threads,
        delay=args.delay_ms * 1e-3,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(READY.format(stage=args.stage, address=address), flush=True)
    stop.wait()
    server.stop(grace=0.5).wait()
    service.close()
    service.worker.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="serve one stage of an exported pipeline")
    p.add_argument("export_dir", type=Path)
    p.add_argument("--stage", type=int, required=True)
    add_stage_arguments(p)
    return serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
