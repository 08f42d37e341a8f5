"""Emulation: layers whose accelerator time is a sleep (timing on CPUs), MoE routing skew,
and the demo model. Numbers measured with them say so."""

from .kernels import EmulatedLayer, emulated_mlp, set_slowdown

__all__ = ["EmulatedLayer", "emulated_mlp", "set_slowdown"]
