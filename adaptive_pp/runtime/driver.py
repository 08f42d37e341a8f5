"""One loop over a rank's actions for a step, each run by the StageWorker of its chunk.

A rank holds one chunk per virtual stage it runs (one, or V under an interleaved schedule).
The schedule orders the rank's actions across its chunks (``Action.chunk``); this loop keeps
that order, dispatches each action to its chunk's worker and measures it into one StageLog
for the rank: per-action start and end (CUDA events on a GPU, see ``stagelog``), compute, time
waiting for inputs, and the stash peaks summed over the chunks (what the rank holds at once).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..core.schedules import Action
from .stage import StageWorker
from .stagelog import StageLog


def run_actions(
    workers: Sequence[StageWorker],
    actions: Sequence[Action],
    inputs: Sequence[torch.Tensor] | None,
    targets: Sequence[torch.Tensor] | None,
    step: int,
    t0: float,
    *,
    version: int,
    prepared: bool = False,
) -> StageLog:
    """Run ``actions`` in order, action ``a`` on ``workers[a.chunk]``; return the rank's log.

    Inputs go to the chunk of virtual stage 0, targets to the chunk that computes the loss;
    ``version`` is the weights' version (stamped on what is sent, checked on what arrives);
    times are relative to ``t0``. ``prepared``: the caller prepared the workers itself.
    """
    log = StageLog.on(workers[0].device)
    for w in workers:
        if not prepared:
            w.prepare(actions, version)
    m_count = sum(a.kind == "F" and a.chunk == 0 for a in actions)  # each chunk runs M forwards
    for action in actions:
        worker = workers[action.chunk]
        t_req = time.perf_counter()
        t_start = worker.act(action, inputs, targets, m_count, step, log)
        log.peak_stash = max(log.peak_stash, sum(w.stashed for w in workers))
        log.peak_stash_bytes = max(log.peak_stash_bytes, sum(w.live_bytes for w in workers))
        log.action_done(action, t_req, t_start, t0)
    log.resolve(t0)
    return log
