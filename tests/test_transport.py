"""The transport split on CPU: tensors on the data groups, headers on the control group.

With CUDA the data groups are NCCL and the control group gloo; here both are gloo, so these
tests check the same code path: which group each message takes is the same on both.
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
from adaptive_pp.runtime import stagelog
from adaptive_pp.runtime.comm import HEADER_BYTES
from adaptive_pp.runtime.stagelog import StageLog
from adaptive_pp.runtime.transport import AHEAD, links_of

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


def counted_job(case: rc.Case) -> dict[str, Any]:
    """Rank job: train ``case`` (a move before step 1) with every point-to-point operation
    recorded: which, the group it used, the peer and the bytes."""
    ops: list[dict[str, Any]] = []
    real = {name: getattr(dist, name) for name in ("isend", "irecv", "recv", "batch_isend_irecv")}

    def note(op: str, tensor: torch.Tensor, peer: int | None, group: Any) -> None:
        bytes_ = tensor.numel() * tensor.element_size()
        group = dist.group.WORLD if group is None else group  # the default group: the control
        ops.append({"op": op, "peer": peer, "group": id(group), "bytes": bytes_})

    def counted(name: str) -> Any:
        def call(tensor: torch.Tensor, peer: int | None = None, *a: Any, **kw: Any) -> Any:
            note(name, tensor, peer, kw.get("group", a[0] if a else None))
            return real[name](tensor, peer, *a, **kw)

        return call

    def counted_batch(p2p: list[dist.P2POp]) -> list[dist.Work]:
        for op in p2p:
            note(op.op.__name__, op.tensor, op.peer, op.group)
        return real["batch_isend_irecv"](p2p)  # type: ignore[no-any-return]

    for name in ("isend", "irecv", "recv"):
        setattr(dist, name, counted(name))
    dist.batch_isend_irecv = counted_batch  # type: ignore[assignment]
    try:
        pipe = rc.case_pipeline(case)
        transport = pipe.local.transport
        losses = []
        for k, (x, y) in enumerate(rc.batches(case)):
            if k == 1:
                pipe.apply(MOVE)
            losses.append(pipe.step(x, y).loss)
        snap = rc.snapshot(pipe)
        pipe.close()
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    me = dist.get_rank()
    return {
        "losses": losses,
        **snap,
        "ops": [o for o in ops if o["peer"] is not None],  # the control plane's: any source
        "control": id(transport.control),
        "world": id(dist.group.WORLD),
        "data": {f"{s}->{d}": id(g) for (s, d), g in transport.data.items() if me in (s, d) and g},
        "backend": transport.backend,
        "device": str(transport.device),
        "ahead": transport.ahead,
    }


@pytest.mark.multiprocess
def test_tensors_travel_on_the_data_groups_and_headers_on_the_control_group(
    pools: PoolFor,
) -> None:
    ranks = pools(2).run(counted_job, CASE, timeout=120)
    rc.assert_matches_reference(CASE, ranks)  # bit for bit, a move included
    for me, r in enumerate(ranks):
        peer = 1 - me
        assert r["backend"] == "gloo" and r["device"] == "cpu" and r["ahead"] == AHEAD
        assert r["control"] == r["world"]  # init_distributed's gloo group
        assert set(r["data"]) == {f"{me}->{peer}", f"{peer}->{me}"}
        assert r["control"] not in r["data"].values()
        assert r["data"][f"{me}->{peer}"] != r["data"][f"{peer}->{me}"]
        mine, theirs = r["data"][f"{me}->{peer}"], r["data"][f"{peer}->{me}"]
        assert all(o["peer"] == peer for o in r["ops"])
        sends = [o for o in r["ops"] if o["op"] == "isend" and o["group"] != r["control"]]
        takes = [o for o in r["ops"] if o["op"] in ("irecv", "recv") and o["group"] != r["control"]]
        # Every tensor went on the two ranks' group of its direction, none on the control group.
        assert {o["group"] for o in sends} == {mine}
        assert {o["group"] for o in takes} == {theirs}
        # Activations (rank 0) and gradients (rank 1), float32: M per step across the cut,
        # 2 x 5 values before the move (layer 2 moves to stage 0 before step 1), 2 x 4 after;
        # last the goodbye's byte, which fills the receive the peer keeps posted.
        boundary = [40] * CASE.microbatches + [32] * 2 * CASE.microbatches + [1]
        if me == 0:
            assert [o["bytes"] for o in sends] == boundary
        else:  # and between them the moving layer: weight, bias and Adam's state of each
            middle = [o["bytes"] for o in sends][CASE.microbatches : -2 * CASE.microbatches - 1]
            assert sorted(middle) == sorted([80, 16, 4, 80, 80, 4, 16, 16])
        # Each payload lands in a receive posted ahead of its header (AHEAD bytes: all fit).
        theirs_there = ranks[peer]["data"][f"{peer}->{me}"]  # ids are per process
        peer_sends = [
            o for o in ranks[peer]["ops"] if o["op"] == "isend" and o["group"] == theirs_there
        ]
        assert [o["bytes"] for o in takes] == [AHEAD] * len(peer_sends)
        # Headers, and the move's JSON (the manifest to rank 0, the acknowledgement to rank
        # 1): on the control group only. One header per tensor, one per JSON message and the
        # goodbye.
        on_control = [o for o in r["ops"] if o["op"] == "recv" and o["group"] == r["control"]]
        headers = [h for h in on_control if h["bytes"] == HEADER_BYTES]
        assert len(headers) == len(peer_sends) + 1 and len(on_control) == len(headers) + 1
