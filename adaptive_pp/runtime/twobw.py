"""PipeDream-2BW on a rank: each step runs a window of the unflushed 1F1B stream.

``core.twobw`` gives the actions: step t's forwards F(0..M-1) and the backwards due in it, the
previous step's last ones (spilled, ids m - M) first. Weights come from ``WeightVersions``:
step t's micro-batches run forward and backward on W(t-1), each step on leaf tensors of its
own, so gradients of different steps never mix. Once a rank has every backward of step t-1,
it makes W(t) from its gradients on a thread beside the window (``AsyncState.start_update``),
joined at the window's end: the last stage, which spills nothing, from the start of window t;
the others once window t's spilled backwards have run (or in the drain). The update is the
same optimizer step on the same tensors as inline, off the stream's critical path.

Messages: a forward's activation and a backward's gradient carry the version the micro-batch
ran on, checked on arrival against the receiver's stash (VersionMismatch otherwise). Each
rank's first backward of the window that is not spilled sends its gradient to a rank that
spills one more: that rank takes it in its next step, so it is filed under the next round with
its id there (``StageWorker.grads_for_next_step``); every other message stays in its round.
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
    actions = twobw.window(num, m, s, spill=state.spill)
    leaves = state.versions.leaves(t - 1, f"the forwards of step {t}")
    worker = local.workers[0]
    worker.prepare(
        actions, t - 1, carry=m if state.spill else 0, versions=state.versions.storage_ptrs()
    )
    # The upstream rank spills one backward more: it takes our last backward's gradient next.
    last = m - 1 - twobw.warmup(num, m, s)
    worker.grads_for_next_step = frozenset({last} if s > 0 and last >= 0 else ())
    worker.microbatches_of_step = m
    params = state.versions.params
    on = {id(params[n]): leaf for n, leaf in leaves.items()}  # the modules run on W(t-1)
    # Step t-1 is complete on the last stage since its window, elsewhere once this window's
    # spilled backwards (its last) have run: W(t) is made from it then, beside the rest of the
    # window (``AsyncState.start_update``; W(t) goes where W(t-2) was, which nothing needs any
    # more), and joined at the window's end. The last stage posts the loss after its last
    # forward.
    spilled = [i for i, a in enumerate(actions) if a.kind == "B" and a.microbatch < 0]
    if local.is_last or not state.spill:
        cut = max(i for i, a in enumerate(actions) if a.kind == "F") + 1
    else:
        cut = spilled[-1] + 1 if spilled else 0
    try:
        with swapped_in((seg.module for seg in worker.segments), on):
            if local.is_last and state.spill:
                _start_update(local, state, t, state.pending)
            log = _run(local, actions[:cut], inputs, targets, t0, t - 1, flush=False)
            if local.is_last and post_loss:  # the loss is known after the last forward
                local.control.post(local.control.round, LOSS, log.loss_sum / m)
            elif not local.is_last and state.spill:
                _start_update(local, state, t, state.pending)
            log = _joined(log, _run(local, actions[cut:], inputs, targets, t0, t - 1))
        t_opt = time.perf_counter()
    finally:
        state.join()  # W(t) is made (a failed window waits for it too: nothing outlives it)
    state.pending = leaves  # W(t+1) is made from step t's gradients
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
    actions = twobw.drain(num, m, s)
    worker = local.workers[0]
    worker.prepare(actions, t - 1, carry=m, versions=state.versions.storage_ptrs())
    worker.grads_for_next_step = frozenset()
    log = _run(local, actions, None, None, t0, t - 1)
    _start_update(local, state, t, state.pending)
    state.join()
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


def _start_update(
    local: LocalStage, state: AsyncState, version: int, leaves: dict[str, torch.Tensor]
) -> None:
    """Start making W(``version``) from the gradients on ``leaves`` beside the stage thread
    (the step that ran on W(v-2) is complete: its storage takes the new version; no stash may
    still need it). ``local.version`` follows when it is joined (``AsyncState.join``, at the
    end of the window or drain that started it)."""
    freed = version - 2
    for w in local.workers:
        if freed in w.stashed_versions():
            raise VersionMismatch(
                f"stage {local.stage} would overwrite weight version {freed} while a backward "
                "still needs it",
                stage=local.stage,
            )
    grads = {n: leaf.grad for n, leaf in leaves.items()}
    versions, optimizer = state.versions, local.optimizer

    def done() -> None:
        local.version = version

    state.start_update(lambda: versions.update(version, grads, optimizer), done)
