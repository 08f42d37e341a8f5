"""Checkpoints keyed by global layer names, so a run resumes on any stage count or partition.

Layout of a checkpoint directory::

    meta.json            step, version, partition, M, schedule, chunks, layers, user extras
    stage-0-of-4.pt      that rank's parameters, buffers and optimizer state, by global name
    ...                  (PipeDream-2BW, saved drained: also the version before the newest)

Under an interleaved schedule the partition has a range per virtual stage (chunks per rank x
ranks) and rank r's shard holds the virtual stages v with ``v % ranks == r`` (its chunks).

Every rank writes its shard into ``DIR.tmp``; rank 0 writes meta.json last and renames the
folder into place, so a checkpoint either exists whole or not at all.

``load`` is all or nothing: each rank reads (``weights_only=True``) the shards holding the layers
it owns under its *current* partition and checks them against its modules (layer count, saved
partition; each tensor's name, shape and dtype; optimizer state) before the ranks exchange
verdicts; then all load, or all raise a CheckpointError naming each misfit tensor and its stage.
``export_state_dict(path)`` returns the model's state under its own names (``layers.3.0.weight``
-> ``3.0.weight``; ``pre.*``, ``post.*`` kept) for ``model.load_state_dict``; no process group.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.actions import PLACEMENTS, Placement, locate
from .layerstate import (
    layer_name,
    load_module_state,
    module_state,
    named_params,
    optimizer_state,
)
from .local import LocalStage
from .versions import AsyncState, WeightVersions

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated or does not fit the model."""


