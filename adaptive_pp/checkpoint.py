"""Checkpoints keyed by global layer names, so a run resumes on any stage count or partition.

Layout of a checkpoint directory::

    meta.json            step, version, partition, M, schedule, layers, user extras (controller)
    stage-0-of-4.pt      that stage's parameters, buffers and optimizer state, by global name
    ...

Every rank writes its shard into ``DIR.tmp``; rank 0 writes meta.json last and renames the
folder into place, so a checkpoint either exists whole or not at all. Loading reads the shards
with ``weights_only=True`` and takes the layers this rank owns under its *current* partition.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .comm import collective
from .layerstate import load_module_state, module_state, optimizer_state, rebuild_optimizer

if TYPE_CHECKING:
    from .pipeline import Pipeline

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated or does not fit the model."""


def save(pipe: Pipeline, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint of the whole pipeline (every rank calls this); return its path."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if pipe.stage == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    collective("checkpoint start", dist.barrier)
    modules = pipe.worker.named_segments()
    opt = optimizer_state(pipe.optimizer, modules)
    shard = {
        "module": {k: v.detach().cpu().clone() for k, v in module_state(modules).items()},
        "optimizer": {
            name: {
                k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                for k, v in st.items()
            }
            for name, st in opt.items()
        },
        "hyper": _hyper(pipe),
    }
    name = f"stage-{pipe.stage}-of-{pipe.num_stages}.pt"
    torch.save(shard, tmp / name)
    collective("checkpoint write", dist.barrier)
    if pipe.stage == 0:
        meta = {
            "format": FORMAT,
            "step": pipe.step_count,
            "version": pipe.worker.version,
            "partition": list(pipe.partition.bounds),
            "microbatches": pipe.microbatches,
            "schedule": pipe.schedule.name,
            "num_layers": len(pipe.blocks),
            "shards": [f"stage-{s}-of-{pipe.num_stages}.pt" for s in range(pipe.num_stages)],
            "extra": extra or {},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        old = final.with_name(final.name + ".old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    collective("checkpoint commit", dist.barrier)
    return final


def _hyper(pipe: Pipeline) -> dict[str, Any]:
    if pipe.optimizer is None or not pipe.optimizer.param_groups:
        return {}
    return {k: v for k, v in pipe.optimizer.param_groups[0].items() if k != "params"}


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint, checked."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {meta_path} is missing")
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{meta_path} is corrupt: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


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


def load(pipe: Pipeline, path: str | Path) -> dict[str, Any]:
    """Load a checkpoint into this rank's layers (any saved partition); return meta.json."""
    path = Path(path)
    meta = read_meta(path)
    if meta["num_layers"] != len(pipe.blocks):
        raise CheckpointError(
            f"{path} holds {meta['num_layers']} layers, this model has {len(pipe.blocks)}"
        )
    modules = pipe.worker.named_segments()
    wanted = set(modules)
    module: dict[str, torch.Tensor] = {}
    carried: dict[str, dict[str, Any]] = {}
    hyper: dict[str, Any] = {}
    for name in meta["shards"]:
        shard = _read_shard(path / name)
        mine = [k for k in shard["module"] if _top(k) in wanted]
        if not mine:
            continue
        module.update({k: shard["module"][k] for k in mine})
        carried.update({k: v for k, v in shard["optimizer"].items() if _top(k) in wanted})
        hyper = hyper or shard.get("hyper", {})
    try:
        load_module_state(modules, module, f"checkpoint {path}")
    except KeyError as exc:
        raise CheckpointError(f"{exc.args[0]} (is the checkpoint from another model?)") from exc
    device_state = {
        n: {k: (v.to(pipe.device) if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        for n, st in carried.items()
    }
    pipe.optimizer = rebuild_optimizer(pipe._factory, modules, None, device_state)
    if pipe.optimizer is not None and hyper:
        for group in pipe.optimizer.param_groups:
            group.update(hyper)
    pipe.worker.version = int(meta["version"])
    pipe.step_count = int(meta["step"])
    return meta


def _top(key: str) -> str:
    """Module part of a global name: "layers.3.linear.weight" -> "layers.3", "pre.w" -> "pre"."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
