"""The wire format, the stage links and the JSON exchanges between steps."""

from __future__ import annotations

import pytest
import torch
from comm_cases import SIZES, corrupt_job, exchange_job, link_job, payload, tensors
from conftest import PoolFor
from hypothesis import given
from hypothesis import strategies as st

from adaptive_pp.core.errors import PipelineError
from adaptive_pp.runtime.comm import _DTYPES, MAX_DIMS, Header, MessageKind
from adaptive_pp.runtime.launch import WorkerPool
from adaptive_pp.runtime.transport import AHEAD

headers = st.builds(
    Header,
    kind=st.sampled_from(list(MessageKind)),
    microbatch=st.integers(-1, 10**6),
    step=st.integers(-1, 10**9),
    version=st.integers(-1, 10**9),
    layer_lo=st.integers(-1, 10**4),
    layer_hi=st.integers(-1, 10**4),
    dtype=st.sampled_from(_DTYPES),
    shape=st.lists(st.integers(0, 10**6), max_size=MAX_DIMS).map(tuple),
    vstage=st.integers(-1, 10**4),
)


@given(header=headers)
def test_header_round_trips(header: Header) -> None:
    assert Header.decode(header.encode()) == header
    assert Header.from_values(header.values()) == header


def test_header_rejects_what_cannot_travel() -> None:
    with pytest.raises(ValueError, match="dimensions"):
        Header(MessageKind.ACT, 0, 0, 0, 0, 0, torch.float32, (1,) * (MAX_DIMS + 1)).values()
    with pytest.raises(ValueError, match="complex64"):
        Header(MessageKind.ACT, 0, 0, 0, 0, 0, torch.complex64, (1,)).values()
    bad = Header(MessageKind.ACT, 0, 0, 0, 0, 0, torch.float32, (2,)).values()
    bad[0] += 1
    with pytest.raises(PipelineError, match="corrupt"):
        Header.from_values(bad)


@pytest.mark.multiprocess
def test_json_exchanges_deliver_every_size(pools: PoolFor) -> None:
    """Control exchanges, below, at and past a frame's capacity, in several frames."""
    world = 3
    ranks = pools(world).run(exchange_job, timeout=120)
    for me, got in enumerate(ranks):
        for k, size in enumerate(SIZES):
            gathered, broadcast = got[2 * k], got[2 * k + 1]
            assert gathered == [{**payload(r, size), "t": [1, 2.5]} for r in range(world)], (
                f"rank {me}, size {size}"
            )
            assert broadcast == {**payload(size % world, size), "t": [1, 2.5]}


@pytest.mark.multiprocess
@pytest.mark.parametrize("ahead", [AHEAD, 0], ids=["one-buffer", "header-apart"])
def test_link_delivers_any_order_dtype_and_size(pools: PoolFor, ahead: int) -> None:
    """Messages arrive intact, in any order, in both framings (gloo's one buffer, a payload
    over the receive posted ahead in two parts; NCCL's header apart)."""
    sender, out = pools(2).run(link_job, ahead, timeout=120)
    assert "complex64" in sender["refused"]
    assert out["equal"] == [True] * len(tensors())
    assert out["headers"] == [(i, 7, 3) for i in range(len(tensors()))]
    assert len(out["queue"]) == len(tensors())
    assert all(arrived <= consumed for arrived, consumed in out["queue"])
    assert out["waited"] >= 0


@pytest.mark.multiprocess
def test_unreadable_frame_is_a_local_error_naming_both_stages() -> None:
    # Its own ranks: the links it breaks must not outlive it in the shared pools.
    with WorkerPool(2) as pool:
        got = pool.run(corrupt_job, timeout=120)[1]
    assert got.startswith("PipelineError: stage 1 could not read a message from stage 0")
    assert "corrupt message header" in got