def save(local: LocalStage, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint of the whole pipeline (every rank calls this); return its path."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if local.stage == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    local.control.barrier("the checkpoint start")
    modules = local.modules()
    opt = optimizer_state(local.optimizer, modules)
    shard = {
        "module": {k: v.detach().cpu().clone() for k, v in module_state(modules).items()},
        "optimizer": {
            name: {
                k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                for k, v in st.items()
            }
            for name, st in opt.items()
        },
        "hyper": _hyper(local),
    }
    if local.stream is not None:  # PipeDream-2BW (drained): the version before the newest
        shard["older"] = {
            k: v.detach().cpu().clone() for k, v in local.stream.versions.older().items()
        }
    name = f"stage-{local.stage}-of-{local.num_stages}.pt"
    torch.save(shard, tmp / name)
    local.control.barrier("the checkpoint write")
    if local.stage == 0:
        meta = {
            "format": FORMAT,
            "step": local.step_count,
            "version": local.version,
            "partition": list(local.partition.bounds),
            "microbatches": local.microbatches,
            "schedule": local.schedule.name,
            "chunks": local.num_chunks,
            "placement": local.schedule.placement,
            "num_layers": len(local.blocks),
            "shards": [f"stage-{s}-of-{local.num_stages}.pt" for s in range(local.num_stages)],
            "extra": extra or {},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        old = final.with_name(final.name + ".old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    local.control.barrier("the checkpoint commit")
    return final


def _hyper(local: LocalStage) -> dict[str, Any]:
    if local.optimizer is None or not local.optimizer.param_groups:
        return {}
    return {k: v for k, v in local.optimizer.param_groups[0].items() if k != "params"}


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint, checked (format, and a partition that fits its shards)."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {meta_path} is missing")
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{meta_path} is corrupt: {exc}") from exc
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        raise CheckpointError(f"{meta_path}: unknown checkpoint format {fmt!r}")
    if not _consistent(meta):
        raise CheckpointError(f"{meta_path} is inconsistent (step, version, partition, shards)")
    return meta


def _consistent(meta: dict[str, Any]) -> bool:
    """Whole-number step and version; a partition of num_layers with one shard per rank, of
    ``chunks`` (virtual) stages each."""
    try:
        bounds, shards = list(meta["partition"]), list(meta["shards"])
        chunks = meta.get("chunks", 1)
        numbers = [meta["step"], meta["version"], meta["num_layers"], chunks, *bounds]
        return (
            all(isinstance(v, int) for v in numbers)
            and all(isinstance(s, str) for s in shards)
            and len(bounds) == len(shards) * chunks + 1 >= 2
            and bounds[0] == 0
            and bounds[-1] == meta["num_layers"]
            and all(a < b for a, b in itertools.pairwise(bounds))
            and isinstance(meta["extra"], dict)
            and meta.get("placement", "loop") in PLACEMENTS
        )
    except (KeyError, TypeError):
        return False


def _read_shard(path: Path) -> dict[str, Any]:
    try:
        shard: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint shard {path} is missing") from exc
    except Exception as exc:  # truncated or corrupt files raise many different errors
        raise CheckpointError(f"checkpoint shard {path} is corrupt or truncated: {exc}") from exc
    if not isinstance(shard, dict) or "module" not in shard or "optimizer" not in shard:
        raise CheckpointError(f"checkpoint shard {path} does not hold stage state")
    return shard


def load(local: LocalStage, path: str | Path) -> dict[str, Any]:
    """Load a checkpoint into this rank's layers (any saved partition); return meta.json.

    Every rank calls it: all load, or all raise CheckpointError and keep their parameters,
    optimizer, version and step count.
    """
    path = Path(path)
    modules = local.modules()
    failure: Exception | None = None
    try:
        meta, module, carried, hyper, older = _read_checked(local, path, modules)
    except Exception as exc:  # whatever it is, this rank must still take part in the verdict
        failure = exc
    text = failure if isinstance(failure, CheckpointError) else repr(failure)
    found = None if failure is None else f"stage {local.stage}: {text}"
    errors = [e for e in local.control.all_gather(found, "the checkpoint check") if e is not None]
    if errors:
        raise CheckpointError(
            f"checkpoint {path} does not fit; no stage loaded it: {'; '.join(errors)}"
        ) from failure
    # No rank found a fault, so this one read and checked everything: nothing below can fail.
    load_module_state(modules, module, f"checkpoint {path}")
    local.restore(carried, hyper, meta["version"], meta["step"])
    if local.stream is not None:  # 2BW: both versions (a flushed run's: the newest twice)
        params = named_params(modules)
        both = {n: older.get(n, p.detach()) for n, p in params.items()}
        local.stream = AsyncState(WeightVersions.at(params, both, local.version, local.stage))
    return meta


def _read_checked(
    local: LocalStage, path: Path, modules: dict[str, nn.Module]
) -> tuple[
    dict[str, Any], dict[str, torch.Tensor], dict[str, Any], dict[str, Any], dict[str, torch.Tensor]
]:
    """Meta, module state, optimizer state, hyperparameters and (2BW) the older weight version
    for ``modules``, checked."""
    meta = read_meta(path)
    n, saved, now = len(local.blocks), meta["partition"], local.partition.bounds
    if meta["num_layers"] != n:
        raise CheckpointError(f"{path} holds {meta['num_layers']} layers, this model has {n}")
    ranks, here = local.num_stages, local.schedule.placement
    others = (_held(now, s, ranks, here) for s in range(ranks) if s != local.stage)
    elsewhere = set().union(*others)
    placement = meta.get("placement", "loop")
    module: dict[str, torch.Tensor] = {}
    carried: dict[str, dict[str, Any]] = {}
    hyper: dict[str, Any] = {}
    older: dict[str, torch.Tensor] = {}
    for s, name in enumerate(meta["shards"]):
        if not _held(saved, s, len(meta["shards"]), placement) & set(modules):
            continue
        shard = _read_shard(path / name)
        for key, value in shard["module"].items():
            if _top(key) in modules:
                module[key] = value
            elif _top(key) not in elsewhere:
                raise CheckpointError(f"the checkpoint holds {key}, which this model does not have")
        carried.update({k: v for k, v in shard["optimizer"].items() if _top(k) in modules})
        older.update({k: v for k, v in shard.get("older", {}).items() if _top(k) in modules})
        hyper = hyper or shard.get("hyper", {})
    _check(modules, module, carried)
    params = named_params(modules)
    for key, value in older.items():
        if key not in params or _describe(value) != _describe(params[key]):
            raise CheckpointError(f"the older weight version of {key} does not fit here")
    return meta, module, carried, hyper, older


def _held(bounds: Sequence[int], s: int, ranks: int, placement: Placement = "loop") -> set[str]:
    """Modules rank ``s`` of ``ranks`` holds under ``bounds``: the layers of its (virtual)
    stages (``v % ranks == s`` under the looping placement, see ``core.actions`` for "v"),
    "pre" on the first stage and "post" on the last."""
    last = len(bounds) - 2
    at = [locate(v, ranks, placement)[0] for v in range(last + 1)]
    ends = [name for name, v in (("pre", 0), ("post", last)) if at[v] == s]
    vs = [v for v in range(last + 1) if at[v] == s]
    return {layer_name(i) for v in vs for i in range(bounds[v], bounds[v + 1])}.union(ends)


def _check(modules: dict[str, nn.Module], module: dict[str, Any], carried: dict[str, Any]) -> None:
    """Each tensor of ``modules`` once, with its shape and dtype; optimizer state that fits."""
    expected = module_state(modules)
    for key, target in expected.items():
        if key not in module:
            raise CheckpointError(f"the checkpoint has no {key} (is it from another model?)")
        if _describe(module[key]) != _describe(target):
            raise CheckpointError(
                f"{key} is {_describe(module[key])} in the checkpoint, {_describe(target)} here"
            )
    for key in sorted(module.keys() - expected.keys())[:1]:
        raise CheckpointError(f"the checkpoint holds {key}, which this model does not have")
    params = named_params(modules)
    for name, st in carried.items():
        if name not in params or not isinstance(st, dict):
            raise CheckpointError(f"optimizer state for {name}, which is no parameter here")
        for k, v in st.items():
            if not _fits(v, params[name]):
                raise CheckpointError(
                    f"optimizer state {k!r} of {name} is {_describe(v)}, "
                    f"the parameter {_describe(params[name])}"
                )


def _fits(state: Any, param: torch.Tensor) -> bool:
    """Per-element state has the parameter's shape (Adafactor's factored state: 1 in a dim)."""
    if not isinstance(state, torch.Tensor) or state.dim() != param.dim():
        return True  # numbers, scalar tensors (step): nothing to compare
    return all(a in (b, 1) for a, b in zip(state.shape, param.shape, strict=True))


def _describe(t: Any) -> str:
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}, not a tensor"
    return f"{tuple(t.shape)} {t.dtype}".replace("torch.", "")


def export_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The whole model's state under its own names (``layers.3.w`` -> ``3.w``), from any rank."""
    path = Path(path)
    out: dict[str, torch.Tensor] = {}
    for name in read_meta(path)["shards"]:
        for key, value in _read_shard(path / name)["module"].items():
            out[key.removeprefix("layers.")] = value
    return out


def _top(key: str) -> str:
    """Module part of a global name: "layers.3.linear.weight" -> "layers.3", "pre.w" -> "pre"."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
