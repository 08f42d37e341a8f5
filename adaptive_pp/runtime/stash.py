"""Activation stash accounting: bytes a stage keeps alive for backward, per micro-batch.

``StashMeter`` counts, while its ``saved_tensors_hooks`` are active, every distinct tensor
autograd saves for backward (parameters excluded), plus tensors the stage itself holds (its
segment boundaries). Distinct means one count per (storage, offset): a Linear's saved input and
the previous tanh's saved output are the same bytes. Inside a ``torch.utils.checkpoint`` region
the checkpoint's own hooks take over (the innermost hooks win), so what a checkpointed segment
would have saved is not counted: only its input, which the checkpoint keeps, is.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def storage_ptrs(modules: Iterable[nn.Module]) -> set[int]:
    """Storage addresses of the modules' parameters and buffers (not activations)."""
    return {
        t.untyped_storage().data_ptr()
        for mod in modules
        for t in (*mod.parameters(), *mod.buffers())
        if t.device.type != "meta"
    }


class StashMeter:
    """Distinct bytes of tensors saved for backward while ``hooks()`` is active."""

    def __init__(self, exclude: set[int]) -> None:
        """``exclude``: storage addresses that are not activations (parameters, buffers)."""
        self.exclude = exclude
        self.seen: set[tuple[int, int]] = set()
        self.bytes = 0

    def add(self, t: torch.Tensor) -> None:
        """Count ``t`` once (by storage and offset), unless it is a parameter's or on meta."""
        # Runs for every tensor autograd saves, on the forward's path: cheap accessors only.
        if t.is_meta:
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude:
            return
        key = (ptr, int(t.storage_offset()))
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += min(t.nbytes, storage.nbytes())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """A context in which every tensor autograd saves for backward is counted."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t
