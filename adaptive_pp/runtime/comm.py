"""Point-to-point messages with a fixed header, and instrumented per-link mailboxes.

Every message is a 16 x int64 header (kind, micro-batch, step, weight version, layer range,
dtype, shape, and last the virtual stage it is for) and, unless empty, a payload: the tensor's
bytes. No pickle on the wire. How they travel is runtime/transport.py's: on gloo (CPU) header
and payload in one buffer, into a receive posted ahead; on NCCL the header on the control group
(gloo, CPU) and the tensor from the sender's device straight into the receiver's. Each link has
a receiver thread that takes a header, then its payload, and timestamps the arrival into a
mailbox; the stage posts its messages itself, in order, and takes messages out by (kind,
micro-batch, virtual stage), so queue depth over time and time blocked on receives are measured.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch

from ..core.errors import PeerGone, PipelineError, PipelineTimeout
from .transport import HEAD, Inbound, Posted, Transport, links_of, make_transport

MAGIC = 0x41505030  # "APP0"
HEADER_BYTES = HEAD  # the transport frames headers of this size
HEADER_LEN = HEADER_BYTES // 8
MAX_DIMS = HEADER_LEN - 10  # the last value is the virtual stage

_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}


class MessageKind(IntEnum):
    """What a message carries."""

    ACT = 1  # activation, stage s -> s+1
    GRAD = 2  # gradient of an activation, stage s+1 -> s
    STATE = 3  # a tensor of migrating layer state
    CONTROL = 4  # JSON bytes (plans, acks)
    STOP = 5  # the sender closes the link


@dataclass(frozen=True)
class Header:
    """The fixed-size description sent ahead of every payload."""

    kind: MessageKind
    microbatch: int
    step: int
    version: int
    layer_lo: int
    layer_hi: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    #: The virtual stage the message is for (interleaved schedules: chunks on one rank share
    #: the link to a peer); 0 for one chunk per rank, and for state and control messages.
    vstage: int = 0

    def encode(self) -> torch.Tensor:
        """As a 16 x int64 tensor."""
        return torch.tensor(self.values(), dtype=torch.int64)

    def values(self) -> list[int]:
        """The 16 int64 values of the encoded header."""
        if len(self.shape) > MAX_DIMS:
            raise ValueError(
                f"tensors of at most {MAX_DIMS} dimensions can be sent, got {self.shape}"
            )
        if self.dtype not in _DTYPE_CODE:
            raise ValueError(f"dtype {self.dtype} cannot be sent between stages")
        vals = [
            MAGIC,
            int(self.kind),
            self.microbatch,
            self.step,
            self.version,
            self.layer_lo,
            self.layer_hi,
            _DTYPE_CODE[self.dtype],
            len(self.shape),
            *self.shape,
        ]
        return vals + [0] * (HEADER_LEN - 1 - len(vals)) + [self.vstage]

    @classmethod
    def decode(cls, t: torch.Tensor) -> Header:
        """Inverse of encode; raises PipelineError on a corrupt header."""
        return cls.from_values(t.tolist())

    @classmethod
    def from_values(cls, v: list[int]) -> Header:
        """Inverse of values; raises PipelineError on a corrupt header."""
        if v[0] != MAGIC or not 0 <= v[7] < len(_DTYPES) or not 0 <= v[8] <= MAX_DIMS:
            raise PipelineError(f"corrupt message header {v}: peers out of step?")
        return cls(
            MessageKind(v[1]),
            v[2],
            v[3],
            v[4],
            v[5],
            v[6],
            _DTYPES[v[7]],
            tuple(v[9 : 9 + v[8]]),
            v[HEADER_LEN - 1],
        )


_ITEMSIZE = {dt: torch.empty((), dtype=dt).element_size() for dt in _DTYPES}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * _ITEMSIZE[dtype]


@dataclass
class Message:
    """A received message with the time it arrived (perf_counter seconds)."""

    header: Header
    payload: torch.Tensor
    arrived: float


@dataclass
class LinkLog:
    """Kinds, arrival and consumption times of ACT/GRAD messages taken this step."""

    kinds: list[MessageKind] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    consumed: list[float] = field(default_factory=list)
    waited: float = 0.0

    def record(self, kind: MessageKind, arrived: float, consumed: float, waited: float) -> None:
        """Note one message taken: activations and gradients only (the queues' traces)."""
        if kind in (MessageKind.ACT, MessageKind.GRAD):
            self.kinds.append(kind)
            self.arrived.append(arrived)
            self.consumed.append(consumed)
            self.waited += waited


class Link:
    """A bidirectional connection to one neighbouring stage, with a receiver thread.

    The receiver keeps a receive posted, so a message moves while the stage computes, and files
    arrivals with their time. Sends are posted from the caller's thread: a sender thread's
    hand-off cost every hop more than the post costs the stage (docs/EXPERIMENTS.md, appendix
    "runtime changes measured side by side").
    """

    def __init__(
        self,
        me: int,
        peer: int,
        transport: Transport | None = None,
        fault: Callable[[], BaseException | None] | None = None,
    ) -> None:
        """``transport``: the groups to use (None: made for this pair alone, on the CPU, which
        is collective: every rank of the default group makes its Link at the same time)."""
        self.me, self.peer = me, peer
        #: Where headers and payloads travel.
        self.transport = transport or make_transport(
            me, links_of([me, peer]), torch.device("cpu"), 120.0
        )
        self.round = 0
        #: Another rank's failure to raise instead of waiting (see adaptive_pp.control).
        self.fault = fault
        self._box: dict[tuple[MessageKind, int, int, int], Message] = {}  # kind, step, mb, vstage
        self.cond = threading.Condition()
        self._error: BaseException | None = None
        self._closed_by_peer = False
        self._pending: list[Posted] = []
        self._send_error: Exception | None = None
        self.log = LinkLog()
        self._thread = threading.Thread(
            target=self._receive_loop, name=f"adaptive_pp-rx-{peer}->{me}", daemon=True
        )
        self._thread.start()

    def _receive_loop(self) -> None:
        try:
            inbound = Inbound(self.transport, self.peer)
        except BaseException as exc:
            self._unreadable(exc)
            return
        while True:
            try:
                values = inbound.header().tolist()
            except BaseException as exc:  # the peer died or the group went away
                self._hand_over(exc)
                return
            try:
                header = Header.from_values(values)
                control = header.kind == MessageKind.CONTROL  # JSON bytes
                if header.kind == MessageKind.STOP:
                    with self.cond:
                        self._closed_by_peer = True
                        self.cond.notify_all()
                    return
                data = inbound.buffer(_nbytes(header.shape, header.dtype), control)
            except BaseException as exc:
                self._unreadable(exc)
                return
            try:
                inbound.fill(data, control)
            except BaseException as exc:
                self._hand_over(exc)
                return
            try:
                payload = data.view(header.dtype).reshape(header.shape)
            except BaseException as exc:
                self._unreadable(exc)
                return
            msg = Message(header, payload, time.perf_counter())
            with self.cond:
                if header.step >= self.round:  # older rounds were aborted: dropped
                    self._box[(header.kind, header.step, header.microbatch, header.vstage)] = msg
                    self.cond.notify_all()

    def _unreadable(self, exc: BaseException) -> None:
        """A frame we cannot read: our fault, not the peer's."""
        self._hand_over(
            PipelineError(
                f"stage {self.me} could not read a message from stage {self.peer}: "
                f"{type(exc).__name__}: {exc}",
                stage=self.me,
                peer=self.peer,
            )
        )

    def _hand_over(self, exc: BaseException) -> None:
        """Give the receiver thread's error to the stage thread (raised by ``take``)."""
        with self.cond:
            self._error = exc
            self.cond.notify_all()

    def begin(self, rnd: int) -> None:
        """Start round ``rnd`` (a step, a decision): drop what is left of earlier rounds."""
        with self.cond:
            self.round = rnd
            self._box = {k: v for k, v in self._box.items() if k[1] >= rnd}
        self.log = LinkLog()

    def send(self, header: Header, payload: torch.Tensor) -> None:
        """Post one frame (header + payload bytes); a failed post is reported by ``flush``."""
        if header.kind != MessageKind.STOP and tuple(payload.shape) != header.shape:
            raise ValueError(f"header shape {header.shape} != payload shape {tuple(payload.shape)}")
        values = header.values()  # what cannot travel (dtype, dimensions) raises here
        if self._send_error is not None:  # the link already failed: flush says so
            return
        try:
            control = header.kind == MessageKind.CONTROL
            self._pending += self.transport.post(values, payload.detach(), self.peer, control)
        except Exception as exc:
            self._send_error = exc

    def flush(self) -> None:
        """Wait until every posted send has completed."""
        pending, self._pending = self._pending, []
        error = self._send_error
        if error is not None and not isinstance(error, RuntimeError):  # ours, not the peer's
            raise PipelineError(
                f"stage {self.me} could not send to stage {self.peer}: "
                f"{type(error).__name__}: {error}",
                stage=self.me,
                peer=self.peer,
            ) from error
        try:
            if error is not None:
                raise error
            for work, _ in pending:
                work.wait()
        except RuntimeError as exc:
            raise PeerGone(
                f"stage {self.peer} (rank {self.peer}) is gone while stage {self.me} "
                f"was sending to it: {exc}",
                stage=self.me,
                peer=self.peer,
            ) from exc

    def take(
        self, kind: MessageKind, microbatch: int, timeout: float, what: str, vstage: int = 0
    ) -> Message:
        """Block until message (kind, microbatch) for virtual stage ``vstage`` has arrived; log
        wait and queue times."""
        key = (kind, self.round, microbatch, vstage)
        t0 = time.perf_counter()
        deadline = t0 + timeout
        with self.cond:
            while key not in self._box:
                fault = self.fault() if self.fault is not None else None
                if fault is not None:
                    raise fault
                if isinstance(self._error, PipelineError):
                    raise self._error
                if self._error is not None or self._closed_by_peer:
                    how = "is gone" if self._error is not None else "closed its link"
                    cause = f": {self._error}" if self._error is not None else ""
                    raise PeerGone(
                        f"stage {self.peer} (rank {self.peer}) {how} while stage {self.me} "
                        f"waited for the {what} of micro-batch {microbatch}{cause}",
                        stage=self.me,
                        peer=self.peer,
                        microbatch=microbatch,
                    ) from self._error
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise PipelineTimeout(
                        f"stage {self.me} waited {timeout:.0f} s for the {what} of micro-batch "
                        f"{microbatch} from stage {self.peer} (rank {self.peer}); is it stuck? "
                        "(raise PipelineConfig.recv_timeout if its work is that slow)",
                        stage=self.me,
                        peer=self.peer,
                        microbatch=microbatch,
                    )
                self.cond.wait(min(left, 1.0))
            msg = self._box.pop(key)
        now = time.perf_counter()
        self.log.record(kind, msg.arrived, now, now - t0)
        return msg

    def close(self, timeout: float = 5.0) -> None:
        """Tell the peer we are done, wait for our sends and for its goodbye."""
        if self._error is None:
            self.send(Header(MessageKind.STOP, -1, -1, -1, 0, 0, torch.float32, ()), torch.empty(0))
            self.flush()
        self._thread.join(timeout)


def json_tensor(obj: Any) -> torch.Tensor:
    """``obj`` as UTF-8 JSON bytes in a uint8 tensor (what travels instead of pickle)."""
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def tensor_json(data: torch.Tensor) -> Any:
    """Inverse of json_tensor."""
    return json.loads(data.numpy().tobytes().decode())
