"""Jobs that stage processes run in the multi-process tests (importable by spawned ranks)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from adaptive_pp.core.decisions import Decision, Keep, MoveLayers
from adaptive_pp.runtime.migration import MigrationAborted


@dataclass(frozen=True)
class Case:
    """One training run: model, split and optimizer, all derived from ``seed``."""

    seed: int
    widths: tuple[int, ...]
    bounds: tuple[int, ...]
    microbatches: int
    schedule: str
    optimizer: str
    steps: int
    per_microbatch: int = 2
    chunks: int = 2  # model chunks per rank of an interleaved schedule
    lead: int = 1  # 2BW's forwards each rank runs ahead of the next

    @property
    def batch(self) -> int:
        """Mini-batch size."""
        return self.microbatches * self.per_microbatch


def draw_layout(
    draw: st.DrawFn, ranges: int, layers: int, max_width: int = 9
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Random widths of an MLP of ``layers`` layers (``layers + 1`` values in 1..``max_width``)
    and a random partition of its layers into ``ranges`` non-empty ranges (hypothesis)."""
    cuts = sorted(
        draw(st.sets(st.integers(1, max(1, layers - 1)), min_size=ranges - 1, max_size=ranges - 1))
    )
    widths = draw(st.lists(st.integers(1, max_width), min_size=layers + 1, max_size=layers + 1))
    return tuple(widths), (0, *cuts, layers)


def draw_case(
    draw: st.DrawFn,
    schedules: Sequence[str],
    *,
    min_stages: int = 1,
    min_m: Callable[[int], int] = lambda stages: 1,
    max_m: int = 8,
    max_steps: int = 3,
) -> Case:
    """A random small MLP on ``min_stages``-4 stages with a random partition, M in
    ``min_m(stages)``..``max_m``, one of ``schedules``, SGD or Adam (hypothesis)."""
    stages = draw(st.integers(min_stages, 4))
    widths, bounds = draw_layout(draw, stages, draw(st.integers(stages, 7)))
    return Case(
        seed=draw(st.integers(0, 10_000)),
        widths=widths,
        bounds=bounds,
        microbatches=draw(st.integers(min_m(stages), max_m)),
        schedule=draw(st.sampled_from(list(schedules))),
        optimizer=draw(st.sampled_from(["sgd", "adam"])),
        steps=draw(st.integers(1, max_steps)),
        per_microbatch=draw(st.integers(1, 3)),
    )


def build_model(case: Case) -> nn.Sequential:
    """Random MLP: Linear(w_i, w_i+1) + an activation per layer, seeded."""
    torch.manual_seed(case.seed)
    acts = (nn.Tanh, nn.ReLU, nn.Sigmoid)
    return nn.Sequential(
        *(
            nn.Sequential(nn.Linear(a, b), acts[i % 3]())
            for i, (a, b) in enumerate(zip(case.widths, case.widths[1:], strict=False))
        )
    )


