"""PipeDream-2BW: the single-process reference of its update rule, and rank jobs for the tests.

The rule (Narayanan et al. 2021): step t's micro-batches run forward and backward on W(t-1),
their gradients summed in micro-batch order, and W(t+1) = W(t) - update(that sum), with
W(-1) = W(0). The reference keeps the version the next step runs on beside the newest.
"""

from __future__ import annotations

from typing import Any

import runtime_cases as rc
import torch
from torch import nn
from torch.func import functional_call

from adaptive_pp.core.decisions import Decision


def train_reference(
    case: rc.Case, m_from: dict[int, int] | None = None
) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    """Losses of every step, the final parameters W(T) and the optimizer, one process
    (``m_from[k] = M``: M micro-batches from step k on)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the stage processes: same kernels, same bits
    try:
        model = rc.build_model(case)
        opt = rc.make_optimizer(case, model.parameters())
        stale = {n: p.detach().clone() for n, p in model.named_parameters()}  # W(-1) = W(0)
        losses, m = [], case.microbatches
        for k, (x, y) in enumerate(rc.batches(case)):
            m = (m_from or {}).get(k, m)
            leaves = {n: t.requires_grad_() for n, t in stale.items()}
            total = 0.0
            for xm, ym in zip(
                torch.split(x, len(x) // m), torch.split(y, len(y) // m), strict=True
            ):
                loss = nn.functional.mse_loss(functional_call(model, leaves, (xm,)), ym)
                total += float(loss.detach())
                (loss / m).backward()
            losses.append(total / m)
            stale = {n: p.detach().clone() for n, p in model.named_parameters()}  # W(t)
            for n, p in model.named_parameters():
                p.grad = leaves[n].grad
            opt.step()  # W(t+1) = W(t) - update(gradients at W(t-1))
            opt.zero_grad(set_to_none=True)
        return losses, model.state_dict(), opt
    finally:
        torch.set_num_threads(threads)


def train_pipelined(
    case: rc.Case,
    flush_every: int = 0,
    changes: dict[int, list[Decision]] | None = None,
    script: dict[int, Decision] | None = None,
) -> dict[str, Any]:
    """Rank job: ``case`` under 2BW (drained every ``flush_every`` steps too, if set; the
    decisions ``changes[k]`` applied before step k; with ``script``, a controller deciding
    after each step), then drained; losses, events, this stage's snapshot and the last
    report."""
    pipe = rc.case_pipeline(case, controller=rc.Scripted(script) if script else None)
    losses, events = [], []
    for k, (x, y) in enumerate(rc.batches(case)):
        for decision in (changes or {}).get(k, []):
            pipe.apply(decision)
        out = pipe.step(x, y)
        losses.append(out.loss)
        events += list(out.report.events)
        if flush_every and (k + 1) % flush_every == 0:
            pipe.flush()
    pipe.flush()
    result = {"losses": losses, "events": events, "report": out.report.to_dict()}
    result.update(rc.snapshot(pipe))
    pipe.close()
    return result


def job_tampered(mode: str) -> None:
    """Rank job (3 ranks, 2BW, M=2): at step 2, stage 0 stamps its activations with a wrong
    version (``mode`` "message"), or its stash of a spilled micro-batch claims a wrong one
    ("stash"); the receiving or the backward stage must refuse."""
    from adaptive_pp.runtime.stage import StageWorker

    pipe = rc.case_pipeline(rc.Case(3, (4,) * 4, (0, 1, 2, 3), 2, "2bw", "sgd", 3))
    prepare = StageWorker.prepare

    def tampered(self: StageWorker, *args: Any, **kwargs: Any) -> None:
        prepare(self, *args, **kwargs)
        if pipe.stage == 0 and pipe.step_count == 2:
            if mode == "message":
                self._version += 1
            else:
                self._stash_version[-1] += 5

    StageWorker.prepare = tampered  # type: ignore[method-assign]
    for x, y in rc.batches(rc.Case(3, (4,) * 4, (0, 1, 2, 3), 2, "2bw", "sgd", 3)):
        pipe.step(x, y)


def train_through_checkpoint(
    case: rc.Case, save_at: int, path: str, resume: bool
) -> dict[str, Any]:
    """Rank job: 2BW up to step ``save_at``, then save (``resume`` False); or load and train the
    remaining steps, then drain (``resume`` True). Losses of the steps run and the snapshot."""
    pipe = rc.case_pipeline(case)
    batches = rc.batches(case)
    start = pipe.load_checkpoint(path)["step"] if resume else 0
    losses = []
    for x, y in batches[start : len(batches) if resume else save_at]:
        losses.append(pipe.step(x, y).loss)
    if not resume:
        pipe.save_checkpoint(path)
    pipe.flush()
    result = {"losses": losses, **rc.snapshot(pipe)}
    pipe.close()
    return result


def train_refusing(case: rc.Case, refused: Decision, at: int) -> dict[str, Any]:
    """Rank job: ``case`` under 2BW, applying ``refused`` before step ``at`` (it must raise
    ValueError on every rank and change nothing); losses, the refusal, this stage's snapshot."""
    pipe = rc.case_pipeline(case)
    losses, refusal = [], ""
    for k, (x, y) in enumerate(rc.batches(case)):
        if k == at:
            try:
                pipe.apply(refused)
            except ValueError as exc:
                refusal = str(exc)
        losses.append(pipe.step(x, y).loss)
    pipe.flush()
    result = {"losses": losses, "refusal": refusal, "plan": pipe.plan.to_dict()}
    result.update(rc.snapshot(pipe))
    pipe.close()
    return result
