"""PipeDream-2BW on a rank: each step runs a window of the unflushed 1F1B stream.

``core.twobw`` gives the actions: step t's forwards F(0..M-1) and the backwards due in it, the
previous step's last ones (spilled, ids m - M) first. Weights come from ``WeightVersions``:
step t's micro-batches run forward and backward on W(t-1), each step on leaf tensors of its
own, so gradients of different steps never mix. Once a rank has every backward of a step, it
makes the next version at the end of the window: the last stage, which spills nothing, makes
W(t+1) from step t's gradients after window t; the others make W(t) from step t-1's after the
window its spill ran in (or after the drain).

Messages: a forward's activation and a backward's gradient carry the version the micro-batch
ran on, checked on arrival against the receiver's stash (VersionMismatch otherwise). The
last ``lead`` backwards of its own step a rank runs in a window (ids M - w(s-1) .. M - 1 - w(s),
w the warm-ups) send their gradients to a rank that spills ``lead`` more: that rank takes them
in its next step, so they are filed under the next round with their ids there
(``StageWorker.grads_for_next_step``); every other message stays in its round.
Between a window and anything but the next window or a drain no round may start: ``Pipeline``
drains first (moves, M changes, checkpoints, close).

End of a step (``post_loss``, see ``stepreport``): the last stage posts the step's loss to
every rank right after its last forward, before its last backward; no rank waits for its
peers' ends of window, so consecutive windows overlap as in the simulated stream. The drain
settles the reports still on their way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..core import twobw
from ..core.errors import VersionMismatch
from ..core.schedules import Action
from .driver import run_actions
from .local import LocalStage
from .stagelog import StageLog
from .stepreport import LOSS
from .versions import AsyncState, swapped_in


def run_window(
    local: LocalStage,
    state: AsyncState,
    inputs: Sequence[torch.Tensor] | None,
    targets: Sequence[torch.Tensor] | None,
    t0: float,
    *,
    post_loss: bool = False,
) -> tuple[StageLog, tuple[float, float]]:
    """Step ``local.step_count``: its window, then the version its completed step makes (when
    it started and ended, perf_counter seconds). ``post_loss``: the last stage posts the loss
    to every peer (slot ``LOSS`` of this round) once its last forward has run."""
    s, num, m = local.stage, local.num_stages, local.microbatches
    t = local.step_count
    actions = twobw.window(num, m, s, spill=state.spill, lead=local.lead)
    leaves = state.versions.leaves(t - 1, f"the forwards of step {t}")
    worker = local.workers[0]
    worker.prepare(
        actions, t - 1, carry=m if state.spill else 0, versions=state.versions.storage_ptrs()
    )
    # The upstream rank spills more backwards: it takes the gradients of our last ones next.
    worker.grads_for_next_step = frozenset(
        range(m - twobw.warmup(num, m, s - 1, local.lead), m - twobw.warmup(num, m, s, local.lead))
        if s > 0
        else ()
    )
    worker.microbatches_of_step = m
    params = state.versions.params
    on = {id(params[n]): leaf for n, leaf in leaves.items()}  # the modules run on W(t-1)
    with swapped_in((seg.module for seg in worker.segments), on):
        if post_loss and local.is_last:  # the loss is known after the last forward
            cut = max(i for i, a in enumerate(actions) if a.kind == "F") + 1
            log = _run(local, actions[:cut], inputs, targets, t0, t - 1, flush=False)
            local.control.post(local.control.round, LOSS, log.loss_sum / m)
            log = _joined(log, _run(local, actions[cut:], inputs, targets, t0, t - 1))
        else:
            log = _run(local, actions, inputs, targets, t0, t - 1)
    t_opt = time.perf_counter()
    if local.is_last:  # nothing spills: step t is complete
        _update(local, state, t + 1, leaves)
    else:
        if state.spill:
            _update(local, state, t, state.pending)
        state.pending = leaves
    state.spill = True  # on every rank alike: a drain is due (the last stage's is empty)
    return log, (t_opt, time.perf_counter())


def run_drain(local: LocalStage, state: AsyncState, t0: float) -> StageLog | None:
    """Run the backwards the last window left and make the version they complete; then
    settle the reports still on their way."""
    if not state.spill:
        settle(state)
        return None
    s, num, m = local.stage, local.num_stages, local.microbatches
    t = local.step_count  # windows run so far
    actions = twobw.drain(num, m, s, local.lead)
    worker = local.workers[0]
    worker.prepare(actions, t - 1, carry=m, versions=state.versions.storage_ptrs())
    worker.grads_for_next_step = frozenset()
    log = _run(local, actions, None, None, t0, t - 1)
    if not local.is_last:  # the last stage made its version after its window
        _update(local, state, t, state.pending)
    state.pending, state.spill = {}, False
    settle(state)
    return log


def settle(state: AsyncState) -> None:
    """Collect the shares of every report still on its way (waiting for them if need be)."""
    while state.unsettled:
        state.unsettled[0].settle()
        state.unsettled.pop(0)


def _run(
    local: LocalStage,
    actions: Sequence[Action],
    inputs: Sequence[torch.Tensor] | None,
    targets: Sequence[torch.Tensor] | None,
    t0: float,
    version: int,
    *,
    flush: bool = True,
) -> StageLog:
    """Run ``actions`` on the prepared workers, then (``flush``) wait for every send to
    complete."""
    log = run_actions(
        local.workers,
        actions,
        inputs,
        targets,
        local.control.round,
        t0,
        version=version,
        prepared=True,
    )
    if flush:
        for ln in local.links():
            ln.flush()
    return log


def _joined(log: StageLog, rest: StageLog) -> StageLog:
    """``log`` extended by ``rest``, the same step's later actions (same origin)."""
    log.actions += rest.actions
    log.start += rest.start
    log.end += rest.end
    log.compute += rest.compute
    log.wait += rest.wait
    log.peak_stash = max(log.peak_stash, rest.peak_stash)
    log.peak_stash_bytes = max(log.peak_stash_bytes, rest.peak_stash_bytes)
    for mine, more in (
        (log.layer_forward, rest.layer_forward),
        (log.layer_backward, rest.layer_backward),
    ):
        for layer, seconds in more.items():
            mine[layer] = mine.get(layer, 0.0) + seconds
    log.loss_sum += rest.loss_sum
    return log


def _update(
    local: LocalStage, state: AsyncState, version: int, leaves: dict[str, torch.Tensor]
) -> None:
    """Make W(``version``) from the gradients on ``leaves`` (the step that ran on W(v-2)
    is complete: its storage takes the new version; no stash may still need it)."""
    freed = version - 2
    for w in local.workers:
        if freed in w.stashed_versions():
            raise VersionMismatch(
                f"stage {local.stage} would overwrite weight version {freed} while a backward "
                "still needs it",
                stage=local.stage,
            )
    grads = {n: leaf.grad for n, leaf in leaves.items()}
    state.versions.update(version, grads, local.optimizer)
    local.version = version
