"""The event replay: for schedules without a run plan, and to name a deadlock.

Run a rank until it waits for a slot nobody filled yet, then run that slot's producer (depth
first) and come back once it filled it; a wait on a rank already waiting closes a cycle:
deadlock, raised as a ScheduleError naming each stuck rank's action and the input it waits for.
Same floating-point operations in the same order as the run plan's pass (``flow``).
"""

from __future__ import annotations

from operator import add

from .actions import Schedule, ScheduleError
from .compiled import Compiled, _ready


def _event_replay(
    schedule: Schedule, code: Compiled, flat: list[float], hops: list[float]
) -> tuple[list[list[float]], list[list[float]], list[float], list[float], list[float]]:
    """Replay by running ranks until they wait, depth first (see the module docstring); per rank
    starts and ends, waits, and flat starts and arrivals."""
    cols = code.columns
    assert cols is not None
    num_stages = schedule.num_stages
    need, out, producer = cols.need, cols.out, cols.producer
    cost = list(map(flat.__getitem__, cols.key))
    hop = list(map(hops.__getitem__, cols.link))
    offsets = code.offsets
    ends = offsets[1:]
    cur = list(offsets[:-1])
    free = [0.0] * num_stages
    waited = [0.0] * num_stages
    ready = _ready(num_stages * schedule.chunks, schedule.microbatches)
    st = [0.0] * offsets[-1]
    # Run a rank until it waits on a slot nobody filled yet, then run that slot's producer
    # (depth first) and come back once it filled the slot; a wait on a rank already waiting
    # (or on itself) closes a cycle: deadlock.
    stack: list[tuple[int, int]] = []
    waiting = [False] * num_stages
    deadlock = False
    s, nxt, want = 0, 0, -1
    i, e, t, w = cur[0], ends[0], 0.0, 0.0
    while True:
        if i < e:
            k = need[i]
            r = ready[k]
            if r is None:
                cur[s], free[s], waited[s] = i, t, w
                p = producer[k]
                if p == s or waiting[p]:
                    deadlock = True
                    break
                stack.append((s, k))
                waiting[s] = True
                want = k
                s = p
                i, e, t, w = cur[s], ends[s], free[s], waited[s]
                continue
            r += hop[i]
            if r > t:
                w += r - t
                t = r
            st[i] = t
            t += cost[i]
            o = out[i]
            ready[o] = t
            i += 1
            if o == want:
                cur[s], free[s], waited[s] = i, t, w
                s = stack.pop()[0]
                waiting[s] = False
                want = stack[-1][1] if stack else -1
                i, e, t, w = cur[s], ends[s], free[s], waited[s]
            continue
        cur[s], free[s], waited[s] = i, t, w
        if stack:  # pragma: no cover - a rank always fills what others wait on before it ends
            deadlock = True
            break
        while nxt < num_stages and cur[nxt] == ends[nxt]:
            nxt += 1
        if nxt == num_stages:
            break
        s = nxt
        i, e, t, w = cur[s], ends[s], free[s], waited[s]
    if deadlock:
        _raise_deadlock(schedule, code, cur, ready)
    # Ends as the loop added them (start + cost); arrivals from the filled slots (each is
    # filled once) plus the hop: the additions the loop made.
    en = list(map(add, st, cost))
    arrived = list(map(add, map(ready.__getitem__, need), hop))  # type: ignore[arg-type]
    starts = [st[offsets[s] : ends[s]] for s in range(num_stages)]
    finish = [en[offsets[s] : ends[s]] for s in range(num_stages)]
    return starts, finish, waited, st, arrived


def _raise_deadlock(
    schedule: Schedule, code: Compiled, cur: list[int], ready: list[float | None]
) -> None:
    """Advance every rank as far as it can go, then name each stuck rank's action and input."""
    cols = code.columns
    assert cols is not None
    ends, need, out = code.offsets[1:], cols.need, cols.out
    moved = True
    while moved:
        moved = False
        for s in range(schedule.num_stages):
            i = cur[s]
            while i < ends[s] and ready[need[i]] is not None:
                ready[out[i]] = 0.0
                i += 1
            moved = moved or i > cur[s]
            cur[s] = i
    flat = [a for acts in schedule.stages for a in acts]
    stuck = [s for s in range(schedule.num_stages) if cur[s] < ends[s]]
    waits = []
    for s in stuck:
        k = need[cur[s]]
        p = cols.producer[k]
        lo, hi = code.offsets[p], ends[p]
        dep = flat[lo + out[lo:hi].index(k)]
        waits.append(f"stage {s} waits at {flat[cur[s]]} for {dep}")
    first = flat[cur[stuck[0]]]
    raise ScheduleError(f"deadlock: {'; '.join(waits)}", stuck[0], first)
