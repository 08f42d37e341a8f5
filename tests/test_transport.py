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
from adaptive_pp.runtime.transport import links_of

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
    """Rank job: train ``case`` (a move before step 1) with every batched P2P op and every
    blocking receive recorded: the group each used, the peer and the bytes."""
    ops: list[dict[str, Any]] = []
    recvs: list[dict[str, Any]] = []
    batch, recv = dist.batch_isend_irecv, dist.recv

    def counted_batch(p2p: list[dist.P2POp]) -> list[dist.Work]:
        for op in p2p:
            ops.append(
                {
                    "op": op.op.__name__,
                    "peer": op.peer,
                    "group": id(op.group),
                    "ranks": dist.get_process_group_ranks(op.group),
                    "bytes": op.tensor.numel() * op.tensor.element_size(),
                }
            )
        return batch(p2p)

    def counted_recv(tensor: torch.Tensor, src: int | None = None, *a: Any, **kw: Any) -> Any:
        group = kw.get("group", a[0] if a else None)
        recvs.append({"src": src, "group": id(group), "bytes": tensor.numel()})
        return recv(tensor, src, *a, **kw)

    dist.batch_isend_irecv, dist.recv = counted_batch, counted_recv  # type: ignore[assignment]
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
        dist.batch_isend_irecv, dist.recv = batch, recv  # type: ignore[assignment]
    me = dist.get_rank()
    return {
        "losses": losses,
        **snap,
        "ops": ops,
        "recvs": [r for r in recvs if r["src"] is not None],  # the control plane's: any source
        "control": id(transport.control),
        "world": id(dist.group.WORLD),
        "data": {f"{s}->{d}": id(g) for (s, d), g in transport.data.items() if me in (s, d) and g},
        "backend": transport.backend,
        "device": str(transport.device),
    }


@pytest.mark.multiprocess
def test_tensors_travel_on_the_data_groups_and_headers_on_the_control_group(
    pools: PoolFor,
) -> None:
    ranks = pools(2).run(counted_job, CASE, timeout=120)
    rc.assert_matches_reference(CASE, ranks)  # bit for bit, a move included
    for me, r in enumerate(ranks):
        peer = 1 - me
        assert r["backend"] == "gloo" and r["device"] == "cpu"
        assert r["control"] == r["world"]  # init_distributed's gloo group
        assert set(r["data"]) == {f"{me}->{peer}", f"{peer}->{me}"}
        assert r["control"] not in r["data"].values()
        assert r["data"][f"{me}->{peer}"] != r["data"][f"{peer}->{me}"]
        sends = [o for o in r["ops"] if o["op"] == "isend"]
        takes = [o for o in r["ops"] if o["op"] == "irecv"]
        # Every tensor went on the two ranks' group of its direction, none on the control group.
        assert all(o["peer"] == peer and sorted(o["ranks"]) == [0, 1] for o in r["ops"])
        assert {o["group"] for o in sends} == {r["data"][f"{me}->{peer}"]}
        assert {o["group"] for o in takes} == {r["data"][f"{peer}->{me}"]}
        # Activations (rank 0) and gradients (rank 1), float32: M per step across the cut,
        # 2 x 5 values before the move (layer 2 moves to stage 0 before step 1), 2 x 4 after.
        boundary = [40] * CASE.microbatches + [32] * 2 * CASE.microbatches
        if me == 0:
            assert [o["bytes"] for o in sends] == boundary
        else:  # and between them the moving layer: weight, bias and Adam's state of each
            middle = [o["bytes"] for o in sends][CASE.microbatches : -2 * CASE.microbatches]
            assert sorted(middle) == sorted([80, 16, 4, 80, 80, 4, 16, 16])
        assert [o["bytes"] for o in takes] == [
            o["bytes"] for o in ranks[peer]["ops"] if o["op"] == "isend"
        ]
        # Headers, and the move's JSON (the manifest to rank 0, the acknowledgement to rank
        # 1): from the peer, on the control group only. One header per tensor, one per JSON
        # message and the peer's goodbye.
        on_control = r["recvs"]
        assert on_control and all(h["src"] == peer for h in on_control)
        assert {h["group"] for h in on_control} == {r["control"]}
        headers = [h for h in on_control if h["bytes"] == HEADER_BYTES]
        assert len(headers) == len(takes) + 2 and len(on_control) == len(headers) + 1
