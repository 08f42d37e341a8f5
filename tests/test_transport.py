"""The transport on CPU: every message on the data group of its direction, in one buffer.

With CUDA the data groups are NCCL and headers travel apart, on the control group (gloo); here
every group is gloo, and ``transport.AHEAD = 0`` frames messages that way on gloo too, so
these tests check both framings: which group each message takes and in how many pieces.
"""

from __future__ import annotations

from typing import Any

import pytest
import runtime_cases as rc
import torch
import torch.distributed as dist
from conftest import PoolFor

from adaptive_pp.core.decisions import MoveLayers
from adaptive_pp.core.schedules import Action
from adaptive_pp.runtime import stagelog, transport
from adaptive_pp.runtime.stagelog import StageLog
from adaptive_pp.runtime.transport import AHEAD, HEAD, links_of

CASE = rc.Case(5, (3, 4, 5, 4, 2), (0, 2, 4), 4, "1f1b", "adam", 3)
MOVE = MoveLayers(src=1, dst=0, count=1)  # before step 1: layer 2's state travels 1 -> 0


def test_links_are_neighbour_pairs_both_ways() -> None:
    assert links_of([0]) == []
    assert links_of([0, 1, 2]) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    # interleaved, 3 ranks x 2 chunks: the wrap-around link 2 -> 0 and its gradients back
    assert links_of([0, 1, 2, 0, 1, 2]) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]


def test_stage_log_times_actions_on_the_host_clock_on_cpu() -> None:
    log = StageLog.on(torch.device("cpu"))
    assert log.cuda is None
    t = log.action_started()
    log.action_done(Action(0, "F", 0), t - 0.5, t, t - 1.0)
    log.resolve(0.0)  # nothing to resolve on a CPU
    assert log.start == [1.0] and log.wait == 0.5 and log.end[0] >= 1.0


