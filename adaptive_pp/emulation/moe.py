"""A top-k mixture-of-experts block: real routing, emulated expert-parallel accelerator time.

The math is real and differentiable: a router (Linear width -> experts) scores every token, the
softmax's top-k experts are picked per token with their probabilities renormalised as gates,
the tokens are really dispatched to those experts (small FFNs: width -> hidden -> width, GELU)
and their outputs are combined back, weighted by the gates, onto a residual: ``x + sum_j
gate_j * expert_j(x)``. Gradients reach the input, the experts that got tokens and the router
(through the gates).

Time model (docs/DESIGN.md, H100 calibration): the experts are spread over devices inside the
stage (expert parallelism), so the stage waits for its busiest expert and the block's emulated
time is affine in the **max tokens per expert**, ``launch + per_token * max_load`` forward and
2.4x that backward (an ``adaptive_pp.emulation`` window: routing and dispatch run inside it;
``slowdown`` applies too). Balanced routing gives max_load ~ tokens * k / experts; skewed
routing up to tokens (k <= experts / 2: every token sends one of its k slots to the hot expert).

Skew is injected reproducibly: ``skew`` is added to the router logit of expert ``hot`` (a plain
attribute, not state, so an experiment can drift it step by step on every rank alike).
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import Emulated, Window


class Expert(nn.Module):
    """One expert FFN: Linear(width, hidden), GELU, Linear(hidden, width)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The expert's output for the tokens it was sent."""
        out: torch.Tensor = self.fc2(nn.functional.gelu(self.fc1(x)))
        return out


class MoEBlock(Emulated):
    """Router + ``experts`` FFNs, top-``top_k`` routing; emulated time follows max tokens/expert."""

    def __init__(
        self,
        width: int,
        experts: int = 8,
        top_k: int = 2,
        hidden: int | None = None,
        forward_s: float = 0.0,
        per_token_s: float = 0.0,
        backward_s: float | None = None,
        skew: float = 0.0,
        hot: int = 0,
    ) -> None:
        """``forward_s``: launch time; ``per_token_s``: time per token on the busiest expert."""
        if not 1 <= top_k <= experts:
            raise ValueError(f"need 1 <= top_k <= experts, got top_k={top_k}, experts={experts}")
        if not 0 <= hot < experts:
            raise ValueError(f"hot expert {hot} is not one of the {experts} experts")
        super().__init__(forward_s, backward_s, per_token_s)
        self.num_experts, self.top_k = experts, top_k
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(Expert(width, hidden or 2 * width) for _ in range(experts))
        self.skew, self.hot = skew, hot
        self.last_load: tuple[int, ...] = (0,) * experts

    def route(
        self, tokens: torch.Tensor, window: Window | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token (rows of ``tokens``): the top-k expert indices and their gates (sum 1)."""
        weight = self.router.weight if window is None else window.anchor(self.router.weight)
        logits = nn.functional.linear(tokens, weight, self.router.bias)
        if self.skew:
            bias = torch.zeros(self.num_experts, dtype=logits.dtype, device=logits.device)
            bias[self.hot] = self.skew
            logits = logits + bias
        top, idx = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        return idx, top / top.sum(dim=-1, keepdim=True)

    def load(self, idx: torch.Tensor) -> tuple[int, ...]:
        """Tokens routed to each expert, from ``route``'s indices."""
        counts = torch.bincount(idx.flatten(), minlength=self.num_experts)
        return tuple(int(c) for c in counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route, dispatch, run the experts, combine; then the busiest expert's emulated time."""
        window = Window()
        tokens = x.reshape(-1, x.shape[-1])
        idx, gates = self.route(tokens, window)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            y = expert(tokens[tok]) * gates[tok, slot].unsqueeze(-1)
            out = out.index_add(0, tok, y)
        self.last_load = self.load(idx)
        return self.timed(window, x + out.reshape(x.shape), max(self.last_load))

    def balanced_load(self, tokens: int) -> float:
        """Tokens per expert when routing is perfectly even: tokens * k / experts."""
        return tokens * self.top_k / self.num_experts
