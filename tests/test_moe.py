"""MoE block: real top-k routing, dispatch and combine; emulated time follows the busiest expert."""

from __future__ import annotations

import pytest
import torch
from conftest import FakeClock
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_pp.emulation.moe import MoEBlock


def _block(experts: int = 8, top_k: int = 2, seed: int = 0, **kw: float) -> MoEBlock:
    torch.manual_seed(seed)
    return MoEBlock(16, experts=experts, top_k=top_k, hidden=24, **kw)  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(
    experts=st.integers(1, 8),
    data=st.data(),
    tokens=st.integers(1, 40),
    seed=st.integers(0, 1000),
)
def test_routing_is_the_top_k_of_the_router(
    experts: int, data: st.DataObject, tokens: int, seed: int
) -> None:
    top_k = data.draw(st.integers(1, experts))
    block = _block(experts, top_k, seed)
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(seed))
    idx, gates = block.route(x)
    assert idx.shape == (tokens, top_k) and gates.shape == (tokens, top_k)
    probs = torch.softmax(block.router(x), dim=-1)
    for t in range(tokens):
        chosen = set(idx[t].tolist())
        assert len(chosen) == top_k  # k distinct experts per token
        # every chosen expert scores at least as high as every expert left out
        left = [probs[t, e] for e in range(experts) if e not in chosen]
        assert all(probs[t, c] >= max(left, default=0.0) for c in chosen)
    assert torch.allclose(gates.sum(-1), torch.ones(tokens))
    load = block.load(idx)
    assert sum(load) == tokens * top_k and len(load) == experts


def test_output_is_the_gated_sum_of_the_chosen_experts() -> None:
    block = _block()
    x = torch.randn(3, 5, 16)  # any leading shape: 15 tokens
    out = block(x)
    flat = x.reshape(-1, 16)
    idx, gates = block.route(flat)
    expected = torch.stack(
        [
            flat[t] + sum(g * block.experts[int(e)](flat[t : t + 1])[0] for e, g in zip(i, w))
            for t, (i, w) in enumerate(zip(idx, gates))
        ]
    )
    assert out.shape == x.shape
    assert torch.allclose(out.reshape(-1, 16), expected, atol=1e-6)
    assert block.last_load == block.load(idx)


def test_gradients_reach_input_router_and_only_used_experts() -> None:
    block = _block(experts=8, top_k=1, skew=20.0, hot=3)  # every token goes to expert 3
    x = torch.randn(10, 16, requires_grad=True)
    block(x).pow(2).sum().backward()
    assert block.last_load == tuple(10 if e == 3 else 0 for e in range(8))
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert block.router.weight.grad is not None
    used = block.experts[3].fc1.weight.grad
    assert used is not None and used.abs().sum() > 0
    assert all(block.experts[e].fc1.weight.grad is None for e in range(8) if e != 3)


def test_router_gets_gradient_through_the_gates() -> None:
    block = _block(experts=4, top_k=2)
    x = torch.randn(32, 16)
    block(x).sum().backward()
    grad = block.router.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_skew_raises_the_max_load() -> None:
    block = _block(experts=8, top_k=2)
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(1))
    block(x)
    even = max(block.last_load)
    block.skew = 6.0
    block(x)
    skewed = block.last_load
    assert max(skewed) > 2.5 * even
    assert skewed[block.hot] == max(skewed) and sum(skewed) == 512 * 2
    assert skewed[block.hot] <= 512  # one slot per token at most
    assert block.balanced_load(512) == 128


def test_emulated_time_follows_the_busiest_expert(fake_clock: FakeClock) -> None:
    block = _block(forward_s=1e-3, per_token_s=1e-5)
    x = torch.randn(64, 16, requires_grad=True)
    for skew in (0.0, 8.0):
        fake_clock.slept.clear()
        block.skew = skew
        block(x).sum().backward()
        peak = max(block.last_load)
        assert fake_clock.slept == pytest.approx([1e-3 + 1e-5 * peak, 2.4 * (1e-3 + 1e-5 * peak)])
    assert max(block.last_load) == 64  # the skewed run sent every token to the hot expert


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="top_k"):
        MoEBlock(4, experts=2, top_k=3)
    with pytest.raises(ValueError, match="hot expert"):
        MoEBlock(4, experts=2, hot=2)
