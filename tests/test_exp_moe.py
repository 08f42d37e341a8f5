"""exp_moe's load probe on a rank (no processes): the fake pipe stands for Pipeline's
``blocks``, ``partition`` and ``stage``."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adaptive_pp.core.partition import Partition  # noqa: E402
from experiments import exp_moe  # noqa: E402


def test_the_load_probe_skips_a_block_that_has_not_run_on_this_rank() -> None:
    """A move brings the MoE block to stage 0, whose copy never routed a token: no reading
    (it divided by zero there); once it runs, the busiest expert over the balanced load."""
    blocks = exp_moe.model(False, 0.0, 0.0)
    here = Partition((0, exp_moe.MOE_LAYER + 1, 10, 13, exp_moe.LAYERS))  # the block on stage 0
    pipe = SimpleNamespace(blocks=blocks, partition=here, stage=0)
    assert exp_moe.load_factor(pipe, 5) is None
    blocks[exp_moe.MOE_LAYER](torch.randn(2, exp_moe.TOKENS, exp_moe.WIDTH))
    factor = exp_moe.load_factor(pipe, 6)
    assert factor is not None and factor >= 1.0
    assert exp_moe.load_factor(SimpleNamespace(blocks=blocks, partition=here, stage=1), 6) is None
