"""Pipeline: wrap a model (nn.Sequential or blocks + pre/post), train it one step at a time."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.distributed as dist
from opentelemetry import metrics, trace
from torch import nn

from ..core.decisions import (
    Controller,
    Decision,
    Keep,
    MoveLayers,
    SetSchedule,
    describe,
    from_dict,
    to_dict,
)
from ..core.errors import PipelineError
from ..core.report import StepReport
from ..observability.telemetry import Telemetry
from . import checkpoint, resume
from . import step as steps
from .config import PipelineConfig
from .group import device_of, init_distributed
from .layerstate import OptimizerFactory
from .local import LocalStage
from .migration import MigrationAborted, apply_decision
from .pipeview import PipelineView
from .stage import LossFn
from .step import StepOutput, split_batch
from .twobw import run_drain
from .undo import StepMark, clear_gradients

__all__ = ["Pipeline", "StepOutput", "init_distributed", "split_batch"]

log = structlog.get_logger("adaptive_pp.pipeline")


class Pipeline(PipelineView):
    """One stage of a pipeline-parallel model in this process; ``step`` trains one mini-batch.

    A facade: this rank's state lives in one LocalStage (``local``); steps, decisions and
    checkpoints run on it. Use it as a context manager to close it on a clean exit.
    """

    def __init__(
        self,
        model: nn.Sequential | Sequence[nn.Module],
        loss_fn: LossFn,
        optimizer_factory: OptimizerFactory,
        config: PipelineConfig | None = None,
        *,
        pre: nn.Module | None = None,
        post: nn.Module | None = None,
        controller: Controller | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.config = cfg = config or PipelineConfig()
        if cfg.adaptive and controller is not None:
            raise ValueError(
                "PipelineConfig(adaptive=True) builds the default controller; pass either it "
                "or controller=..., not both"
            )
        self._owns_group = init_distributed(cfg.init_timeout)
        s, world = dist.get_rank(), dist.get_world_size()
        num_stages = cfg.stages or world
        if num_stages != world:
            raise ValueError(f"{num_stages} stages need {num_stages} processes, got {world}")
        blocks = list(model)
        if not blocks:
            raise ValueError("the model has no layers to pipeline")
        if cfg.adaptive:
            from controllers import default_policy  # the policies sit above the runtime

            controller = default_policy()
        self.controller = controller
        self._local = LocalStage(
            s,
            num_stages,
            blocks,
            loss_fn,
            optimizer_factory,
            cfg,
            device_of(cfg.device),
            pre=pre,
            post=post,
        )
        self._closed = False
        structlog.contextvars.bind_contextvars(rank=s, stage=s)
        self.telemetry = Telemetry(
            s,
            enabled=cfg.telemetry or tracer_provider is not None or meter_provider is not None,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            detail=cfg.trace_actions,
        )
        # One exchange: every rank is up; stage 0 sends each step's trace context when every
        # rank records spans.
        shared = self._local.start(
            {"telemetry": self.telemetry.enabled},
            kill_frozen=cfg.kill_frozen,
            timeout=cfg.init_timeout,
        )
        self._trace_steps = all(r["telemetry"] for r in shared)
        self.resumed_from: Path | None = None
        """The newest complete checkpoint of config.checkpoint_dir, loaded on start-up."""
        if cfg.checkpoint_dir is not None and (
            found := resume.find(self._local, cfg.checkpoint_dir)
        ):
            self.load_checkpoint(found)
            self.resumed_from = found

    # --- changing the plan ------------------------------------------------------------------

    def apply(self, decision: Decision) -> str | None:
        """Apply a decision now, between steps, on every rank alike; return what changed.

        MoveLayers migrates boundary layers (two-phase; MigrationAborted leaves every rank on
        the old plan), SetMicrobatches changes M, SetSchedule the schedule (same M; between
        schedules of one model chunk per rank). The next step's report lists the change, or
        the refusal (ValueError for an invalid decision, MigrationAborted), which is re-raised.
        """
        self.flush()  # PipeDream-2BW: changes land between streams
        self._local.begin()
        try:
            return self._apply(decision)
        except (MigrationAborted, ValueError):
            raise
        except BaseException as exc:
            self.telemetry.error(type(exc).__name__)  # no step span counts it
            steps.fail(self._local, exc, undoable=False)
            raise

    def _apply(self, decision: Decision) -> str | None:
        local = self._local
        t0 = time.perf_counter()
        kinds = {MoveLayers: "migration", SetSchedule: "schedule.change"}
        kind = kinds.get(type(decision), "microbatches.change")
        attrs = {
            "adaptive_pp.decision": describe(decision),
            "adaptive_pp.partition": ",".join(map(str, local.partition.bounds)),
            "adaptive_pp.microbatches": local.microbatches,
        }
        event = noted = None
        try:
            with self.telemetry.change(kind, local.step_count, attrs) as span:
                event = apply_decision(local, decision)
                if span is not None and event is not None:
                    span.set_attribute("adaptive_pp.event", event)
            # The report says what changed and, from a controller, why.
            noted = f"{event} ({decision.reason})" if event and decision.reason else event
        except (MigrationAborted, ValueError) as exc:
            noted = f"refused {describe(decision)}: {exc}"
            raise
        finally:
            local.note(noted, time.perf_counter() - t0)
        return event

    def set_microbatches(self, microbatches: int) -> None:
        """Run the next steps with ``microbatches`` micro-batches (schedule rebuilt and checked).

        Local to this rank, unchecked against the peers: ``apply(SetMicrobatches(m))`` is the
        agreed way.
        """
        self._local.set_microbatches(microbatches)

    def set_schedule(self, name: str) -> None:
        """Run the next steps under schedule ``name`` (rebuilt and checked; same M).

        Local to this rank, unchecked against the peers: ``apply(SetSchedule(name))`` is the
        agreed way.
        """
        self._local.set_schedule(name)

    # --- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Checkpoint every stage (all ranks call it); ``extra`` (controller state) rides along.

        PipeDream-2BW: drains first, and saves both weight versions."""
        self.flush()
        self._local.begin()
        if self.controller is not None:
            extra = {**(extra or {}), "controller": self.controller.state_dict()}
        return checkpoint.save(self._local, path, extra)

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Resume from a checkpoint saved with any stage count or partition; return its meta.

        Also the way back from a poisoned pipeline: once every rank has loaded, steps work.
        """
        local = self._local
        local.begin(recovering=True)
        meta = checkpoint.load(local, path)
        local.discard()  # what a failed step may have left: stash, gradients
        clear_gradients(local.modules())
        local.control.cure()
        if self.controller is not None and "controller" in meta["extra"]:
            self.controller.load_state_dict(meta["extra"]["controller"])
        return meta

    # --- training ---------------------------------------------------------------------------

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> StepOutput:
        """Forward and backward over all micro-batches, then the optimizer; every rank calls it.

        A failure on any rank fails the step on every rank, with the same error. If no rank
        can have applied its optimizer yet (a bad batch, a failure during the forward pass,
        a NaN loss), the step is undone everywhere (``error.undone``) and the next step is
        correct. Otherwise the pipeline is poisoned: later steps raise PipelinePoisoned until
        a checkpoint is loaded.

        PipeDream-2BW without a controller: no rank waits for its peers' ends of window. The
        loss comes from the last stage right after its last forward; the report is merged
        when read (``StepOutput``; read right after the step, it waits for every rank's end
        of window). A failure on a peer after it sent the loss surfaces at the next step.
        With a controller, each step's report is gathered at its end and the decision
        lands before the next step, on every rank alike (windows then do not overlap).
        """
        local = self._local
        local.begin()
        structlog.contextvars.bind_contextvars(step=local.step_count)
        local.phase = "check"
        local.mark = StepMark.take(local.modules(), local.device)
        parent = self._trace_parent()
        with self.telemetry.step(
            local.step_count,
            local.microbatches,
            local.schedule.name,
            local.partition.bounds,
            parent=parent,
        ) as span:
            try:
                if self._trace_steps and local.stage == 0:
                    local.control.broadcast(self.telemetry.carrier(), what="the trace context")
                late = self.controller is None  # 2BW: the report merged when read
                out = steps.run(
                    local, inputs, targets, self.telemetry, span, self.config.run_dir, late=late
                )
                if self.controller is not None:
                    self._consult(out.report)
            except PipelineError as exc:
                named = local.control.blame(exc)  # a timeout on a silent peer: it froze
                steps.fail(local, named, undoable=steps.undoable(local))
                if named is not exc:
                    raise named from exc
                raise
            except BaseException as exc:
                steps.fail(local, exc, undoable=steps.undoable(local))
                raise
        resume.after_step(local, self.config, self.save_checkpoint)  # checkpoint_every
        return out

    def _trace_parent(self) -> dict[str, str] | None:
        """Stage 0's step span context, for one trace per step across the ranks."""
        if not self._trace_steps or self.stage == 0:
            return None
        try:
            parent: dict[str, str] = self._local.control.broadcast(None, what="the trace context")
        except PipelineError:
            return None  # the step fails: raised again inside its span
        return parent

    def _consult(self, report: StepReport) -> None:
        """Rank 0's controller decides; every rank applies the same decision now."""
        assert self.controller is not None
        mine = to_dict(self.controller.decide(report, self.plan)) if self.stage == 0 else None
        got = self._local.control.broadcast(mine, what="the decision broadcast")
        decision = from_dict(got)
        if isinstance(decision, Keep):
            return
        log.info("decision", step=report.step, decision=describe(decision), reason=decision.reason)
        self._drain()  # PipeDream-2BW: changes land between streams
        try:
            self._apply(decision)
        except (MigrationAborted, ValueError) as exc:
            # Refused or aborted (apply noted it for the next report): the old plan stays.
            log.warning("decision.refused", decision=describe(decision), error=str(exc))

    def flush(self) -> None:
        """PipeDream-2BW: run the backwards the last step left and make the version they
        complete, so that the parameters hold every step's update (every rank calls it; no-op
        for flushed schedules and when nothing is left). The next step starts a new stream.
        """
        try:
            self._drain()
        except BaseException as exc:
            steps.fail(self._local, exc, undoable=False)
            raise

    def _drain(self) -> None:
        """The drain of ``flush``, in a round of its own (failures are the caller's)."""
        local = self._local
        if local.stream is not None and local.stream.spill:
            local.begin()
            run_drain(local, local.stream, time.perf_counter())

    # --- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Say goodbye to the neighbours, stop receiver threads, leave the process group
        (PipeDream-2BW: after draining what the last step left, unless poisoned)."""
        if self._closed:
            return
        if self._local.stream is not None and not self._local.control.poisoned:
            self.flush()
        self._closed = True
        self._local.close()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        """Close on a clean exit only; after an exception, leave closing to the caller.

        Closing says goodbye to every peer and waits for theirs (up to 5 s per link and for
        the control plane), then leaves the process group. After an exception the other
        ranks may still be mid-step or mid-exchange with this one (an error raised on this
        rank alone, outside ``step``): they would not answer, so this rank would wait out
        the timeouts and then pull the group from under them. Without ``close`` they learn
        of the failure as they would of a dead rank (heartbeats, PeerGone). The receiver,
        heartbeat and reaper threads are daemons, so they never keep the process alive;
        a process that goes on after a failure (say, to build a new Pipeline) calls
        ``close()`` itself, which works on a poisoned pipeline too.
        """
        if exc[0] is None:
            self.close()
