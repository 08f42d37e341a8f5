"""Pipeline: wrap a model (nn.Sequential or blocks + pre/post), train it one step at a time."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import structlog
import torch
import torch.distributed as dist
from opentelemetry import metrics, trace
from opentelemetry.trace import Span
from torch import nn
from torch._C._distributed_c10d import PrefixStore, Store
from torch.distributed.rendezvous import rendezvous

from ..core.decisions import (
    Controller,
    Decision,
    Keep,
    MoveLayers,
    Plan,
    describe,
    from_dict,
    to_dict,
)
from ..core.errors import BatchError, PeerGone, PipelineError, PipelineTimeout
from ..core.partition import Partition
from ..core.report import StepReport, append_jsonl
from ..core.schedules import Schedule, make_schedule, validate
from ..observability.telemetry import Telemetry
from . import checkpoint
from .comm import Link
from .config import PipelineConfig
from .control import Control
from .layerstate import OptimizerFactory, layer_name, optimizer_state, rebuild_optimizer
from .migration import MigrationAborted, apply_decision
from .stage import LossFn, Segment, StageWorker
from .stepreport import local_part, merge_parts
from .undo import StepMark, clear_gradients

log = structlog.get_logger("adaptive_pp.pipeline")


class StepOutput(NamedTuple):
    """What Pipeline.step returns: the mini-batch loss (same on every rank) and the report."""

    loss: float
    report: StepReport


def init_distributed(timeout_s: float) -> bool:
    """Join the process group from torchrun-style env vars; True if this call created it."""
    if dist.is_initialized():
        return False
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise RuntimeError(
            f"no process group and no {', '.join(missing)} in the environment: run under "
            "`torchrun --nproc-per-node S script.py` or through adaptive_pp.launch(fn, nprocs=S)"
        )
    timeout = datetime.timedelta(seconds=timeout_s)
    if not _RENDEZVOUS:
        store, _, _ = next(rendezvous("env://", timeout=timeout))
        _RENDEZVOUS.append(store)
    # A group made after one was destroyed gets the same store keys ("default_pg/0/...");
    # a rank quicker than rank 0 would read the old group's addresses, or the old store,
    # and hang. One store per process (rank 0 keeps serving it) and a fresh prefix per group.
    generation = len(_RENDEZVOUS)
    _RENDEZVOUS.append(store := _RENDEZVOUS[0])
    dist.init_process_group(
        "gloo",
        store=PrefixStore(f"adaptive_pp/{generation}/", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )
    return True


# The rendezvous store of this process, then one entry per group made on it.
_RENDEZVOUS: list[Store] = []


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def split_batch(batch: torch.Tensor, microbatches: int, what: str) -> list[torch.Tensor]:
    """Split along dim 0 into equal micro-batches; BatchError (a ValueError) if it does not."""
    size = batch.shape[0]
    if size % microbatches != 0:
        raise BatchError(
            f"the {what} batch has {size} samples, which does not split into {microbatches} "
            f"equal micro-batches; use a batch size divisible by M={microbatches} or change M"
        )
    return list(torch.split(batch, size // microbatches))


class Pipeline:
    """One stage of a pipeline-parallel model in this process; ``step`` trains one mini-batch."""

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
        self._owns_group = init_distributed(cfg.init_timeout)
        self.rank, world = dist.get_rank(), dist.get_world_size()
        self.num_stages = cfg.stages or world
        if self.num_stages != world:
            raise ValueError(
                f"{self.num_stages} stages need {self.num_stages} processes, got {world}"
            )
        self.blocks = list(model)
        if not self.blocks:
            raise ValueError("the model has no layers to pipeline")
        self._pre, self._post, self._factory = pre, post, optimizer_factory
        self.controller = controller
        self.partition = cfg.resolve_partition(len(self.blocks), self.num_stages)
        self.microbatches = cfg.microbatches
        self.schedule = self._make_schedule(cfg.microbatches)
        self.device = _device(cfg.device)
        self.last_batch_size: int | None = None
        self.pending_events: list[str] = []  # plan changes since the last report, for the next
        self.change_s = 0.0  # seconds spent applying them
        s = self.rank
        segments = self._segments(self.partition)
        for i, block in enumerate(self.blocks):
            if i not in self.partition.layers(s):
                block.to("meta")  # a twin without storage: materialised if it migrates here
        self.control = Control(
            s,
            world,
            interval=cfg.heartbeat_interval,
            timeout=cfg.heartbeat_timeout,
            wait_timeout=cfg.recv_timeout,
        )
        fault = self.control.fault
        up = Link(s, s - 1, fault=fault) if s > 0 else None
        down = Link(s, s + 1, fault=fault) if s < self.num_stages - 1 else None
        for ln in (up, down):
            if ln is not None:
                self.control.watch(ln.cond)
        self.worker = StageWorker(
            s,
            self.num_stages,
            segments,
            loss_fn,
            up,
            down,
            self.device,
            cfg.recv_timeout,
            cfg.activation_checkpointing,
        )
        self.optimizer = rebuild_optimizer(
            optimizer_factory, self.worker.named_segments(), None, {}
        )
        self.step_count = 0
        self._closed = False
        self._phase = "done"  # of the current step: "check" inputs, "run" actions, "done"
        self._mark = StepMark.take({}, self.device)
        structlog.contextvars.bind_contextvars(rank=self.rank, stage=s)
        self.telemetry = Telemetry(
            s,
            enabled=cfg.telemetry or tracer_provider is not None or meter_provider is not None,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            detail=cfg.trace_actions,
        )
        # One exchange: every rank is up; stage 0 sends each step's trace context when every
        # rank records spans.
        shared = self.control.start(
            kill_frozen=cfg.kill_frozen,
            share={"telemetry": self.telemetry.enabled},
            timeout=cfg.init_timeout,
        )
        self._trace_steps = all(r["telemetry"] for r in shared)
        self.epoch = time.perf_counter()

    def _segments(self, partition: Partition) -> list[Segment]:
        """This rank's segments under ``partition`` (pre first on stage 0, post last at the end)."""
        s = self.rank
        segments = [Segment(i, layer_name(i), self.blocks[i]) for i in partition.layers(s)]
        if self._pre is not None and s == 0:
            segments.insert(0, Segment(-1, "pre", self._pre))
        if self._post is not None and s == self.num_stages - 1:
            segments.append(Segment(-2, "post", self._post))
        for seg in segments:
            seg.module.to(self.device)
        return segments

    def apply(self, decision: Decision) -> str | None:
        """Apply a decision now, between steps, on every rank alike; return what changed.

        MoveLayers migrates boundary layers (two-phase; MigrationAborted leaves every rank on
        the old plan), SetMicrobatches changes M. The next step's report lists the change, or
        the refusal (ValueError for an invalid decision, MigrationAborted), which is re-raised.
        """
        self._begin()
        try:
            return self._apply(decision)
        except (MigrationAborted, ValueError):
            raise
        except BaseException as exc:
            self.telemetry.error(type(exc).__name__)  # no step span counts it
            self._failed(exc, undoable=False)
            raise

    def _apply(self, decision: Decision) -> str | None:
        t0 = time.perf_counter()
        kind = "migration" if isinstance(decision, MoveLayers) else "microbatches.change"
        attrs = {
            "adaptive_pp.decision": describe(decision),
            "adaptive_pp.partition": ",".join(map(str, self.partition.bounds)),
            "adaptive_pp.microbatches": self.microbatches,
        }
        try:
            with self.telemetry.change(kind, self.step_count, attrs) as span:
                event = apply_decision(self, decision)
                if span is not None and event is not None:
                    span.set_attribute("adaptive_pp.event", event)
        except (MigrationAborted, ValueError) as exc:
            self.pending_events.append(f"refused {describe(decision)}: {exc}")
            raise
        finally:
            self.change_s += time.perf_counter() - t0
        if event is not None:
            self.pending_events.append(event)
        return event

    def adopt_partition(self, partition: Partition, carried: dict[str, dict[str, Any]]) -> None:
        """Commit a new partition: swap segments and rebuild the optimizer, keeping all state."""
        old = self.worker.named_segments()
        kept = optimizer_state(self.optimizer, old)
        self.partition = partition
        self.worker.segments = self._segments(partition)
        new = self.worker.named_segments()
        if set(new) != set(old):
            self.optimizer = rebuild_optimizer(
                self._factory, new, self.optimizer, {**kept, **carried}
            )
            for name, module in old.items():
                if name not in new:
                    module.to("meta")  # freed only after the commit

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Checkpoint every stage (all ranks call it); ``extra`` (controller state) rides along."""
        self._begin()
        if self.controller is not None:
            extra = {**(extra or {}), "controller": self.controller.state_dict()}
        return checkpoint.save(self, path, extra)

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Resume from a checkpoint saved with any stage count or partition; return its meta.

        Also the way back from a poisoned pipeline: once every rank has loaded, steps work.
        """
        self._begin(recovering=True)
        meta = checkpoint.load(self, path)
        self.worker.discard()  # what a failed step may have left: stash, gradients
        clear_gradients(self.worker.named_segments())
        self.control.cure()
        if self.controller is not None and "controller" in meta["extra"]:
            self.controller.load_state_dict(meta["extra"]["controller"])
        return meta

    def set_microbatches(self, microbatches: int) -> None:
        """Run the next steps with ``microbatches`` micro-batches (schedule rebuilt and checked)."""
        self.schedule = self._make_schedule(microbatches)
        self.microbatches = microbatches

    def _make_schedule(self, microbatches: int) -> Schedule:
        sched = make_schedule(self.config.schedule, self.num_stages, microbatches)
        validate(sched)
        return sched

    @property
    def stage(self) -> int:
        """This process's stage index."""
        return self.rank

    @property
    def is_last(self) -> bool:
        """True on the stage that computes the loss."""
        return self.worker.is_last

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> StepOutput:
        """Forward and backward over all micro-batches, then the optimizer; every rank calls it.

        A failure on any rank fails the step on every rank, with the same error. If no rank
        can have applied its optimizer yet (a bad batch, a failure during the forward pass,
        a NaN loss), the step is undone everywhere (``error.undone``) and the next step is
        correct. Otherwise the pipeline is poisoned: later steps raise PipelinePoisoned until
        a checkpoint is loaded.
        """
        self._begin()
        structlog.contextvars.bind_contextvars(step=self.step_count)
        self._phase = "check"
        self._mark = StepMark.take(self.worker.named_segments(), self.device)
        parent = self._trace_parent()
        with self.telemetry.step(
            self.step_count,
            self.microbatches,
            self.schedule.name,
            self.partition.bounds,
            parent=parent,
        ) as span:
            try:
                if self._trace_steps and self.rank == 0:
                    self.control.broadcast(self.telemetry.carrier(), what="the trace context")
                out = self._step(inputs, targets, span)
                if self.controller is not None:
                    self._consult(out.report)
            except PipelineError as exc:
                named = self.control.blame(exc)  # a timeout on a silent peer: it froze
                self._failed(named, undoable=self._undoable())
                if named is not exc:
                    raise named from exc
                raise
            except BaseException as exc:
                self._failed(exc, undoable=self._undoable())
                raise
        return out

    def _trace_parent(self) -> dict[str, str] | None:
        """Stage 0's step span context, for one trace per step across the ranks."""
        if not self._trace_steps or self.rank == 0:
            return None
        try:
            parent: dict[str, str] = self.control.broadcast(None, what="the trace context")
        except PipelineError:
            return None  # the step fails: raised again inside its span
        return parent

    def _begin(self, *, recovering: bool = False) -> int:
        """Start a round on every link and the control plane (PipelinePoisoned if poisoned)."""
        rnd = self.control.begin(recovering=recovering)
        for ln in (self.worker.up, self.worker.down):
            if ln is not None:
                ln.begin(rnd)
        return rnd

    def _undoable(self) -> bool:
        """Whether a failure here, now, leaves every rank's optimizer untouched.

        Every rank's last action needs this rank's last forward output (downstream) or its
        last input gradient (upstream): until this rank has sent them, no rank can finish.
        """
        if self._phase == "check":
            return True
        if self._phase != "run":
            return False
        return self.is_last or self.worker.forwards_done < self.microbatches

    def _failed(self, exc: BaseException, *, undoable: bool) -> None:
        """Fail this round on every rank: tell the peers, undo the step here or poison."""
        remote = isinstance(exc, PipelineError) and exc.remote
        undone = exc.undone if isinstance(exc, PipelineError) and remote else undoable
        if isinstance(exc, PeerGone | PipelineTimeout):
            undone = False  # a stage is gone or stuck: nothing to go on with
        if undone:
            self.worker.discard()
            changed = self._mark.undo(self.worker.named_segments(), self.device)
            if changed is not None:  # cannot be undone here after all: nobody may go on
                self.control.poison(
                    PipelineError(
                        f"stage {self.rank} cannot undo the failed step: its forward pass "
                        f"changed buffer {changed} (batch-norm statistics?)",
                        stage=self.rank,
                    )
                )
                undone = False
        if not remote:
            if isinstance(exc, PipelineError):
                exc.undone = undone
            self.control.notify(exc, undone=undone)
        log.warning(
            "step.failed", error=f"{type(exc).__name__}: {exc}", undone=undone, remote=remote
        )

    def _step(
        self, inputs: torch.Tensor | None, targets: torch.Tensor | None, span: Span | None
    ) -> StepOutput:
        m_count = self.microbatches
        t0 = time.perf_counter()
        ins = (
            split_batch(inputs, m_count, "input") if inputs is not None and self.rank == 0 else None
        )
        tgts = split_batch(targets, m_count, "target") if targets is not None else None
        if self.rank == 0 and ins is None:
            raise BatchError("stage 0 needs the inputs: pass them to step() on rank 0", stage=0)
        if self.is_last and tgts is None:
            raise BatchError(
                f"stage {self.rank} computes the loss: pass the targets to step()", stage=self.rank
            )
        batch = inputs if inputs is not None else targets
        if batch is not None:
            self.last_batch_size = int(batch.shape[0])
        self._phase = "run"
        stage_log = self.worker.run(
            self.schedule.stages[self.rank],
            ins,
            tgts if self.is_last else None,
            self.control.round,
            t0,
        )
        self._phase = "done"
        links = [ln for ln in (self.worker.up, self.worker.down) if ln is not None]
        for ln in links:
            ln.flush()
        t_opt = time.perf_counter()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.worker.version += 1
        t_done = time.perf_counter()
        local = local_part(self, stage_log, t0, t_done - t_opt)
        report = merge_parts(self, self.control.all_gather(local), time.perf_counter() - t0)
        self.telemetry.record(span, report)
        if self.telemetry.detail:
            self.telemetry.record_actions(
                span,
                stage_log.actions,
                stage_log.start,
                stage_log.end,
                t0,
                optimizer=(t_opt - t0, t_done - t0),
            )
        self.pending_events, self.change_s = [], 0.0
        self.step_count += 1
        if self.config.run_dir is not None and self.rank == 0:
            append_jsonl(Path(self.config.run_dir) / "reports.jsonl", report)
        me = report.stages[self.rank]
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
        assert report.loss is not None
        return StepOutput(report.loss, report)

    @property
    def plan(self) -> Plan:
        """The current partition, micro-batches and schedule."""
        return Plan(self.partition, self.microbatches, self.schedule.name)

    def _consult(self, report: StepReport) -> None:
        """Rank 0's controller decides; every rank applies the same decision now."""
        assert self.controller is not None
        mine = to_dict(self.controller.decide(report, self.plan)) if self.rank == 0 else None
        decision = from_dict(self.control.broadcast(mine, what="the decision broadcast"))
        if isinstance(decision, Keep):
            return
        log.info("decision", step=report.step, decision=describe(decision), reason=decision.reason)
        try:
            self._apply(decision)
        except (MigrationAborted, ValueError) as exc:
            # Refused or aborted (apply noted it for the next report): the old plan stays.
            log.warning("decision.refused", decision=describe(decision), error=str(exc))

    def local_modules(self) -> dict[str, nn.Module]:
        """The modules this rank holds now, by global name ("pre", "layers.3", "post")."""
        return self.worker.named_segments()

    def local_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """This stage's module state dicts keyed by global name ("layers.3", "pre", "post")."""
        return self.worker.state()

    def close(self) -> None:
        """Say goodbye to the neighbours, stop receiver threads, leave the process group."""
        if self._closed:
            return
        self._closed = True
        for ln in (self.worker.up, self.worker.down):
            if ln is not None:
                ln.close()
        self.control.close()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
