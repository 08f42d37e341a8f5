"""One training step on a rank's LocalStage, and what a failed step leaves behind.

``run`` checks the batch, runs the rank's actions (each on the StageWorker of its chunk, see
``driver``), applies the optimizer, bumps the weight version and merges every rank's share into
the step report (PipeDream-2BW without a controller: posts its share and merges it later, see
``StepOutput`` and ``stepreport``). ``undoable`` and ``fail`` decide, for a failure at any
point, whether the step can be undone on every rank (no optimizer applied anywhere yet) or the
pipeline is poisoned (see docs/DESIGN.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import torch
from opentelemetry.trace import Span

from ..core.errors import BatchError, PeerGone, PipelineError, PipelineTimeout
from ..core.report import StepReport, append_jsonl
from ..observability.telemetry import Telemetry
from .driver import run_actions
from .local import LocalStage
from .stepreport import GatheredReport, PendingReport, ReportMeta, local_part
from .twobw import run_window, settle
from .versions import AsyncState

log = structlog.get_logger("adaptive_pp.pipeline")


class StepOutput:
    """What Pipeline.step returns: the mini-batch loss (same on every rank) and the report.

    A flushed step gathers every rank's share at its end; the report is merged from them
    when first read (at once when telemetry, a run directory or configured logging want it).

    PipeDream-2BW without a controller: the step returns without waiting for its peers. The
    loss comes from the last stage, which posts it right after its last forward; reading
    ``loss`` takes it then (on the other ranks, waiting for it if it is not in yet: right after
    the step, for the last stage's last forward of that step). The report of step t is merged
    from shares its ranks post without waiting; reading ``report`` merges it then, waiting for
    any share not in yet (right after the step: for every rank's end of window t). The next
    step, a drain, a change or a checkpoint collects both in any case, so reading them after
    the next step waits for nothing; telemetry and ``run_dir``'s reports.jsonl get the report
    then (one step late, without the step's span). With a controller every step's report is
    gathered at its end, as a flushed schedule's is, and the decision lands before the next
    step.
    """

    __slots__ = ("_loss", "_report")

    def __init__(
        self, loss: float | None, report: StepReport | PendingReport | GatheredReport
    ) -> None:
        """``loss`` None: the pending report's (``PendingReport.loss``)."""
        self._loss = loss
        self._report = report

    @property
    def loss(self) -> float:
        """The mini-batch loss (taken now if it is still on its way)."""
        if self._loss is None:
            pending = self._report
            loss = pending.loss if isinstance(pending, StepReport) else pending.loss()
            assert loss is not None  # a merged report's loss is the last stage's share's
            self._loss = loss
        return self._loss

    @property
    def report(self) -> StepReport:
        """The step's report (merged now if it is still pending)."""
        if not isinstance(self._report, StepReport):
            self._report = self._report.result()
        return self._report

    def __iter__(self) -> Iterator[float | StepReport]:
        """``loss, report = out``, as when this was a named tuple."""
        return iter((self.loss, self.report))

    def __repr__(self) -> str:
        loss = "<pending>" if self._loss is None else repr(self._loss)
        return f"StepOutput(loss={loss}, report={self._report!r})"


def split_batch(batch: torch.Tensor, microbatches: int, what: str) -> list[torch.Tensor]:
    """Split along dim 0 into equal micro-batches; BatchError (a ValueError) if it does not."""
    size = batch.shape[0]
    if size % microbatches != 0:
        raise BatchError(
            f"the {what} batch has {size} samples, which does not split into {microbatches} "
            f"equal micro-batches; use a batch size divisible by M={microbatches} or change M"
        )
    return list(torch.split(batch, size // microbatches))


def run(
    local: LocalStage,
    inputs: torch.Tensor | None,
    targets: torch.Tensor | None,
    telemetry: Telemetry,
    span: Span | None,
    run_dir: str | Path | None,
    *,
    late: bool = False,
) -> StepOutput:
    """Forward and backward over all micro-batches, then the optimizer, on this rank.

    The caller has begun the round and set ``local.phase = "check"``; a failure is handled
    by ``fail`` (with ``undoable``'s verdict). ``late`` (PipeDream-2BW only): no gather at
    the end; the loss comes from the last stage as soon as it has it, the report when read
    (``StepOutput``).
    """
    stage, m_count = local.stage, local.microbatches
    t0 = time.perf_counter()
    ins = split_batch(inputs, m_count, "input") if inputs is not None and stage == 0 else None
    tgts = split_batch(targets, m_count, "target") if targets is not None else None
    if stage == 0 and ins is None:
        raise BatchError("stage 0 needs the inputs: pass them to step() on rank 0", stage=0)
    if local.is_last and tgts is None:
        raise BatchError(
            f"stage {stage} computes the loss: pass the targets to step()", stage=stage
        )
    batch = inputs if inputs is not None else targets
    if batch is not None:
        local.last_batch_size = int(batch.shape[0])
    local.phase = "run"
    if local.stream is not None:  # PipeDream-2BW: a window; it makes its version itself
        late = late and local.num_stages > 1
        stage_log, (t_opt, t_done) = run_window(
            local, local.stream, ins, tgts if local.is_last else None, t0, post_loss=late
        )
        local.phase = "done"
    else:
        stage_log = run_actions(
            local.workers,
            local.schedule.stages[stage],
            ins,
            tgts if local.is_last else None,
            local.control.round,
            t0,
            version=local.version,
        )
        local.phase = "done"
        for ln in local.links():
            ln.flush()
        t_opt = time.perf_counter()
        if local.optimizer is not None:
            local.optimizer.step()
            local.optimizer.zero_grad(set_to_none=True)
        local.version += 1
        t_done = time.perf_counter()
    part = local_part(local, stage_log, t0, t_done - t_opt)
    if telemetry.detail:
        telemetry.record_actions(
            span,
            stage_log.actions,
            stage_log.start,
            stage_log.end,
            t0,
            optimizer=(t_opt - t0, t_done - t0),
        )
    meta = ReportMeta.of(local)
    wanted = run_dir is not None or telemetry.enabled or structlog.is_configured()
    if local.stream is not None and late:
        publish = partial(_publish, stage, None, run_dir, telemetry) if wanted else None
        return _posted(local, local.stream, meta, part, t0, publish)
    if local.stream is not None:
        settle(local.stream)  # reports posted before a controller was set
    gathered = GatheredReport(meta, local.control.all_gather(part), time.perf_counter() - t0)
    local.finish_step()
    if not wanted:  # merged when read (a controller reads it at once)
        return StepOutput(gathered.loss(), gathered)
    report = gathered.result()
    _publish(stage, span, run_dir, telemetry, report)
    return StepOutput(gathered.loss(), report)


def _posted(
    local: LocalStage,
    state: AsyncState,
    meta: ReportMeta,
    part: dict[str, Any],
    t0: float,
    publish: Callable[[StepReport], None] | None,
) -> StepOutput:
    """End a 2BW step without waiting for a peer: post this rank's share, collect the previous
    step's shares and loss (in by now). The loss the last stage posted after its last forward
    is taken when read (``StepOutput.loss``) or settled with the report. ``publish`` gets the
    report when it is merged (telemetry, run log; None: nobody needs it before it is read)."""
    pending = PendingReport(local.control, meta, part, publish)
    settle(state)
    state.unsettled.append(pending)
    local.finish_step()
    pending.wall = time.perf_counter() - t0
    return StepOutput(part["loss"] if local.is_last else None, pending)


def _publish(
    stage: int,
    span: Span | None,
    run_dir: str | Path | None,
    telemetry: Telemetry,
    report: StepReport,
) -> None:
    """Record a merged report: telemetry, ``run_dir``'s reports.jsonl (stage 0), a log event."""
    telemetry.record(span, report)
    if run_dir is not None and stage == 0:
        append_jsonl(Path(run_dir) / "reports.jsonl", report)
    me = report.stages[stage]
    # Per-step events only once the application has configured structlog: its
    # unconfigured default prints every level, which would mean a line per step per rank.
    if structlog.is_configured():
        log.debug(
            "step",
            loss=report.loss,
            step_ms=round(report.step_time * 1e3, 3),
            bubble=round(me.bubble, 4),
            utilization=round(me.utilization, 4),
            wait_ms=round(me.wait * 1e3, 3),
            events=list(report.events),
        )


def undoable(local: LocalStage) -> bool:
    """Whether a failure here, now, leaves every rank's optimizer untouched.

    Every rank's last action needs the loss of the last micro-batch, so the last forward of
    every chunk of every rank: until this rank has run them all, no rank can finish. The rank
    that computes the loss also starts every backward chain: until its last virtual stage has
    sent its last input gradient, no rank can finish either (1F1B: its last action; ZB-V's
    rank 0 runs its first virtual stage's I's and its W's after it, and a failure then is not
    undoable: the other ranks may have stepped).
    """
    if local.phase == "check":
        return True
    if local.phase != "run" or local.stream is not None:  # 2BW: the stream cannot rewind
        return False
    m = local.microbatches
    if any(w.is_last and w.backwards_done < m for w in local.workers):
        return True
    return local.forwards_done < m * local.num_chunks


def fail(local: LocalStage, exc: BaseException, *, undoable: bool) -> None:
    """Fail this round on every rank: tell the peers, undo the step here or poison."""
    remote = isinstance(exc, PipelineError) and exc.remote
    undone = exc.undone if isinstance(exc, PipelineError) and remote else undoable
    if isinstance(exc, PeerGone | PipelineTimeout):
        undone = False  # a stage is gone or stuck: nothing to go on with
    if undone:
        local.discard()
        changed = local.mark.undo(local.modules(), local.device)
        if changed is not None:  # cannot be undone here after all: nobody may go on
            local.control.poison(
                PipelineError(
                    f"stage {local.stage} cannot undo the failed step: its forward pass "
                    f"changed buffer {changed} (batch-norm statistics?)",
                    stage=local.stage,
                )
            )
            undone = False
    if not remote:
        if isinstance(exc, PipelineError):
            exc.undone = undone
        local.control.notify(exc, undone=undone)
    log.warning("step.failed", error=f"{type(exc).__name__}: {exc}", undone=undone, remote=remote)
