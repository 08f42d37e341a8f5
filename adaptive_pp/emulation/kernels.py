"""Emulated-kernel layers: a real small layer plus a sleep standing for accelerator time.

On a 2-core CPU machine four stage processes cannot each run real kernels at accelerator speed,
so timing studies use these: the math is real (a Linear + tanh), the duration is a sleep whose
length is affine in the micro-batch size, ``launch + per_sample * batch``, with backward = 2.4x
forward by default (as measured for GPT blocks on an H100; see docs/DESIGN.md). ``slowdown``
scales a layer at run time to inject skew. Every figure produced with these says so.

**Timing model.** On an accelerator the host launches a layer's kernels asynchronously, so the
layer's own host work (Python, autograd bookkeeping, here also the small real math) overlaps its
device time. Each emulated call is therefore a *window*: it sleeps until ``duration`` has passed
since the window opened, not ``duration`` after the host work. The forward window opens when the
module's forward starts; the backward window opens when the gradient reaches the module's output
and closes on an identity node on the module's first parameter, whose gradient is the last one
autograd computes for the module. A window opened before the thread's last emulated sleep ended
counts from that wake-up instead, so recomputation under activation checkpointing (a forward
window inside a backward one) is paid in full. Host work outside any window (the runtime's own:
sends, receives, bookkeeping) is never hidden. Split backward (zero-bubble schedules, see
``adaptive_pp.runtime.splitgrad``): the I pass reaches the output but not the anchor; its window,
``1 - W_SHARE`` of the backward from the output, is slept once the layer's input-gradient math
after the output is done (when the thread's next window opens, or when the pass ends:
``sleep_owed``), so that math runs inside the window like any call's host work (it used to be
slept at the output, the math after it, unhidden); the W pass, which starts at the nodes next to
the weights (ours and torch's alike) and so never passes the output again, sleeps ``W_SHARE``
of it at the anchor counted from the thread's last wake-up (``core.simulator``'s split), so
I + W = one backward. A W that does start at the output (a segment whose input needs no
gradient) reopens the window there. With
no parameter that requires a gradient the backward sleeps its whole duration at the output.
Sleeps aim at their deadline: on Linux each sleeping thread asks for a 1 µs timer slack
(``prctl``; default 50 µs), and each thread wakes its sleeps early by its running mean lateness
(docs/EXPERIMENTS.md, "Emulated kernels"), by at most half the sleep, so a burst of late
wake-ups (a busy core) cannot zero the kernels.

``EmulatedLayer`` (Linear + tanh) saves only its boundaries for backward; ``EmulatedFFN`` (a
residual width -> hidden -> width block) also saves its hidden activations, like a transformer
block. ``Window`` is the timing itself, for other modules (``adaptive_pp.moe``).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..core.simulator import BACKWARD_RATIO, W_SHARE
from ..runtime.splitgrad import backward_phase, on_phase_exit

_PR_SET_TIMERSLACK = 29


class _ThreadClock(threading.local):
    """Per thread: when its last emulated sleep ended, and whether its timer slack is set."""

    woke = 0.0
    late = 0.0  # running mean of how much later than asked a sleep wakes up
    slack_set = False
    owed = 0.0  # deadline of an I pass's window not slept yet (0: none)


_clock = _ThreadClock()


def _set_timer_slack() -> None:
    """Ask Linux for a 1 µs timer slack on this thread (default 50 µs); elsewhere nothing."""
    _clock.slack_set = True
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no libc prctl: keep the default
            ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)


def sleep_window(opened: float, duration: float) -> None:
    """Sleep until ``duration`` s after the window ``opened`` (or after this thread last woke,
    an owed window slept first)."""
    if duration <= 0:
        return
    sleep_owed()
    _sleep_until(max(opened, _clock.woke) + duration)


def owe_window(opened: float, duration: float) -> None:
    """A window whose sleep waits for the host work after it: slept when this thread's next
    window opens, or at ``sleep_owed`` (an I pass: the layer's input-gradient math comes after the
    gradient reached its output, and runs inside the window as every call's host work does)."""
    if duration <= 0:
        return
    sleep_owed()
    _clock.owed = max(opened, _clock.woke) + duration


def sleep_owed() -> None:
    """Sleep out the window this thread owes, if any (the end of an I pass)."""
    if _clock.owed:
        deadline, _clock.owed = _clock.owed, 0.0
        _sleep_until(deadline)


on_phase_exit(sleep_owed)


def _sleep_until(deadline: float) -> None:
    if not _clock.slack_set:
        _set_timer_slack()
    left = deadline - time.perf_counter()
    if left > 0:
        asked = max(left - _clock.late, left / 2)  # aim off by the mean lateness, at most half
        t0 = time.perf_counter()
        time.sleep(asked)
        _clock.late += 0.1 * (time.perf_counter() - t0 - asked - _clock.late)
    _clock.woke = time.perf_counter()


class Window:
    """One emulated call: a forward window from creation, a backward window set up by ``close``."""

    def __init__(self) -> None:
        self.opened = time.perf_counter()
        self.backward_opened = 0.0
        self.backward_s = 0.0
        self.anchored = False
        self.input_paid = False  # an I pass slept its share of this call's backward

    def anchor(self, param: torch.Tensor) -> torch.Tensor:
        """``param`` through an identity whose backward closes the backward window."""
        if not (param.requires_grad and torch.is_grad_enabled()):
            return param
        self.anchored = True
        return _on_backward(param, self._close_backward)

    def wait_forward(self, forward_s: float) -> None:
        """Sleep out the rest of the forward window."""
        sleep_window(self.opened, forward_s)

    def close(self, y: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:
        """Sleep out the forward window; ``y``'s gradient opens a ``backward_s`` window."""
        self.backward_s = backward_s
        if backward_s > 0 and y.requires_grad and torch.is_grad_enabled():
            y = _on_backward(y, self._open_backward)
        self.wait_forward(forward_s)
        return y

    def _open_backward(self) -> None:
        """The gradient reached the output: the window opens (slept whole if nothing anchored).

        In a split backward's I pass the anchor is not reached: I's share is slept here.
        """
        self.backward_opened = time.perf_counter()
        phase = backward_phase()
        if phase == "I":
            self.input_paid = True
            owe_window(self.backward_opened, (1.0 - W_SHARE) * self.backward_s)
        elif not self.anchored:
            sleep_window(self.backward_opened, self._share(phase))

    def _close_backward(self) -> None:
        """The anchored parameter's gradient is done: sleep out the backward window."""
        sleep_window(self.backward_opened, self._share(backward_phase()))

    def _share(self, phase: str | None) -> float:
        """The backward time of a full backward (None) or of its W pass: the whole backward
        if no I pass went through this call (torch's first stage skips I when its input needs
        no gradient, and its W then computes the activation gradients too)."""
        return W_SHARE * self.backward_s if phase == "W" and self.input_paid else self.backward_s


class _OnBackward(torch.autograd.Function):
    """Identity that calls ``hook()`` when the gradient passes through it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, hook: Callable[[], None]) -> torch.Tensor:
        ctx.hook = hook
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.hook()
        return grad, None


def _on_backward(x: torch.Tensor, hook: Callable[[], None]) -> torch.Tensor:
    """``x`` through an ``_OnBackward`` identity."""
    out: torch.Tensor = _OnBackward.apply(x, hook)  # type: ignore[no-untyped-call]
    return out


class Emulated(nn.Module):
    """Base of emulated-kernel modules: duration affine in the batch size, times a slowdown."""

    def __init__(
        self,
        forward_s: float,
        backward_s: float | None = None,
        per_sample_s: float = 0.0,
        slowdown: float = 1.0,
    ) -> None:
        super().__init__()
        self.forward_s = forward_s
        self.backward_s = BACKWARD_RATIO * forward_s if backward_s is None else backward_s
        self.per_sample_s = per_sample_s
        self.slowdown = slowdown

    def durations(self, batch: int) -> tuple[float, float]:
        """Emulated (forward, backward) seconds for a micro-batch of ``batch`` samples."""
        extra = self.per_sample_s * batch
        ratio = self.backward_s / self.forward_s if self.forward_s > 0 else BACKWARD_RATIO
        return (
            self.slowdown * (self.forward_s + extra),
            self.slowdown * (self.backward_s + ratio * extra),
        )

    def timed(self, window: Window, y: torch.Tensor, batch: int) -> torch.Tensor:
        """``y`` once the forward window of a ``batch``-sample call is out; backward's set up."""
        return window.close(y, *self.durations(batch))


class EmulatedLayer(Emulated):
    """Linear(width, width) + tanh whose forward/backward take emulated accelerator time."""

    def __init__(
        self,
        width: int,
        forward_s: float,
        backward_s: float | None = None,
        per_sample_s: float = 0.0,
        slowdown: float = 1.0,
    ) -> None:
        super().__init__(forward_s, backward_s, per_sample_s, slowdown)
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Real math inside the emulated kernel's window."""
        fwd, bwd = self.durations(x.shape[0])
        if (fwd, bwd) == (0.0, 0.0):
            return torch.tanh(self.linear(x))
        window = Window()
        weight = window.anchor(self.linear.weight)
        return window.close(torch.tanh(nn.functional.linear(x, weight, self.linear.bias)), fwd, bwd)


class EmulatedFFN(Emulated):
    """Residual feed-forward block x + W2 gelu(W1 x) (width -> hidden -> width), emulated time.

    Unlike EmulatedLayer it keeps internal activations for backward (the hidden pre-activation
    and the GELU output, 2 x hidden per token against width at its boundary), as transformer
    blocks do: the layer activation checkpointing pays off on. The forward window is slept out
    before ``fc2`` packs the last tensor backward needs, so a checkpointed block's recomputation
    (which stops once those tensors exist) pays it again, as on a real device.
    """

    def __init__(
        self,
        width: int,
        hidden: int,
        forward_s: float,
        backward_s: float | None = None,
        per_sample_s: float = 0.0,
        slowdown: float = 1.0,
    ) -> None:
        super().__init__(forward_s, backward_s, per_sample_s, slowdown)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Real math inside the emulated kernel's window (see the class docstring)."""
        fwd, bwd = self.durations(x.shape[0])
        if (fwd, bwd) == (0.0, 0.0):
            plain: torch.Tensor = x + self.fc2(nn.functional.gelu(self.fc1(x)))
            return plain
        window = Window()
        weight = window.anchor(self.fc1.weight)
        hidden = nn.functional.gelu(nn.functional.linear(x, weight, self.fc1.bias))
        window.wait_forward(fwd)
        return window.close(x + self.fc2(hidden), 0.0, bwd)


def emulated_mlp(
    layers: int,
    width: int,
    forward_s: float,
    backward_s: float | None = None,
    per_sample_s: float = 0.0,
) -> nn.Sequential:
    """An nn.Sequential of ``layers`` EmulatedLayers."""
    return nn.Sequential(
        *(EmulatedLayer(width, forward_s, backward_s, per_sample_s) for _ in range(layers))
    )


def set_slowdown(modules: Iterable[nn.Module], factor: float) -> None:
    """Set ``slowdown`` on every emulated module among ``modules`` (e.g. a slow device's)."""
    for mod in modules:
        if isinstance(mod, Emulated):
            mod.slowdown = factor