def make_optimizer(case: Case, params: Any) -> torch.optim.Optimizer:
    """SGD with momentum or Adam."""
    if case.optimizer == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def batches(case: Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same inputs and targets on every rank and in the reference."""
    g = torch.Generator().manual_seed(case.seed + 1)
    return [
        (
            torch.randn(case.batch, case.widths[0], generator=g),
            torch.randn(case.batch, case.widths[-1], generator=g),
        )
        for _ in range(case.steps)
    ]


def case_pipeline(case: Case, **extra: Any) -> Pipeline:
    """A Pipeline over ``case``'s model, partition, M and schedule (``extra`` goes to Pipeline)."""
    cfg = PipelineConfig(
        microbatches=case.microbatches,
        schedule=case.schedule,
        partition=case.bounds,
        chunks=case.chunks,
        lead=case.lead,
    )
    return Pipeline(
        build_model(case), nn.functional.mse_loss, lambda p: make_optimizer(case, p), cfg, **extra
    )


def snapshot(pipe: Pipeline) -> dict[str, Any]:
    """This stage's module state (cloned), optimizer state and partition."""
    return {
        "state": {k: {n: t.clone() for n, t in sd.items()} for k, sd in pipe.local_state().items()},
        "optimizer": pipe.optimizer.state_dict() if pipe.optimizer is not None else None,
        "bounds": pipe.partition.bounds,
        "m": pipe.microbatches,
    }


def train_pipelined(
    case: Case,
    changes: dict[int, list[Decision]] | None = None,
    script: dict[int, Decision] | None = None,
) -> dict[str, Any]:
    """Rank job: train ``case`` pipelined, applying ``changes[k]`` before step k.

    With ``script``, a Scripted controller decides after each step instead. Returns losses,
    events, this stage's snapshot and the last report.
    """
    pipe = case_pipeline(case, controller=Scripted(script) if script is not None else None)
    losses, events = [], []
    for k, (x, y) in enumerate(batches(case)):
        for decision in (changes or {}).get(k, []):
            pipe.apply(decision)
        out = pipe.step(x, y)
        losses.append(out.loss)
        events += list(out.report.events)
    result = {"losses": losses, "events": events, "report": out.report.to_dict(), **snapshot(pipe)}
    pipe.close()
    return result


def train_reference(
    case: Case, m_from: dict[int, int] | None = None, skip: frozenset[int] = frozenset()
) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    """Single process, same micro-batch split and accumulation order as the pipeline.

    ``m_from[k] = M`` switches to M micro-batches from step k on; batches in ``skip`` are
    left out (a loop that skips the batches whose step failed).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the stage processes: same kernels, same bits
    try:
        model = build_model(case)
        opt = make_optimizer(case, model.parameters())
        losses = []
        m = case.microbatches
        for k, (x, y) in enumerate(batches(case)):
            m = (m_from or {}).get(k, m)
            if k in skip:
                continue
            total = 0.0
            for xm, ym in zip(
                torch.split(x, len(x) // m), torch.split(y, len(y) // m), strict=True
            ):
                loss = nn.functional.mse_loss(model(xm), ym)
                total += float(loss.detach())
                (loss / m).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total / m)
        return losses, model.state_dict(), opt
    finally:
        torch.set_num_threads(threads)


def assert_matches_reference(
    case: Case,
    ranks: list[dict[str, Any]],
    m_from: dict[int, int] | None = None,
    skip: frozenset[int] = frozenset(),
    reference: tuple[list[float], dict[str, torch.Tensor], Any] | None = None,
) -> None:
    """Losses, parameters and optimizer state of every rank equal the single-process run's
    (``reference``: another run's, e.g. the PipeDream-2BW update rule's)."""
    ref_losses, ref_state, ref_opt = reference or train_reference(case, m_from, skip)
    ref_params = [p for g in ref_opt.param_groups for p in g["params"]]
    ref_by_name = dict(zip(ref_state.keys(), ref_params, strict=True))
    seen: set[str] = set()
    for r in ranks:
        # Same micro-batch split and accumulation order: bit-for-bit equal, no tolerance.
        assert r["losses"] == ref_losses
        names = []
        for name, sd in r["state"].items():
            layer = int(name.split(".")[1])
            for key, tensor in sd.items():
                assert torch.equal(tensor, ref_state[f"{layer}.{key}"]), (name, key)
                seen.add(f"{layer}.{key}")
                names.append(f"{layer}.{key}")
        if r["optimizer"] is None:
            continue
        # The stage's optimizer holds its parameters in layer order, as the reference does
        # (these models have parameters only, no buffers).
        stage_state = r["optimizer"]["state"]
        for idx, name in enumerate(names):
            expected = ref_opt.state.get(ref_by_name[name], {})
            got = stage_state.get(idx, {})
            assert set(got) == set(expected), name
            for key, value in expected.items():
                assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(value)), (name, key)
    assert seen == set(ref_state), "some layer is missing or held twice"


def assert_held_equal(
    ranks: list[dict[str, Any]], ref_state: dict[str, torch.Tensor], what: object = ""
) -> None:
    """The layers all ranks hold (``r["state"]``: global name -> state dict) are, together,
    exactly the reference's, each tensor bit-for-bit equal (``what`` names the case)."""
    held: dict[str, torch.Tensor] = {}
    for r in ranks:
        for name, sd in r["state"].items():
            for key, tensor in sd.items():
                held[f"{name.split('.')[1]}.{key}"] = tensor
    assert set(held) == set(ref_state)
    for key, tensor in held.items():
        assert torch.equal(tensor, ref_state[key]), (what, key)


# --- failure jobs (each run through adaptive_pp.launch) -----------------------------------


def _mlp(width: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        *(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers))
    )


def _pipe(model: nn.Sequential, **cfg: Any) -> Pipeline:
    return Pipeline(
        model,
        nn.functional.mse_loss,
        lambda p: torch.optim.SGD(p, lr=0.1),
        PipelineConfig(**cfg),
    )


def job_indivisible_batch() -> None:
    """Batch of 10 with M=4."""
    pipe = _pipe(_mlp(4, 4), microbatches=4)
    pipe.step(torch.randn(10, 4), torch.randn(10, 4))


class _Fault(nn.Module):
    """Identity that, on its ``when``-th call, raises or SIGKILLs its own process."""

    def __init__(self, when: int, kill: bool = False) -> None:
        super().__init__()
        self.calls, self.when, self.kill = 0, when, kill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.when:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure")
        return x


