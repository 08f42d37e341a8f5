"""LocalStage: everything one rank holds of the pipeline, in one object.

A rank holds model chunks (``chunks``: one, or V under a chunked schedule, chunk c being
virtual stage ``schedule.virtual_stage(rank, c)``: ``c * S + rank`` under interleaved 1F1B's
looping placement, the V of ZB-V: ``rank`` and ``2S - 1 - rank``), their optimizer and its
factory, the weight version, its links to the ranks of the neighbouring virtual stages (one
Link per peer rank, shared by the chunks; the first and last ranks of an interleaved schedule
also have the wrap-around link between them; two neighbouring virtual stages on this rank, as
ZB-V's turn on rank S-1, hand over through a ``LocalLink``), the plan (partition: one range
per virtual stage; micro-batches, schedule), the step counter, the plan changes not yet
reported, the control plane and the whole model's blocks (those not held are twins on the
"meta" device, materialised if they migrate here).

Each piece of state lives here once. One ``StageWorker`` per chunk executes that chunk's actions
(it reads the segments from the chunk and gets the version per step); migration, checkpoints
and the step report take a LocalStage and change it only through its methods
(``adopt_partition``, ``set_microbatches``, ``restore``, ``finish_step``). ``Pipeline`` is a
facade over one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..core import twobw
from ..core.decisions import Plan
from ..core.partition import Partition
from ..core.schedules import Schedule, make_schedule, validate
from .chunk import Chunk, Segment
from .comm import Link
from .config import PipelineConfig, check_schedule
from .control import Control
from .layerstate import OptimizerFactory, named_params, optimizer_state, rebuild_optimizer
from .locallink import LocalLink
from .stage import LossFn, StageWorker
from .transport import links_of, make_transport
from .undo import StepMark
from .versions import AsyncState, WeightVersions


class LocalStage:
    """One rank's share of the pipeline: its chunks, optimizer, version, links and plan."""

    def __init__(
        self,
        stage: int,
        num_stages: int,
        blocks: list[nn.Module],
        loss_fn: LossFn,
        factory: OptimizerFactory,
        config: PipelineConfig,
        device: torch.device,
        *,
        pre: nn.Module | None = None,
        post: nn.Module | None = None,
    ) -> None:
        self.stage, self.num_stages = stage, num_stages
        #: The whole model's blocks; those this rank does not hold are on "meta".
        self.blocks = blocks
        self.pre, self.post = pre, post
        self.factory = factory
        self.schedule_name = config.schedule
        #: 2BW's forwards ahead of the next rank (core.twobw; 1 for flushed schedules).
        self.lead = config.lead
        self.recv_timeout = config.recv_timeout
        self.device = device
        #: V: model chunks (virtual stages) per rank.
        self.num_chunks = config.chunks_per_rank()
        if self.num_chunks > 1 and num_stages < 2:
            raise ValueError(
                f"{config.schedule} needs at least 2 stages (its chunks pass activations "
                f"between ranks); got {num_stages}"
            )
        self.partition: Partition = config.resolve_partition(len(blocks), num_stages)
        self.microbatches: int = config.microbatches
        self.schedule: Schedule = self._make_schedule(config.microbatches)
        #: Weight version: optimizer steps applied to the held layers (stamped on messages).
        self.version = 0
        #: Steps completed.
        self.step_count = 0
        #: Samples in the last step's batch (a new M must divide it).
        self.last_batch_size: int | None = None
        #: Plan changes (and refusals) since the last report, for the next one.
        self.pending_events: list[str] = []
        #: Seconds spent applying them.
        self.change_s = 0.0
        #: Phase of the current step: "check" inputs, "run" actions, "done".
        self.phase = "done"
        #: What undoing the current step restores.
        self.mark = StepMark.take({}, device)
        #: Start of this rank's clock for reports (perf_counter; set again by ``start``).
        self.epoch = time.perf_counter()
        vstages = [self.schedule.virtual_stage(stage, c) for c in range(self.num_chunks)]
        held = {i for v in vstages for i in self.partition.layers(v)}
        for i, block in enumerate(blocks):
            if i not in held:
                block.to("meta")  # a twin without storage: materialised if it migrates here
        self.chunks = [
            Chunk(stage, self._segments(self.partition, v), c, v) for c, v in enumerate(vstages)
        ]
        #: Where this rank's links send headers and tensors (made before the control plane
        #: starts: it agrees the data backend in one collective over every rank).
        self.transport = make_transport(
            stage,
            links_of([self.rank_of(v) for v in range(self.schedule.num_virtual_stages)]),
            device,
            config.init_timeout,
        )
        self.control = control = Control(
            stage,
            num_stages,
            interval=config.heartbeat_interval,
            timeout=config.heartbeat_timeout,
            wait_timeout=config.recv_timeout,
        )
        fault = control.fault
        last = self.schedule.num_virtual_stages - 1
        ups = [self.rank_of(v - 1) if v > 0 else None for v in vstages]
        downs = [self.rank_of(v + 1) if v < last else None for v in vstages]
        peers = sorted({p for p in ups + downs if p is not None and p != stage})
        #: One link per peer rank, shared by the chunks (messages name their virtual stage).
        self._links = {p: Link(stage, p, self.transport, fault) for p in peers}
        #: The hop between two chunks of this rank (ZB-V's turn), if any: not a peer's link.
        self.local_link: LocalLink | None = LocalLink(stage) if stage in ups + downs else None
        by_rank: dict[int, Link | LocalLink] = dict(self._links)
        if self.local_link is not None:
            by_rank[stage] = self.local_link
        #: The links to ranks stage - 1 and stage + 1 (None at the ends).
        self.up, self.down = self._links.get(stage - 1), self._links.get(stage + 1)
        for ln in self.links():
            control.watch(ln.cond)
        #: The executor of each chunk, in chunk order.
        self.workers = [
            StageWorker(
                chunk,
                last + 1,
                loss_fn,
                None if up is None else by_rank[up],
                None if down is None else by_rank[down],
                device,
                config.recv_timeout,
                config.activation_checkpointing,
            )
            for chunk, up, down in zip(self.chunks, ups, downs, strict=True)
        ]
        self.optimizer = rebuild_optimizer(factory, self.modules(), None, {})
        #: PipeDream-2BW's weight versions and stream position (None: a flushed schedule).
        self.stream: AsyncState | None = None
        if self.schedule_name == twobw.NAME:
            self.stream = AsyncState(WeightVersions(named_params(self.modules()), stage))

    # --- reading --------------------------------------------------------------------------

    @property
    def is_last(self) -> bool:
        """True on the stage that computes the loss (holding the last virtual stage)."""
        return any(w.is_last for w in self.workers)

    @property
    def forwards_done(self) -> int:
        """Forward actions completed in the step being run, over the chunks."""
        return sum(w.forwards_done for w in self.workers)

    def rank_of(self, vstage: int) -> int:
        """The rank that holds (virtual) stage ``vstage``."""
        return self.schedule.locate(vstage)[0]

    def layers(self) -> list[int]:
        """Global indices of the layers this rank holds, in order."""
        return [i for c in self.chunks for i in self.partition.layers(c.vstage)]

    @property
    def plan(self) -> Plan:
        """The current partition, micro-batches and schedule."""
        return Plan(self.partition, self.microbatches, self.schedule.name, self.lead)

    def modules(self) -> dict[str, nn.Module]:
        """Global name -> module of every segment this rank holds ("pre", "layers.3", "post")."""
        return {name: mod for chunk in self.chunks for name, mod in chunk.modules().items()}

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Module state dicts of the held segments, by global name."""
        return {name: mod.state_dict() for name, mod in self.modules().items()}

    def links(self) -> list[Link]:
        """The links to the ranks of the neighbouring virtual stages, by peer rank."""
        return list(self._links.values())

    def link_to(self, peer: int) -> Link | None:
        """The link to stage ``peer``, if it is a neighbour."""
        return self._links.get(peer)

    # --- changing -------------------------------------------------------------------------

    def start(
        self, share: dict[str, Any], *, kill_frozen: bool, timeout: float
    ) -> list[dict[str, Any]]:
        """Every rank is up (one control exchange of ``share``); the report clock starts."""
        shared = self.control.start(kill_frozen=kill_frozen, share=share, timeout=timeout)
        self.epoch = time.perf_counter()
        return shared

    def begin(self, *, recovering: bool = False) -> int:
        """Start a round on the control plane and every link (PipelinePoisoned if poisoned)."""
        rnd = self.control.begin(recovering=recovering)
        for ln in self.links():
            ln.begin(rnd)
        if self.local_link is not None:
            self.local_link.begin(rnd)
        return rnd

    def adopt_partition(
        self,
        partition: Partition,
        carried: dict[str, dict[str, Any]],
        older: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Commit a new partition: swap segments and rebuild the optimizer, keeping all state.

        ``carried``: optimizer state of the layers that arrived, by global parameter name;
        ``older`` (PipeDream-2BW, between streams): their previous weight version.
        """
        old = self.modules()
        kept_older = self.stream.versions.older() if self.stream is not None else {}
        kept = optimizer_state(self.optimizer, old)
        self.partition = partition
        for chunk in self.chunks:
            chunk.segments = self._segments(partition, chunk.vstage)
        new = self.modules()
        if set(new) != set(old):
            self.optimizer = rebuild_optimizer(
                self.factory, new, self.optimizer, {**kept, **carried}
            )
            for name, module in old.items():
                if name not in new:
                    module.to("meta")  # freed only after the commit
        if self.stream is not None:
            both = {**kept_older, **(older or {})}
            self.stream.versions = WeightVersions.at(
                named_params(new), both, self.stream.versions.newest, self.stage
            )

    def set_microbatches(self, microbatches: int) -> None:
        """Run the next steps with ``microbatches`` micro-batches (schedule rebuilt and checked)."""
        self.schedule = self._make_schedule(microbatches)
        self.microbatches = microbatches

    def set_schedule(self, name: str) -> None:
        """Run the next steps under schedule ``name``, same M (schedule rebuilt and checked).

        Only between schedules of one model chunk per rank: ValueError for any other (switching
        to or from an interleaved schedule would cut the model into other chunks).
        """
        check_schedule(name)
        if twobw.NAME in (name, self.schedule.name):
            raise ValueError(
                f"cannot switch schedule {self.schedule.name} -> {name}: {twobw.NAME} (no flush "
                "between steps) is chosen in PipelineConfig.schedule at the start"
            )
        if make_schedule(name, 1, 1).chunks > 1 or len(self.chunks) > 1:
            raise ValueError(
                f"cannot switch schedule {self.schedule.name} -> {name}: a switch runs only "
                "between schedules of one model chunk per rank (1f1b, gpipe, zb-h1); set a "
                "chunked schedule in PipelineConfig.schedule at the start instead"
            )
        old, self.schedule_name = self.schedule_name, name
        try:
            self.schedule = self._make_schedule(self.microbatches)
        except BaseException:
            self.schedule_name = old
            raise

    def restore(
        self,
        optimizer_state: Mapping[str, dict[str, Any]],
        hyper: Mapping[str, Any],
        version: int,
        step: int,
    ) -> None:
        """Take loaded state: a fresh optimizer holding ``optimizer_state`` (by global parameter
        name, on any device) with hyperparameters ``hyper``, the version and the step count."""
        device_state = {
            n: {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
            for n, st in optimizer_state.items()
        }
        self.optimizer = rebuild_optimizer(self.factory, self.modules(), None, device_state)
        if self.optimizer is not None and hyper:
            for group in self.optimizer.param_groups:
                group.update(hyper)
        self.version = version
        self.step_count = step

    def note(self, event: str | None, seconds: float) -> None:
        """Record a plan change or refusal (None: nothing changed) for the next report, and
        the seconds spent on it."""
        if event is not None:
            self.pending_events.append(event)
        self.change_s += seconds

    def finish_step(self) -> None:
        """A step completed: the next starts with no pending events and one more step."""
        self.pending_events, self.change_s = [], 0.0
        self.step_count += 1

    def skew_version(self, by: int) -> None:
        """For fault-injection tests only: pretend the weights are ``by`` steps off.

        The neighbours then refuse this rank's messages (VersionMismatch), as they would
        after a lost or duplicated optimizer step.
        """
        self.version += by

    def discard(self) -> None:
        """Drop what a step left in the workers (stashed activations and graphs)."""
        for w in self.workers:
            w.discard()

    def close(self) -> None:
        """Say goodbye on every link, then on the control plane (threads stop)."""
        for ln in self.links():
            ln.close()
        self.control.close()

    # --- helpers --------------------------------------------------------------------------

    def _segments(self, partition: Partition, vstage: int) -> list[Segment]:
        """Virtual stage ``vstage``'s segments under ``partition`` (pre first on the first,
        post last on the last)."""
        segments = [Segment.block(i, self.blocks[i]) for i in partition.layers(vstage)]
        if self.pre is not None and vstage == 0:
            segments.insert(0, Segment.pre(self.pre))
        if self.post is not None and vstage == partition.num_stages - 1:
            segments.append(Segment.post(self.post))
        for seg in segments:
            seg.module.to(self.device)
        return segments

    def _make_schedule(self, microbatches: int) -> Schedule:
        sched = make_schedule(
            self.schedule_name, self.num_stages, microbatches, self.num_chunks, lead=self.lead
        )
        validate(sched)  # a 2BW window: as the stream it belongs to
        return sched
