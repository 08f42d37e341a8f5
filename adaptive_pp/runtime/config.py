"""PipelineConfig: every knob of a pipeline run in one keyword-only dataclass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..core.partition import Partition
from ..core.schedules import ASYNC_SCHEDULES, SCHEDULE_NAMES, make_schedule
from ..core.twobw import check_lead


@dataclass(kw_only=True)
class PipelineConfig:
    """Configuration of a Pipeline; every field has a default."""

    stages: int | None = None
    """Pipeline stages; defaults to the world size (one stage per process)."""
    microbatches: int = 4
    """M: the mini-batch is split into this many equal micro-batches."""
    schedule: str = "1f1b"
    """"1f1b" (default), "gpipe", "zb-h1" (split backward: I, then W; see runtime.splitgrad) or
    "interleaved-1f1b" (``chunks`` model chunks per rank; M must be a multiple of the stages),
    "zb-v" (ZB-V: 2 chunks per rank in V placement, split backward; see core.zbv), or "2bw":
    PipeDream-2BW, 1F1B without a flush between steps, each step's micro-batches on the
    weights of two steps back (see runtime.twobw; M >= lead x (stages - 1))."""
    lead: int = 1
    """"2bw" only: forwards each rank runs ahead of the next (its warm-up is lead x (S-1-s)).
    1: PipeDream-2BW's order, the fewest activations in flight (S - s); each hop's latency then
    adds to the step. 2: a message has one action's time to arrive, so hops are hidden, for
    about twice the activations in flight (2(S-1-s) + 1). Same numbers trained either way.
    ``Pipeline.plan`` carries it, so controllers plan with it (the tuner's memory estimate)."""
    chunks: int = 2
    """V, the model chunks (virtual stages) per rank of "interleaved-1f1b" (virtual stage
    v = chunk * S + rank: the S*V ranges of the partition loop over the ranks); "zb-v" holds 2
    (leave chunks at 2): chunk 0 of rank r is virtual stage r, chunk 1 is 2S - 1 - r, the
    ranges go down the ranks and back up; other schedules hold one."""
    partition: Partition | Sequence[int] | None = None
    """Layer bounds per (virtual) stage, e.g. (0, 5, 9, 16); S*V ranges in model order for an
    interleaved schedule; default: balanced over layer_costs, else even."""
    layer_costs: Sequence[float] | None = None
    """Relative cost of each layer, used to balance the partition when none is given."""
    init_timeout: float = 120.0
    """Seconds the process group waits for every rank to join (and for collectives)."""
    recv_timeout: float = 300.0
    """Seconds a stage waits for one message before it reports the peer as stuck."""
    heartbeat_timeout: float | None = 10.0
    """Seconds without a heartbeat after which a stage is named frozen or dead on every rank
    (None: no heartbeats; a frozen stage is then found by recv_timeout alone)."""
    heartbeat_interval: float = 1.0
    """Seconds between two heartbeats of a rank (sent from a thread of their own)."""
    kill_frozen: bool = True
    """Kill (SIGKILL) a stage named frozen when it runs on the same host as the rank that
    noticed, so that torchrun or launch ends the job at once (a stopped process cannot act on
    SIGTERM; torchrun waits 30 s for it). Turn off to attach a debugger that stops a rank."""
    checkpoint_dir: str | None = None
    """If set, the pipeline resumes on start-up from the latest complete checkpoint in this
    folder (``Pipeline.resumed_from``, ``step_count`` say where it is), and with
    ``checkpoint_every`` saves CHECKPOINT_DIR/step-NNNNNNNN there (see runtime/resume.py)."""
    checkpoint_every: int = 0
    """Save a checkpoint into checkpoint_dir after every this many steps (0: never)."""
    checkpoint_keep: int = 2
    """Complete checkpoints kept in checkpoint_dir: older ones are deleted after each save."""
    run_dir: str | None = None
    """If set, every step's report is appended to RUN_DIR/reports.jsonl (rank 0 writes)."""
    device: str = "auto"
    """"cpu", "cuda" or "auto" (cuda:LOCAL_RANK when CUDA is available)."""
    telemetry: bool = False
    """Emit OpenTelemetry spans and metrics (opentelemetry-api; no-op without an SDK)."""
    trace_actions: bool = False
    """With telemetry: child spans of each step for every forward, backward, wait and the
    optimizer (made after the step from its timings; a cost per span, a diagnostic switch)."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward (torch.utils.checkpoint) to save memory."""
    adaptive: bool = False
    """Rebalance while training with the default policy (``controllers.default_policy()``:
    move boundary layers when stages are uneven, switch 1F1B <-> ZB-H1 when predicted faster
    and kept only if measured faster). Every report carries each layer's real bytes and the
    batch size for it. To use another controller (one with the M tuner, say), pass
    ``Pipeline(..., controller=...)`` and leave this False."""

    def __post_init__(self) -> None:
        check_schedule(self.schedule)
        check_lead(self.lead)
        if self.lead != 1 and self.schedule != "2bw":
            raise ValueError(f"lead={self.lead} is for schedule='2bw' only, not {self.schedule!r}")
        if self.schedule == "2bw" and self.activation_checkpointing:
            raise ValueError(
                "2bw with activation_checkpointing is not supported: a spilled backward would "
                "recompute its forward on the next step's weight version"
            )
        if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or self.chunks < 1:
            raise ValueError(f"chunks must be an int >= 1, got {self.chunks!r}")
        if self.schedule == "zb-v" and self.chunks != 2:
            raise ValueError(f"zb-v runs 2 model chunks per rank, got chunks={self.chunks}")
        if self.checkpoint_every < 0 or (self.checkpoint_every and not self.checkpoint_dir):
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} needs a checkpoint_dir and must be >= 0"
            )
        if self.checkpoint_keep < 1:
            raise ValueError(f"checkpoint_keep must be >= 1, got {self.checkpoint_keep}")
        if self.stages and (self.chunks_per_rank() > 1 or self.lead > 1):  # M, if S is known
            make_schedule(
                self.schedule, self.stages, self.microbatches, self.chunks, lead=self.lead
            )

    def chunks_per_rank(self) -> int:
        """V: model chunks per rank (``chunks`` for a chunked schedule, else 1)."""
        return make_schedule(self.schedule, 1, 1, self.chunks).chunks

    def resolve_partition(self, num_layers: int, num_ranks: int) -> Partition:
        """The partition to start from (one range per virtual stage: ranks x chunks), checked
        against the model and the stage count."""
        num_stages = num_ranks * self.chunks_per_rank()
        if self.partition is not None:
            part = (
                self.partition
                if isinstance(self.partition, Partition)
                else Partition(tuple(self.partition))
            )
            if part.num_layers != num_layers or part.num_stages != num_stages:
                chunked = (
                    f" ({num_ranks} ranks x {self.chunks} chunks of {self.schedule})"
                    if num_stages != num_ranks
                    else ""
                )
                raise ValueError(
                    f"partition {part} covers {part.num_layers} layers on {part.num_stages} "
                    f"stages, but the model has {num_layers} layers and the run {num_stages} "
                    f"stages{chunked}"
                )
            return part
        if num_stages > num_layers and num_stages != num_ranks:
            raise ValueError(
                f"{self.schedule} with {self.chunks} chunks on {num_ranks} ranks needs "
                f"{num_stages} virtual stages of at least one layer, but the model has "
                f"{num_layers} layers; use fewer chunks or ranks"
            )
        if self.layer_costs is not None:
            return Partition.balanced(list(self.layer_costs), num_stages)
        return Partition.even(num_layers, num_stages)


def check_schedule(name: str) -> None:
    """ValueError unless the runtime can run schedule ``name``."""
    try:
        make_schedule(name, 1, 1)
    except ValueError as exc:
        names = ", ".join((*SCHEDULE_NAMES, *ASYNC_SCHEDULES))
        raise ValueError(f"{exc} (the runtime runs {names})") from None