class FakeEvent:
    """Stands in for a CUDA event: recorded at a GPU time given by the test (ms)."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def elapsed_time(self, later: FakeEvent) -> float:
        return later.ms - self.ms

    def synchronize(self) -> None:
        pass


def test_stage_log_times_actions_by_events_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU times of the events, from the anchor at the step's start, replace the host
    times; waits stay host times (no GPU here: fake events)."""
    gpu_ms = iter([0.0, 2.0, 5.0, 6.0, 9.5])  # anchor, then start/end of two actions
    monkeypatch.setattr(stagelog, "_event", lambda device: FakeEvent(next(gpu_ms)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    log = StageLog.on(torch.device("cuda", 0))
    t0 = 100.0
    anchor = log._anchor[0] if log._anchor else 0.0
    for m in range(2):
        t = log.action_started()
        log.action_done(Action(0, "F", m), t, t, t0)
    log.resolve(t0)
    base = anchor - t0
    assert log.start == pytest.approx([base + 0.002, base + 0.006])
    assert log.end == pytest.approx([base + 0.005, base + 0.0095])
    assert log.compute == pytest.approx(0.0065) and log.wait == 0.0


def counted_job(case: rc.Case, ahead: int = AHEAD) -> dict[str, Any]:
    """Rank job: train ``case`` (a move before step 1) with every point-to-point operation
    recorded: which, the group it used, the peer, the bytes and the tag; messages framed with
    ``transport.AHEAD = ahead`` (0: the header apart, as on NCCL)."""
    ops: list[dict[str, Any]] = []
    real = {name: getattr(dist, name) for name in ("isend", "irecv", "recv", "batch_isend_irecv")}

    def note(op: str, tensor: torch.Tensor, peer: int | None, group: Any, tag: int) -> None:
        bytes_ = tensor.numel() * tensor.element_size()
        group = dist.group.WORLD if group is None else group  # the default group: the control
        ops.append({"op": op, "peer": peer, "group": id(group), "bytes": bytes_, "tag": tag})

    def counted(name: str) -> Any:
        def call(tensor: torch.Tensor, peer: int | None = None, *a: Any, **kw: Any) -> Any:
            note(name, tensor, peer, kw.get("group", a[0] if a else None), kw.get("tag", 0))
            return real[name](tensor, peer, *a, **kw)

        call.__name__ = name
        return call

    def counted_batch(p2p: list[dist.P2POp]) -> list[dist.Work]:
        for op in p2p:
            note(op.op.__name__, op.tensor, op.peer, op.group, op.tag)
        return real["batch_isend_irecv"](p2p)  # type: ignore[no-any-return]

    def own_op(op: Any, *args: Any) -> dist.P2POp:
        """A P2POp of torch's own isend or irecv (it refuses the counting ones)."""
        return real_op(real.get(op.__name__, op), *args)

    def counted_pair(name: str) -> Any:
        """The transport's own post on a pair group (``transport.isend`` / ``irecv``)."""
        own = getattr(transport, name)

        def call(tensor: torch.Tensor, peer: int, group: Any, me: int) -> Any:
            note(name, tensor, peer, group, 0)
            return own(tensor, peer, group, me)

        return call

    real_op = dist.P2POp
    real_pair = {name: getattr(transport, name) for name in ("isend", "irecv")}
    for name in ("isend", "irecv", "recv"):
        setattr(dist, name, counted(name))
    for name in real_pair:
        setattr(transport, name, counted_pair(name))
    dist.batch_isend_irecv = counted_batch  # type: ignore[assignment]
    dist.P2POp = own_op  # type: ignore[assignment,misc]
    kept, transport.AHEAD = transport.AHEAD, ahead
    try:
        pipe = rc.case_pipeline(case)
        wire = pipe.local.transport
        losses = []
        for k, (x, y) in enumerate(rc.batches(case)):
            if k == 1:
                pipe.apply(MOVE)
            losses.append(pipe.step(x, y).loss)
        snap = rc.snapshot(pipe)
        pipe.close()
    finally:
        transport.AHEAD = kept
        dist.P2POp = real_op  # type: ignore[misc]
        for name, fn in real_pair.items():
            setattr(transport, name, fn)
        for name, fn in real.items():
            setattr(dist, name, fn)
    me = dist.get_rank()
    return {
        "losses": losses,
        **snap,
        # The control plane's own frames (any source, or its tag) are not the links'.
        "ops": [o for o in ops if o["peer"] is not None and o["tag"] == 0],
        "control": id(wire.control),
        "world": id(dist.group.WORLD),
        "data": {f"{s}->{d}": id(g) for (s, d), g in wire.data.items() if me in (s, d) and g},
        "backend": wire.backend,
        "device": str(wire.device),
        "ahead": wire.ahead,
    }


def groups_of(r: dict[str, Any], me: int) -> tuple[int, int]:
    """A rank's data groups: to its peer, from its peer (checked: the pair's two, apart from
    the control group)."""
    peer = 1 - me
    assert r["backend"] == "gloo" and r["device"] == "cpu"
    assert r["control"] == r["world"]  # init_distributed's gloo group
    assert set(r["data"]) == {f"{me}->{peer}", f"{peer}->{me}"}
    assert r["control"] not in r["data"].values()
    assert r["data"][f"{me}->{peer}"] != r["data"][f"{peer}->{me}"]
    assert all(o["peer"] == peer for o in r["ops"])
    return r["data"][f"{me}->{peer}"], r["data"][f"{peer}->{me}"]


def tensor_bytes(me: int) -> tuple[list[int], list[int]]:
    """The tensors rank ``me`` sends: across the cut (activations from rank 0, gradients from
    rank 1, float32; M per step, 5 values before the move, which takes layer 2 to stage 0
    before step 1, 4 after) and, from rank 1, the moving layer's weight, bias and Adam state."""
    m = CASE.microbatches
    boundary = [40] * m + [32] * 2 * m
    return boundary, ([] if me == 0 else [80, 16, 4, 80, 80, 4, 16, 16])


@pytest.mark.multiprocess
def test_each_message_travels_as_one_buffer_on_its_data_group(pools: PoolFor) -> None:
    """gloo: header and payload in one send on the data group of the direction (tensors, the
    move's JSON, the goodbye), each into a receive of AHEAD bytes posted ahead; nothing on the
    control group."""
    ranks = pools(2).run(counted_job, CASE, timeout=120)
    rc.assert_matches_reference(CASE, ranks)  # bit for bit, a move included
    m = CASE.microbatches
    for me, r in enumerate(ranks):
        assert r["ahead"] == AHEAD
        mine, theirs = groups_of(r, me)
        assert not [o for o in r["ops"] if o["group"] == r["control"]]
        sends = [o for o in r["ops"] if o["op"] == "isend"]
        takes = [o for o in r["ops"] if o["op"] in ("irecv", "recv")]
        assert {o["group"] for o in sends} == {mine} and {o["group"] for o in takes} == {theirs}
        # Each message once, its header in front; last the goodbye, a header alone.
        sizes = [o["bytes"] - HEAD for o in sends]
        boundary, state = tensor_bytes(me)
        assert sizes[:m] + sizes[-2 * m - 1 :] == [*boundary, 0]
        middle = sorted(sizes[m : -2 * m - 1])  # the move: its JSON (one message) and state
        for size in state:
            middle.remove(size)
        assert len(middle) == 1 and middle[0] > 0  # the manifest (to 0) or the ack (to 1)
        # One receive of AHEAD bytes per message of the peer's (all fit), nothing else.
        peer_sends = [o for o in ranks[1 - me]["ops"] if o["op"] == "isend"]
        assert [o["bytes"] for o in takes] == [AHEAD] * len(peer_sends)


@pytest.mark.multiprocess
def test_headers_travel_apart_on_the_control_group_with_nccl_framing(pools: PoolFor) -> None:
    """``AHEAD = 0`` (NCCL's framing, on gloo): tensors alone on the data groups, as batched
    P2P of their exact size; headers and the move's JSON on the control group."""
    ranks = pools(2).run(counted_job, CASE, 0, timeout=120)
    rc.assert_matches_reference(CASE, ranks)
    for me, r in enumerate(ranks):
        assert r["ahead"] == 0
        mine, theirs = groups_of(r, me)
        sends = [o for o in r["ops"] if o["op"] == "isend" and o["group"] != r["control"]]
        takes = [o for o in r["ops"] if o["op"] in ("irecv", "recv") and o["group"] != r["control"]]
        assert {o["group"] for o in sends} == {mine} and {o["group"] for o in takes} == {theirs}
        boundary, state = tensor_bytes(me)
        sizes = [o["bytes"] for o in sends]
        m = CASE.microbatches
        assert sizes[:m] + sizes[m + len(state) :] == boundary
        assert sorted(sizes[m : m + len(state)]) == sorted(state)
        peer_boundary, peer_state = tensor_bytes(1 - me)
        peer_sends = peer_boundary + peer_state
        assert sorted(o["bytes"] for o in takes) == sorted(peer_sends)
        # On the control group: one header per tensor, JSON message and goodbye, and the JSON.
        on_control = [o for o in r["ops"] if o["op"] == "recv" and o["group"] == r["control"]]
        headers = [h for h in on_control if h["bytes"] == HEAD]
        assert len(headers) == len(peer_sends) + 2 and len(on_control) == len(headers) + 1
