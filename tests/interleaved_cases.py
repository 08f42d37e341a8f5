"""Jobs that stage processes run in tests/test_interleaved.py (importable by spawned ranks)."""

from __future__ import annotations

from typing import Any

import runtime_cases as rc

from adaptive_pp.core.decisions import SetMicrobatches


def job_refusals(case: rc.Case, new_m: int) -> dict[str, Any]:
    """Step 0; an M that is no multiple of S is refused (training goes on with the old plan);
    M = ``new_m`` is taken; the remaining steps run under it."""
    pipe = rc.case_pipeline(case)
    data = rc.batches(case)
    losses = [pipe.step(*data[0]).loss]
    refused = ""
    try:
        pipe.apply(SetMicrobatches(pipe.num_stages + 1))
    except ValueError as exc:
        refused = str(exc)
    pipe.apply(SetMicrobatches(new_m))
    losses += [pipe.step(x, y).loss for x, y in data[1:]]
    out = {"losses": losses, "refused": refused, **rc.snapshot(pipe)}
    pipe.close()
    return out
