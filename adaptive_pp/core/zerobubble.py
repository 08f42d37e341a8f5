"""Chunked and split-backward schedules: interleaved 1F1B and ZB-H1 (core only; ZB-V later).

The runtime runs both: ZB-H1 (split backward, one chunk per rank) and interleaved 1F1B
(``Schedule.chunks > 1``: one StageWorker per chunk, see runtime/local.py).
"""

from __future__ import annotations

from .actions import Schedule, ScheduleError, _actions, _actions_of, _check_sizes, _gc_paused


@_gc_paused
def interleaved_1f1b(num_stages: int, microbatches: int, chunks: int = 2) -> Schedule:
    """Megatron's interleaved 1F1B: V = ``chunks`` model chunks per rank, looping placement.

    Micro-batches go through in rounds of S: rank r runs forwards of chunk 0 for S micro-batches,
    then chunk 1 for the same S, ..., then the next round; backwards likewise, chunks in reverse.
    Warm-up: ``(V - 1) * S + 2 * (S - 1 - r)`` forwards (capped at M * V), as Megatron and
    torch do, then one forward and one backward in turn, then the remaining backwards.
    Needs ``M % S == 0`` (Megatron's and torch's condition), else ScheduleError.
    """
    _check_sizes(num_stages, microbatches, chunks)
    if microbatches % num_stages:
        raise ScheduleError(
            f"interleaved 1F1B needs micro-batches ({microbatches}) to be a multiple of the "
            f"stages ({num_stages})"
        )
    s_, v_ = num_stages, chunks
    total = microbatches * v_
    group = s_ * v_
    fc = [(k // s_) % v_ for k in range(total)]  # chunk and micro-batch of the k-th forward
    fm = [(k // group) * s_ + k % s_ for k in range(total)]
    bc = [v_ - 1 - c for c in fc]  # backwards: same micro-batches, chunks in reverse
    stages = []
    for r in range(s_):
        warmup = min((v_ - 1) * s_ + 2 * (s_ - 1 - r), total) if v_ > 1 else min(s_ - 1 - r, total)
        n = total - warmup
        kinds = "F" * warmup + "FB" * n + "B" * warmup
        stages.append(_actions_of(r, kinds, _steady(fm, fm, warmup, n), _steady(fc, bc, warmup, n)))
    return Schedule(tuple(stages), microbatches, "interleaved-1f1b", chunks, "loop")


def _steady(fwd: list[int], bwd: list[int], warmup: int, n: int) -> list[int]:
    """``fwd[:warmup]``, then ``fwd[warmup + j]``, ``bwd[j]`` for j < n, then ``bwd[n:]``."""
    body = [0] * (2 * n)
    body[0::2] = fwd[warmup:]
    body[1::2] = bwd[:n]
    return [*fwd[:warmup], *body, *bwd[n:]]


@_gc_paused
def zb_h1(num_stages: int, microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", section 2.1).

    1F1B with the backward split into I (input gradient, on the critical path) and W (weight
    gradient): rank r runs ``min(S - 1 - r, M)`` warm-up forwards, then per micro-batch k
    ``F(k + warm-up)`` (while any are left) and ``I(k)``, and from the (r+1)-th I on also the
    oldest pending W; the remaining W's close the step. Delaying rank r's W's by r makes every
    rank keep ``min(S, M)`` micro-batches in flight (F to W), rank 0's 1F1B peak, while the
    delayed W's fill the cool-down bubble.
    """
    _check_sizes(num_stages, microbatches)
    stages = []
    for r in range(num_stages):
        warmup = min(num_stages - 1 - r, microbatches)
        kinds: list[str] = ["F"] * warmup
        mbs = list(range(warmup))
        pending = 0
        for k in range(microbatches):
            if k + warmup < microbatches:
                kinds.append("F")
                mbs.append(k + warmup)
            kinds.append("I")
            mbs.append(k)
            if k >= r:
                kinds.append("W")
                mbs.append(pending)
                pending += 1
        kinds.extend("W" * (microbatches - pending))
        mbs.extend(range(pending, microbatches))
        stages.append(_actions(r, "".join(kinds), mbs))
    return Schedule(tuple(stages), microbatches, "zb-h1")
