"""Emulated kernels: windows that host work runs inside, the math left unchanged (fake clock)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import FakeClock, drive_emulation
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

from adaptive_pp.core.simulator import W_SHARE
from adaptive_pp.emulation import kernels as emulation
from adaptive_pp.emulation.kernels import Emulated, EmulatedFFN, EmulatedLayer, Window
from adaptive_pp.runtime.splitgrad import phase


class _Busy(torch.autograd.Function):
    """Identity whose forward and backward each spend host time on the fake clock."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, clock: FakeClock, fwd: float, bwd: float) -> Any:
        ctx.clock, ctx.bwd = clock, bwd
        clock.spend(fwd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        ctx.clock.spend(ctx.bwd)
        return grad, None, None, None


class _Probe(Emulated):
    """x * w, with ``host`` (forward, backward) seconds of host work inside the window."""

    def __init__(self, clock: FakeClock, host: tuple[float, float], fwd: float) -> None:
        super().__init__(fwd, 2 * fwd)
        self.clock, self.host = clock, host
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = Window()
        y = x * window.anchor(self.weight)
        y = _Busy.apply(y, self.clock, *self.host)  # type: ignore[no-untyped-call]
        return self.timed(window, y, x.shape[0])


def _timed_step(clock: FakeClock, mod: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(forward, backward) fake seconds of one call of ``mod``."""
    t0 = clock.now
    y = mod(x)
    t1 = clock.now
    y.sum().backward()
    return t1 - t0, clock.now - t1


@settings(max_examples=40)
@given(
    host_f=st.floats(0.0, 3e-3),
    host_b=st.floats(0.0, 6e-3),
    fwd=st.floats(1e-4, 2e-3),
)
def test_a_call_takes_the_longer_of_host_work_and_kernel_time(
    host_f: float, host_b: float, fwd: float
) -> None:
    with pytest.MonkeyPatch.context() as mp:
        clock = drive_emulation(mp, FakeClock())
        probe = _Probe(clock, (host_f, host_b), fwd)
        f, b = _timed_step(clock, probe, torch.ones(2, 3, requires_grad=True))
    assert f == pytest.approx(max(host_f, fwd), abs=1e-12)
    assert b == pytest.approx(max(host_b, 2 * fwd), abs=1e-12)
    assert all(s > 0 for s in clock.slept)  # no zero-length sleeps


@settings(max_examples=40)
@given(host_b=st.floats(0.0, 6e-3), fwd=st.floats(1e-4, 2e-3), layers=st.integers(1, 3))
def test_an_i_pass_runs_its_host_work_inside_its_windows(
    host_b: float, fwd: float, layers: int
) -> None:
    """Split backward: each layer's I-pass host work (the input-gradient math after the
    gradient reached its output) runs inside that layer's share of the backward window, one
    layer after the other, as in a full backward; the pass ends once the last window has."""
    with pytest.MonkeyPatch.context() as mp:
        clock = drive_emulation(mp, FakeClock())
        model = nn.Sequential(*(_Probe(clock, (0.0, host_b), fwd) for _ in range(layers)))
        x = torch.ones(2, 3, requires_grad=True)
        y = model(x).sum()
        t0 = clock.now
        with phase("I"):
            torch.autograd.grad(y, x, retain_graph=True)
        took = clock.now - t0
    assert took == pytest.approx(layers * max(host_b, (1 - W_SHARE) * 2 * fwd), abs=1e-12)
    assert emulation._clock.owed == 0.0  # nothing left owed after the pass


def test_time_before_the_window_is_not_hidden(fake_clock: FakeClock) -> None:
    layer = EmulatedLayer(4, 1e-3, 2e-3)
    x = torch.randn(2, 4)
    t0 = fake_clock.now
    fake_clock.spend(5e-3)  # e.g. waiting for the input to arrive
    layer(x)
    assert fake_clock.now - t0 == pytest.approx(6e-3)


def test_without_a_trainable_parameter_backward_sleeps_its_whole_duration(
    fake_clock: FakeClock,
) -> None:
    probe = _Probe(fake_clock, (0.0, 4e-4), 1e-3)
    probe.weight.requires_grad_(False)
    f, b = _timed_step(fake_clock, probe, torch.ones(2, 3, requires_grad=True))
    assert f == pytest.approx(1e-3)
    assert fake_clock.slept[-1] == pytest.approx(2e-3)
    assert b == pytest.approx(2e-3 + 4e-4)  # host work after the output is not overlapped


def test_layers_in_sequence_each_take_their_durations(fake_clock: FakeClock) -> None:
    model = nn.Sequential(*(EmulatedLayer(4, 1e-3, 2e-3, per_sample_s=1e-4) for _ in range(3)))
    f, b = _timed_step(fake_clock, model, torch.randn(5, 4))
    assert fake_clock.slept == pytest.approx([1.5e-3] * 3 + [3e-3] * 3)
    assert (f, b) == pytest.approx((4.5e-3, 9e-3))


def test_checkpointed_recomputation_pays_the_forward_again(fake_clock: FakeClock) -> None:
    block = EmulatedFFN(4, 8, 1e-3, 2e-3)
    x = torch.randn(3, 4, requires_grad=True)
    t0 = fake_clock.now
    y = checkpoint(block, x, use_reentrant=False)
    t1 = fake_clock.now
    y.sum().backward()
    assert t1 - t0 == pytest.approx(1e-3)
    assert fake_clock.now - t1 == pytest.approx(1e-3 + 2e-3)
    assert fake_clock.slept == pytest.approx([1e-3, 1e-3, 2e-3])


def test_sleeps_aim_off_their_mean_lateness(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = drive_emulation(monkeypatch, FakeClock(oversleep=5e-5))
    errors = []
    for _ in range(80):
        opened = clock.now
        emulation.sleep_window(opened, 1e-3)
        errors.append(clock.now - (opened + 1e-3))
    assert errors[0] == pytest.approx(5e-5)
    assert abs(errors[-1]) < 1e-6  # wakes on the deadline once the lateness is learnt


def test_a_burst_of_late_wakeups_is_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = drive_emulation(monkeypatch, FakeClock(oversleep=5e-3))  # busy core: 5 ms late
    for _ in range(50):
        emulation.sleep_window(clock.now, 1e-3)
    assert min(clock.slept) == pytest.approx(0.5e-3)  # never aims off more than half
    clock.oversleep = 0.0
    errors = []
    for _ in range(200):
        opened = clock.now
        emulation.sleep_window(opened, 1e-3)
        errors.append(clock.now - (opened + 1e-3))
    assert abs(errors[-1]) < 1e-6  # back on the deadline once the core is free


@pytest.mark.parametrize("make", [lambda: EmulatedLayer(6, 1e-4), lambda: EmulatedFFN(6, 10, 1e-4)])
def test_the_window_leaves_the_math_unchanged(make: Any, fake_clock: FakeClock) -> None:
    torch.manual_seed(0)
    timed = make()
    plain = make()
    plain.load_state_dict(timed.state_dict())
    plain.forward_s = plain.backward_s = 0.0  # no window at all
    x = torch.randn(5, 6, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = timed(x), plain(x2)
    y.square().sum().backward()
    y2.square().sum().backward()
    assert fake_clock.slept  # the timed one did sleep
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    for p, q in zip(timed.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
