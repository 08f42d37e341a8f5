"""ZB-H1 on the runtime: split backward (I, then W) trains bit-for-bit like one process."""

from __future__ import annotations

from typing import Any

import ffn_cases
import pytest
import runtime_cases as rc
import torch
import zb_cases as zc
from conftest import FakeClock, PoolFor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from adaptive_pp import PipelineConfig
from adaptive_pp.core.decisions import MoveLayers, SetMicrobatches
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import make_schedule, validate
from adaptive_pp.core.simulator import BACKWARD_RATIO, W_SHARE
from adaptive_pp.emulation.kernels import EmulatedFFN, EmulatedLayer
from adaptive_pp.runtime.launch import LaunchError, launch
from adaptive_pp.runtime.splitgrad import backward_phase, input_pass, weight_pass_segment

WIDTHS = (5, 4, 6, 3, 5, 4, 3, 2, 4)


def _case(stages: int, m: int, optimizer: str, seed: int = 7, steps: int = 3) -> rc.Case:
    layers = 2 * stages
    return rc.Case(
        seed, WIDTHS[: layers + 1], tuple(range(0, layers + 1, 2)), m, "zb-h1", optimizer, steps
    )


# --- one process ------------------------------------------------------------------------------


def test_zb_h1_runs_each_ranks_w_in_microbatch_order() -> None:
    """What exactness rests on: a rank's W's (its .grad accumulations) go in micro-batch order,
    as the reference's backwards do, and every W follows its own I."""
    for stages in range(1, 9):
        for m in range(1, 13):
            for acts in make_schedule("zb-h1", stages, m).stages:
                assert [a.microbatch for a in acts if a.kind == "W"] == list(range(m))
                for a in acts:
                    if a.kind == "W":
                        assert acts.index(a._replace(kind="I")) < acts.index(a)


@pytest.mark.parametrize("layer", ["linear", "ffn"])
def test_emulated_layer_sleeps_i_share_then_w_share(fake_clock: FakeClock, layer: str) -> None:
    """Split, an emulated backward is slept once: 1 - W_SHARE in I, W_SHARE in W."""
    torch.manual_seed(0)
    mod = EmulatedLayer(4, 1.0) if layer == "linear" else EmulatedFFN(4, 8, 1.0)
    x = torch.randn(2, 4, requires_grad=True)
    y = mod(x)
    fake_clock.slept.clear()
    params = [list(mod.parameters())]
    pending = input_pass(y, torch.ones_like(y), [x, y], params, is_last=False, whole=False)[1]
    assert fake_clock.slept == [pytest.approx((1 - W_SHARE) * BACKWARD_RATIO)]
    assert all(p.grad is None for p in mod.parameters())  # I touches no weight
    weight_pass_segment(pending.segments[0])
    assert fake_clock.slept == pytest.approx(
        [(1 - W_SHARE) * BACKWARD_RATIO, W_SHARE * BACKWARD_RATIO]
    )
    split = [p.grad.clone() for p in mod.parameters() if p.grad is not None]
    assert backward_phase() is None
    # A full backward sleeps the whole backward once and gives the same gradients.
    mod.zero_grad(set_to_none=True)
    y = mod(x)
    fake_clock.slept.clear()
    y.backward(torch.ones_like(y))
    assert fake_clock.slept == [pytest.approx(BACKWARD_RATIO)]
    assert all(torch.equal(a, p.grad) for a, p in zip(split, mod.parameters(), strict=True))


def test_a_w_pass_without_its_i_pass_sleeps_the_whole_backward(fake_clock: FakeClock) -> None:
    """torch's first stage skips I (its input needs no gradient): its W does all the work."""
    from adaptive_pp.runtime.splitgrad import phase

    torch.manual_seed(0)
    mod = EmulatedLayer(4, 1.0)
    y = mod(torch.randn(2, 4))
    fake_clock.slept.clear()
    with phase("W"):
        y.backward(torch.ones_like(y))
    assert fake_clock.slept == [pytest.approx(BACKWARD_RATIO)]


class _Counted(torch.autograd.Function):
    """Identity whose backward counts its calls (activation-gradient work on the chain)."""

    calls = 0

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        _Counted.calls += 1
        return grad


class _Chain(nn.Module):
    """LayerNorm -> Linear -> tanh -> a counted identity: two weight-adjacent nodes."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _Counted.apply(torch.tanh(self.linear(self.norm(x))))  # type: ignore[no-untyped-call]
        return out


class _Reuse(nn.Module):
    """One weight used twice in a row: two nodes reach it (W from the output instead)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight) @ self.weight