def job_shape_mismatch() -> None:
    """Stage 0 outputs width 8; stage 1's first layer expects 6 (2 stages)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(6, 4), nn.Linear(4, 4))
    pipe = _pipe(model, microbatches=2, partition=(0, 1, 3))
    pipe.step(torch.randn(4, 4), torch.randn(4, 4))


def job_nan_loss() -> None:
    """Targets with a NaN in micro-batch 1."""
    pipe = _pipe(_mlp(4, 3), microbatches=2)
    y = torch.randn(4, 4)
    y[3, 0] = float("nan")
    pipe.step(torch.randn(4, 4), y)


def job_layer_raises() -> None:
    """Layer 2 (on stage 1 of 3) raises on its 3rd forward call: micro-batch 2 of step 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), _Fault(3), nn.Linear(4, 4))
    pipe = _pipe(model, microbatches=4, partition=(0, 1, 3, 4))
    pipe.step(torch.randn(8, 4), torch.randn(8, 4))


def job_killed_stage() -> None:
    """Stage 2 of 4 is killed during its 3rd forward."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4), nn.Linear(4, 4), _Fault(3, kill=True), nn.Linear(4, 4)]
    pipe = _pipe(nn.Sequential(*layers), microbatches=4, partition=(0, 1, 2, 3, 4))
    for _ in range(3):
        pipe.step(torch.randn(8, 4), torch.randn(8, 4))


class _Hang(nn.Module):
    """Identity that sleeps far longer than the receive timeout on its first call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(60)
        return x


def job_stuck_stage() -> None:
    """Stage 1 of 2 hangs in its forward; stage 0 times out waiting for its gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _Hang())
    pipe = _pipe(model, microbatches=2, recv_timeout=2.0)
    pipe.step(torch.randn(4, 4), torch.randn(4, 4))


# --- migration, version and checkpoint jobs ---------------------------------------------


def job_version_mismatch() -> None:
    """Stage 1 of 2 pretends its weights are one optimizer step ahead: the activation stage 0
    sends at version 0 must be refused."""
    pipe = _pipe(_mlp(4, 3), microbatches=2, partition=(0, 1, 3))
    if pipe.stage == 1:
        pipe.local.skew_version(1)
    pipe.step(torch.randn(4, 4), torch.randn(4, 4))


def job_invalid_move() -> None:
    """Moving every layer off stage 1 would empty it: refused on every rank, no hang."""
    pipe = _pipe(_mlp(4, 6), microbatches=2, partition=(0, 2, 4, 6))
    pipe.apply(MoveLayers(1, 2, 2))


def job_aborted_move(case: Case) -> dict[str, Any]:
    """The receiver's twin of layer 2 has the wrong shape: the move aborts, training goes on."""
    pipe = case_pipeline(case)
    data = batches(case)
    pipe.step(*data[0])
    if pipe.stage == 0:
        pipe.blocks[2] = nn.Sequential(nn.Linear(1, 1), nn.Tanh())  # a twin that cannot fit
    error = ""
    try:
        pipe.apply(MoveLayers(1, 0, 1))
    except MigrationAborted as exc:
        error = str(exc)
    losses = [pipe.step(x, y).loss for x, y in data[1:]]
    result = {"error": error, "losses": losses, **snapshot(pipe)}
    pipe.close()
    return result


def job_checkpoint_then_resume(case: Case, save_at: int, path: str, phase: str) -> dict[str, Any]:
    """phase "save": train save_at steps and checkpoint; "resume": load and train the rest."""
    pipe = case_pipeline(case)
    data = batches(case)
    losses = []
    if phase == "save":
        for x, y in data[:save_at]:
            losses.append(pipe.step(x, y).loss)
        pipe.save_checkpoint(path, extra={"controller": {"note": "saved"}})
    else:
        meta = pipe.load_checkpoint(path)
        assert meta["extra"]["controller"] == {"note": "saved"}
        for x, y in data[meta["step"] :]:
            losses.append(pipe.step(x, y).loss)
    result = {"losses": losses, **snapshot(pipe)}
    pipe.close()
    return result


def job_receiver_killed(case: Case, path: str) -> None:
    """Checkpoint after step 1, then stage 1 dies while receiving migrating layers."""
    from adaptive_pp.runtime import migration

    pipe = case_pipeline(case)
    data = batches(case)
    pipe.step(*data[0])
    pipe.save_checkpoint(path, extra={"controller": {"note": "saved"}})
    if pipe.stage == 1:
        real = migration._receive_layers

        def dying(*args: Any, **kwargs: Any) -> Any:
            os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        migration._receive_layers = dying  # type: ignore[assignment]
    pipe.apply(MoveLayers(0, 1, 1))


class Scripted:
    """A controller that plays back fixed decisions by step (deterministic, with state)."""

    def __init__(self, script: dict[int, Decision]) -> None:
        self.script, self.seen = script, 0

    def decide(self, report: Any, plan: Any) -> Decision:
        self.seen += 1
        return self.script.get(report.step, Keep())

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: Any) -> None:
        self.seen = int(state["seen"])
