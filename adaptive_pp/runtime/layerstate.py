"""Per-layer state keyed by global names: parameters, buffers, optimizer state and version.

Migration and checkpoints both move layers between owners, so both use this one format:
``{"layers.5.linear.weight": tensor, ...}`` for module state, and per parameter the optimizer's
state (tensors and plain numbers) under the same global name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def layer_name(layer: int) -> str:
    """Global module name of block ``layer``."""
    return f"layers.{layer}"


def named_params(modules: Mapping[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Global parameter name -> parameter, over ``{global module name: module}``."""
    return {f"{mn}.{pn}": p for mn, mod in modules.items() for pn, p in mod.named_parameters()}


def module_state(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Global name -> tensor for every parameter and buffer (detached, shared storage)."""
    return {
        f"{mn}.{k}": v.detach() for mn, mod in modules.items() for k, v in mod.state_dict().items()
    }


def optimizer_state(
    optimizer: torch.optim.Optimizer | None, modules: Mapping[str, nn.Module]
) -> dict[str, dict[str, Any]]:
    """Global parameter name -> the optimizer's state for it (tensors and numbers)."""
    if optimizer is None:
        return {}
    return {
        name: dict(optimizer.state[p])
        for name, p in named_params(modules).items()
        if optimizer.state.get(p)
    }


def state_bytes(
    optimizer: torch.optim.Optimizer | None, modules: Mapping[str, nn.Module]
) -> dict[str, int]:
    """Global module name -> bytes a move of it ships: parameters, buffers, optimizer state."""
    opt = optimizer.state if optimizer is not None else {}
    out = {}
    for mn, mod in modules.items():
        n = sum(t.nbytes for t in mod.state_dict().values() if t.device.type != "meta")
        for p in mod.parameters():
            n += sum(v.nbytes for v in opt.get(p, {}).values() if isinstance(v, torch.Tensor))
        out[mn] = n
    return out


def load_module_state(
    modules: Mapping[str, nn.Module], state: Mapping[str, torch.Tensor], where: str
) -> None:
    """Copy ``state`` into ``modules`` in place; every key must be present with its shape."""
    for mn, mod in modules.items():
        own = mod.state_dict()
        for k, target in own.items():
            key = f"{mn}.{k}"
            if key not in state:
                raise KeyError(f"{where}: no value for {key}")
            src = state[key]
            if tuple(src.shape) != tuple(target.shape) or src.dtype != target.dtype:
                raise ValueError(
                    f"{where}: {key} has shape {tuple(src.shape)} {src.dtype}, "
                    f"the model expects {tuple(target.shape)} {target.dtype}"
                )
        with torch.no_grad():
            for k, target in own.items():
                target.copy_(state[f"{mn}.{k}"])


def rebuild_optimizer(
    factory: OptimizerFactory,
    modules: Mapping[str, nn.Module],
    old: torch.optim.Optimizer | None,
    carried: Mapping[str, dict[str, Any]],
) -> torch.optim.Optimizer | None:
    """A fresh optimizer over ``modules`` holding ``carried`` per-parameter state.

    Hyperparameters (lr after a scheduler, say) come from the old optimizer's first group.
    """
    params = named_params(modules)
    if not params:
        return None
    opt = factory(params.values())
    if old is not None and old.param_groups:
        hyper = {k: v for k, v in old.param_groups[0].items() if k != "params"}
        for group in opt.param_groups:
            group.update(hyper)
    for name, p in params.items():
        if name in carried:
            opt.state[p] = dict(carried[name])
    return opt
