"""StageWorker: runs one stage's actions for a step over its links, measuring as it goes.

Each layer runs as its own autograd segment (its input detached and re-attached), so forward and
backward time are measured per layer; the values are the same as one graph's backward because
every boundary tensor has a single consumer.

Activation checkpointing (``checkpointing=True``) wraps each segment, one layer at a time, in
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: a segment keeps only its input and
recomputes its internals during its backward, so the stash shrinks to the segment boundaries,
per-layer timing still works (a layer's backward time includes its recomputation) and the math
is unchanged (the recomputation is the same kernels on the same inputs). Per layer rather than
per stage: a whole-stage checkpoint would save a little more memory but hide the boundaries the
per-layer backward timing hooks on.

Split backward (ZB-H1: actions I and W instead of B, see ``splitgrad``): I(m) computes the
gradients of the stage input and of every segment boundary (sending the input's upstream at
once, as B does), keeps the graph and the gradients at each segment's weight-adjacent nodes;
W(m) runs each segment's weight gradients from those nodes. The
stash of m (and I's boundary gradients) is held until W(m) ends; a layer's backward time is its
I part (hooks, as for B) plus its W call.

The activation stash in bytes (``StageLog.peak_stash_bytes``, see ``stash.StashMeter``): per
micro-batch, from its forward until its backward; the peak over the step of the sum in flight.
PipeDream-2BW (``twobw``): forwards run on the step's weight version, each stash entry keeps
the version it ran on (checked against its gradient's), and a step's spilled entries carry over.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from ..core.errors import NonFiniteLoss, PipelineError, StageFailure, VersionMismatch
from ..core.schedules import Action
from .chunk import Chunk, Segment
from .comm import Header, Link, MessageKind
from .locallink import LocalLink
from .splitgrad import (
    PendingW,
    WeightPassError,
    input_pass,
    shares_parameters,
    weight_params,
    weight_pass,
)
from .stagelog import StageLog, add_time, backward_culprit, hooked, layer_backward_times
from .stash import StashMeter, storage_ptrs

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StageWorker:
    """Executes one chunk's forward/backward actions over its links, measuring as it goes.

    It owns only what a step in flight needs (the activation stash, per-step counters). The
    chunk's segments are read from ``chunk`` (its owner swaps them between steps) and the weight
    version is passed to each ``prepare``; ``driver.run_actions`` runs a rank's actions, each on
    its chunk's worker. ``num_stages`` counts virtual stages (ranks x chunks); ``up`` and
    ``down`` are the links to the ranks of the virtual stages before and after this chunk's
    (the first rank's later chunks get their input over the wrap-around link from the last;
    two chunks of one rank, ZB-V's turn, over a ``LocalLink``).
    """

    def __init__(
        self,
        chunk: Chunk,
        num_stages: int,
        loss_fn: LossFn | None,
        up: Link | LocalLink | None,
        down: Link | LocalLink | None,
        device: torch.device,
        recv_timeout: float,
        checkpointing: bool = False,
    ) -> None:
        self.chunk = chunk
        #: The rank (errors name it), the virtual stage run and the pipeline's virtual stages.
        self.stage, self.vstage, self.num_stages = chunk.stage, chunk.vstage, num_stages
        self.loss_fn = loss_fn
        self.up, self.down = up, down
        self.device = device
        self.recv_timeout = recv_timeout
        self.checkpointing = checkpointing
        self._version = 0  # the weights' version in the step being run (given to run)
        self._stash: dict[int, tuple[list[torch.Tensor], torch.Tensor, list[float]]] = {}
        self._stash_bytes: dict[int, int] = {}
        self._live_bytes = 0
        self._weights: set[int] = set()
        self._range = (-1, -1)
        self._sources: dict[int, Header] = {}
        self._pending_w: dict[int, PendingW] = {}  # what I(m) left for W(m)
        self._whole_w = False  # W from the top (segments share parameters)
        self._w_params: list[list[torch.Tensor]] = []  # per segment, what W gives a gradient
        #: Forward actions completed (their output sent) in the step being run.
        self.forwards_done = 0
        #: B or I actions completed (their input gradient sent) in the step being run.
        self.backwards_done = 0
        #: PipeDream-2BW (``runtime.twobw``): whether the step runs on a weight version (the
        #: runner swaps it into the modules), and the version each stash entry ran on.
        self._versioned = False
        self._stash_version: dict[int, int] = {}
        #: Backwards whose input gradient the upstream stage takes in its next step (2BW),
        #: and the micro-batches of a step (their id there is m - M).
        self.grads_for_next_step: frozenset[int] = frozenset()
        self.microbatches_of_step = 0

    @property
    def is_last(self) -> bool:
        """True on the (virtual) stage that computes the loss."""
        return self.vstage == self.num_stages - 1

    @property
    def segments(self) -> list[Segment]:
        """The chunk's segments, in the order they run."""
        return self.chunk.segments

    def prepare(
        self,
        actions: Sequence[Action],
        version: int,
        *,
        carry: int = 0,
        versions: set[int] | None = None,
    ) -> None:
        """Start a step running (this chunk's share of) ``actions`` at weight ``version``.

        ``version`` is stamped on what is sent and checked on what arrives. PipeDream-2BW:
        ``carry`` = M keeps the stash of the micro-batches whose backwards spill into this
        step, renamed m - M (with the versions they ran on); ``versions``: the storages of
        every weight version (not activations), for a step on a weight version.
        """
        kept = {m - carry: v for m, v in self._stash.items()} if carry else {}
        kept_bytes = {m - carry: self._stash_bytes.get(m, 0) for m in self._stash} if carry else {}
        kept_versions = {m - carry: self._stash_version[m] for m in self._stash} if carry else {}
        self.discard()
        self._stash, self._stash_bytes, self._stash_version = kept, kept_bytes, kept_versions
        self._live_bytes = sum(kept_bytes.values())
        self._version = version
        self._weights = storage_ptrs(seg.module for seg in self.segments)
        self._versioned = versions is not None
        self._weights |= versions or set()
        self._range = self.chunk.layer_range()  # segments change only between steps
        split = any(a.kind == "W" for a in actions)  # a split backward's W needs to know
        self._whole_w = split and shares_parameters([seg.module for seg in self.segments])
        self._w_params = [weight_params(seg.module) for seg in self.segments] if split else []

    def act(
        self,
        action: Action,
        inputs: Sequence[torch.Tensor] | None,
        targets: Sequence[torch.Tensor] | None,
        m_count: int,
        step: int,
        log: StageLog,
    ) -> float:
        """Run one action (its input taken first); return when its compute started."""
        if action.kind == "F":
            x = self._input(action.microbatch, inputs)
        elif action.kind != "W":
            g = self._output_grad(action.microbatch)
        t_start = log.action_started()
        if action.kind == "F":
            self._forward(action.microbatch, x, targets, m_count, step, log)
            self.forwards_done += 1
        elif action.kind == "W":
            self._backward_weight(action.microbatch, log)
        else:  # B, or I (which keeps the stash and the boundary gradients for W)
            self._backward(action.microbatch, g, step, log, split=action.kind == "I")
            self.backwards_done += 1
        return t_start

    @property
    def stashed(self) -> int:
        """Micro-batches whose activations are stashed now."""
        return len(self._stash)

    def stashed_versions(self) -> set[int]:
        """Weight versions the stashed micro-batches ran on (PipeDream-2BW)."""
        return set(self._stash_version.values())

    @property
    def live_bytes(self) -> int:
        """Bytes of the activations (and I's gradients) stashed now."""
        return self._live_bytes

    def discard(self) -> None:
        """Drop the step's stashed activations and graphs (a new step, or an aborted one)."""
        self._stash = {}
        self._stash_bytes = {}
        self._stash_version = {}
        self._live_bytes = 0
        self.forwards_done = self.backwards_done = 0
        self._sources.clear()
        self._pending_w.clear()

    def _check_version(self, header: Header, what: str, expected: int | None = None) -> None:
        """``expected``: the version micro-batch's stash ran on (PipeDream-2BW), else the
        step's."""
        want = self._version if expected is None else expected
        if header.version != want:
            held = "its stash of it ran on" if expected is not None else "its weights are at"
            raise VersionMismatch(
                f"stage {self.stage} received the {what} of micro-batch {header.microbatch} "
                f"computed by layers {header.layer_lo}-{header.layer_hi} at weight version "
                f"{header.version}, but {held} version {want}",
                stage=self.stage,
                microbatch=header.microbatch,
                layer=header.layer_lo,
            )

    def _input(self, m: int, inputs: Sequence[torch.Tensor] | None) -> torch.Tensor:
        if self.up is None:
            if inputs is None:
                raise PipelineError(f"stage {self.stage} needs the inputs", stage=self.stage)
            return inputs[m].to(self.device)
        msg = self.up.take(MessageKind.ACT, m, self.recv_timeout, "activation", self.vstage)
        self._check_version(msg.header, "activation")
        self._sources[m] = msg.header  # named if the first segment fails on it
        return msg.payload.to(self.device)

    def _output_grad(self, m: int) -> torch.Tensor | None:
        if self.down is None:
            return None
        msg = self.down.take(MessageKind.GRAD, m, self.recv_timeout, "gradient", self.vstage)
        self._check_version(msg.header, "gradient", self._stash_version.get(m))
        return msg.payload.to(self.device)

    def _source(self, m: int) -> str:
        """Where micro-batch ``m``'s input came from ("" on the first stage)."""
        h = self._sources.get(m)
        if h is None or self.up is None:
            return ""
        producer = f"layers.{h.layer_hi}" if h.layer_hi >= 0 else "pre"
        return f"its input {tuple(h.shape)} came from stage {self.up.peer}, {producer}"

    def _fail(
        self, name: str, layer: int | None, m: int, phase: str, exc: Exception, source: str = ""
    ) -> PipelineError:
        if isinstance(exc, PipelineError):
            return exc
        return StageFailure(
            f"stage {self.stage}, {name}, micro-batch {m}, {phase}: {type(exc).__name__}: {exc}"
            + (f" ({source})" if source else ""),
            stage=self.stage,
            microbatch=m,
            layer=layer,
        )

    def _forward(
        self,
        m: int,
        x: torch.Tensor,
        targets: Sequence[torch.Tensor] | None,
        m_count: int,
        step: int,
        log: StageLog,
    ) -> None:
        # One autograd graph per micro-batch; gradient hooks on the segment boundaries (see
        # stagelog.hooked) timestamp the backward, so per-layer backward time costs no extra calls.
        h = x.requires_grad_() if x.is_floating_point() and self.up is not None else x
        marks: list[float] = []
        boundaries = [h]
        meter = StashMeter(self._weights)
        with meter.hooks():
            for i, seg in enumerate(self.segments):
                t = time.perf_counter()
                try:
                    h = self._call(seg, h)
                except Exception as exc:
                    # The stage's first segment names where its input came from (a shape that
                    # does not fit is the producer's as much as the consumer's).
                    source = self._source(m) if i == 0 else ""
                    raise self._fail(seg.name, seg.layer, m, "forward", exc, source) from exc
                add_time(log.layer_forward, seg.layer, time.perf_counter() - t)
                boundaries.append(h)
        if self.is_last:
            top = self._loss(m, h, targets, m_count, log)
        else:
            if not h.is_floating_point():
                raise PipelineError(
                    f"stage {self.stage} output of micro-batch {m} is {h.dtype}: activations "
                    "between stages must be floating point so gradients can flow back",
                    stage=self.stage,
                    microbatch=m,
                )
            assert self.down is not None
            # Sent before the bookkeeping below: the next stage may be waiting for it.
            self.down.send(self._header(MessageKind.ACT, m, step, h), h.detach())
            top = h
        for b in boundaries:
            meter.add(b)
        self._stash_bytes[m] = meter.bytes
        self._live_bytes += meter.bytes
        stamp = marks.append
        for i in hooked(boundaries, self.is_last):
            boundaries[i].register_hook(lambda _g: stamp(time.perf_counter()))  # type: ignore[no-untyped-call]
        self._stash[m] = (boundaries, top, marks)
        if self._versioned:
            self._stash_version[m] = self._version

    def _call(self, seg: Segment, h: torch.Tensor) -> torch.Tensor:
        """One segment's forward, under activation checkpointing if enabled."""
        if self.checkpointing and torch.is_grad_enabled():
            out: torch.Tensor = checkpoint(seg.module, h, use_reentrant=False)
            return out
        result: torch.Tensor = seg.module(h)
        return result

    def _header(
        self, kind: MessageKind, m: int, step: int, t: torch.Tensor, version: int | None = None
    ) -> Header:
        lo, hi = self._range
        to = self.vstage + 1 if kind == MessageKind.ACT else self.vstage - 1  # the receiver
        v = self._version if version is None else version
        return Header(kind, m, step, v, lo, hi, t.dtype, tuple(t.shape), to)

    def _loss(
        self,
        m: int,
        out: torch.Tensor,
        targets: Sequence[torch.Tensor] | None,
        m_count: int,
        log: StageLog,
    ) -> torch.Tensor:
        if targets is None or self.loss_fn is None:
            raise PipelineError(
                f"stage {self.stage} computes the loss and needs targets", stage=self.stage
            )
        try:
            loss = self.loss_fn(out, targets[m].to(self.device))
        except Exception as exc:
            raise self._fail("loss function", None, m, "forward", exc) from exc
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(
                f"stage {self.stage}: the loss of micro-batch {m} is {value}",
                stage=self.stage,
                microbatch=m,
            )
        log.loss_sum += value
        return loss / m_count

    def _backward(
        self, m: int, grad: torch.Tensor | None, step: int, log: StageLog, *, split: bool = False
    ) -> None:
        """B (or, ``split``, I: input gradient only, stash kept until W) of micro-batch ``m``."""
        boundaries, top, marks = self._stash[m] if split else self._stash.pop(m)
        version = self._stash_version.pop(m, None)
        if not split:
            self._live_bytes -= self._stash_bytes.pop(m, 0)
        t0 = time.perf_counter()
        try:
            if split:  # grad is None on the last stage: top is the loss
                x_grad, pending = input_pass(
                    top, grad, boundaries, self._w_params, self.is_last, self._whole_w
                )
            else:
                torch.autograd.backward(top, grad)
                x_grad = boundaries[0].grad
        except Exception as exc:
            raise self._fail(
                backward_culprit(self.segments, boundaries, marks, self.is_last),
                None,
                m,
                "input-gradient backward (I)" if split else "backward",
                exc,
            ) from exc
        t_end = time.perf_counter()
        if split:  # the gradients W needs count in the stash until W(m) ends
            self._pending_w[m] = pending
            self._stash_bytes[m] += pending.nbytes
            self._live_bytes += pending.nbytes
        if self.up is not None:
            if x_grad is None:
                raise PipelineError(
                    f"stage {self.stage}: no gradient reached the input of micro-batch {m}",
                    stage=self.stage,
                    microbatch=m,
                )
            # Sent before the per-layer bookkeeping: the previous stage may be waiting for it.
            # PipeDream-2BW: a gradient the upstream stage takes in its next step is filed
            # under that step (round) and its id there.
            ahead = m in self.grads_for_next_step
            sent = m - self.microbatches_of_step if ahead else m
            header = self._header(MessageKind.GRAD, sent, step + ahead, x_grad, version)
            self.up.send(header, x_grad)
        layer_backward_times(self.segments, boundaries, marks, (t0, t_end), self.is_last, log)

    def _backward_weight(self, m: int, log: StageLog) -> None:
        """W of micro-batch ``m`` from what I(m) kept (see splitgrad); then its stash goes."""
        try:
            weight_pass(self.segments, self._pending_w.pop(m), log.layer_backward)
        except WeightPassError as err:
            phase = "weight-gradient backward (W)"
            raise self._fail(err.name, err.layer, m, phase, err.cause) from err.cause
        finally:
            del self._stash[m]
            self._live_bytes -= self._stash_bytes.pop(m, 0)