def _split_then_full(
    mods: list[nn.Module], x: torch.Tensor, is_last: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of I then W (each micro-batch, two of them), and of full backwards."""
    grads = []
    for split in (True, False):
        for mod in mods:
            mod.zero_grad(set_to_none=True)
        for m in range(2):
            h = x[m].clone().requires_grad_(m == 1)  # micro-batch 0: an input without grad
            bounds = [h]
            for mod in mods:
                bounds.append(mod(bounds[-1]))
            top = bounds[-1].square().mean() if is_last else bounds[-1]
            g = None if is_last else torch.ones_like(top)
            if split:
                params = [list(mod.parameters()) for mod in mods]
                pending = input_pass(top, g, bounds, params, is_last, whole=False)[1]
                assert all(p.grad is None for p in params[-1]) or m == 1  # I gives none
                for calls in pending.segments:
                    weight_pass_segment(calls)
            else:
                torch.autograd.backward(top, g)
        grads.append([p.grad.clone() for mod in mods for p in mod.parameters()])  # type: ignore[union-attr]
    return grads[0], grads[1]


@pytest.mark.parametrize("is_last", [False, True])
def test_w_runs_only_the_weight_side_and_equals_a_full_backward(is_last: bool) -> None:
    """W starts at the nodes next to the weights: the activation-gradient chain above them (the
    counted identity) runs once per micro-batch, in I, not again in W; and every gradient equals
    a full backward's bit for bit, including a segment whose input needs no gradient and one
    reusing a weight (both W from the output)."""
    torch.manual_seed(3)
    mods: list[nn.Module] = [_Chain(5), _Reuse(5), _Chain(5)]
    x = torch.randn(2, 3, 5)
    _Counted.calls = 0
    split, full = _split_then_full(mods, x, is_last)
    # Two counted segments, two micro-batches: 4 calls split (micro-batch 0's first segment,
    # its input needing no gradient, runs its chain in W instead of I) and 4 in full backwards.
    assert _Counted.calls == 4 + 4
    assert all(torch.equal(a, b) for a, b in zip(split, full, strict=True))


def test_config_accepts_zb_h1_and_refuses_unknown_schedules() -> None:
    assert PipelineConfig(schedule="zb-h1").schedule == "zb-h1"
    with pytest.raises(ValueError, match="unknown schedule 'zb-h9'"):
        PipelineConfig(schedule="zb-h9")


# --- several processes ------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("per_stage", [1, 2])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_zb_h1_training_equals_single_process(
    pools: PoolFor, stages: int, per_stage: int, optimizer: str
) -> None:
    case = _case(stages, per_stage * stages, optimizer)
    ranks = pools(stages).run(rc.train_pipelined, case, timeout=120)
    rc.assert_matches_reference(case, ranks)
    report = StepReport.from_dict(ranks[0]["report"])
    expected = make_schedule("zb-h1", stages, case.microbatches)
    assert report.schedule == "zb-h1"
    assert [list(report.timeline.actions[s]) for s in range(stages)] == [
        list(a) for a in expected.stages
    ]
    # The stash holds a micro-batch from its F until its W ends: the validator's peak.
    assert report.peak_stash == validate(expected).peak
    for s in report.stages:
        assert all(t > 0 for t in s.layer_backward) and len(s.layer_backward) == 2


@pytest.mark.multiprocess
def test_zb_h1_with_moves_and_m_changes_between_steps(pools: PoolFor) -> None:
    case = _case(3, 3, "adam", seed=11, steps=4)
    changes = {1: [MoveLayers(0, 1, 1)], 2: [MoveLayers(2, 1, 1), SetMicrobatches(6)]}
    ranks = pools(3).run(rc.train_pipelined, case, changes, timeout=120)
    rc.assert_matches_reference(case, ranks, {2: 6})
    assert ranks[0]["bounds"] == (0, 1, 5, 6) and ranks[0]["m"] == 6
    assert StepReport.from_dict(ranks[0]["report"]).schedule == "zb-h1"
    assert sum("moved layers" in e for e in ranks[0]["events"]) == 2


@pytest.mark.multiprocess
def test_zb_h1_with_activation_checkpointing_is_bit_exact(pools: PoolFor) -> None:
    """Checkpointed segments recompute in I and again in W: same bits as 1F1B without."""
    plain = pools(2).run(ffn_cases.train_ffn, "1f1b", False, timeout=120)
    for ckpt in (False, True):
        zb = pools(2).run(ffn_cases.train_ffn, "zb-h1", ckpt, timeout=120)
        for a, b in zip(plain, zb, strict=True):
            assert a["losses"] == b["losses"]
            for name, sd in a["state"].items():
                for key, tensor in sd.items():
                    assert torch.equal(tensor, b["state"][name][key]), (ckpt, name, key)
            for idx, st_ in a["optimizer"]["state"].items():
                for key, value in st_.items():
                    got = torch.as_tensor(b["optimizer"]["state"][idx][key])
                    assert torch.equal(torch.as_tensor(value), got), (ckpt, idx, key)


@st.composite
def zb_cases(draw: st.DrawFn) -> rc.Case:
    """Random small MLPs on 2-4 stages, random partitions and M, SGD or Adam, under ZB-H1."""
    return rc.draw_case(draw, ["zb-h1"], min_stages=2)


@pytest.mark.multiprocess
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=zb_cases())
def test_zb_h1_random_partitions_equal_single_process(pools: PoolFor, case: rc.Case) -> None:
    ranks = pools(len(case.bounds) - 1).run(rc.train_pipelined, case, timeout=120)
    rc.assert_matches_reference(case, ranks)


@pytest.mark.multiprocess
def test_failure_in_w_names_stage_layer_and_microbatch() -> None:
    with pytest.raises(LaunchError) as info:
        launch(zc.job_weight_grad_fails, 2, timeout=90)
    err = info.value
    assert err.root.rank == 1 and err.root.kind == "StageFailure"
    assert (
        "stage 1, layers.2, micro-batch 0, weight-gradient backward (W): RuntimeError: "
        "injected weight-gradient failure" in err.root.message
    )
