"""Applying decisions at a step boundary: move boundary layers (two-phase), change M or switch
the schedule.

Protocol for MoveLayers(src, dst, n), run by every rank between two steps:

1. agree: every rank states the decision and its partition; any difference is refused;
   the new plan is validated and simulated first (an invalid plan is refused everywhere);
2. transfer: ``src`` sends the layers' parameters, buffers, optimizer state and version to
   ``dst`` over their link (a JSON manifest, then one tensor per message; no pickle);
3. load: ``dst`` checks names, shapes and versions, loads into its own copy of those layers,
   and acknowledges;
4. commit: every rank states ok/failed; only if all are ok do ``src`` and ``dst`` switch
   segments (``src`` frees the layers only now) and every rank adopts the new partition.
   Otherwise everyone keeps the old plan, the error is reported, and nothing is lost.

Under an interleaved schedule ``src`` and ``dst`` are virtual stages (neighbours in model
order); the ranks holding them run the transfer and their chunks change.
"""

from __future__ import annotations

import numbers
import time
from typing import Any

import structlog
import torch

from ..core.decisions import (
    Decision,
    Keep,
    MoveLayers,
    Plan,
    SetMicrobatches,
    SetSchedule,
    apply,
    describe,
    to_dict,
)
from ..core.errors import DecisionMismatch, PipelineError, VersionMismatch
from ..core.simulator import Costs, simulate
from .comm import Header, Link, MessageKind, json_tensor, tensor_json
from .layerstate import (
    layer_name,
    load_module_state,
    module_state,
    named_params,
    optimizer_state,
)
from .local import LocalStage

MANIFEST, ACK = 0, 1
OLDER = "\0older"  # key of the arrived layers' older weight version among the carried state
log = structlog.get_logger("adaptive_pp.migration")


class MigrationAborted(PipelineError):
    """A migration failed before its commit; every rank kept the old plan."""


def apply_decision(local: LocalStage, decision: Decision) -> str | None:
    """Apply ``decision`` on every rank (all must call it alike); return the event text.

    ``local`` changes only through its methods (``set_microbatches``, ``set_schedule``,
    ``adopt_partition``), and only once every rank agreed (and, for a move, every rank voted ok).
    """
    if isinstance(decision, Keep):
        return None
    plan = local.plan
    new = apply(plan, decision)  # ValueError on every rank alike for an invalid decision
    _agree(local, decision)
    batch = local.last_batch_size
    if isinstance(decision, SetMicrobatches) and batch and batch % decision.microbatches:
        raise ValueError(
            f"cannot use M={decision.microbatches}: the batch of {batch} samples does not split "
            "into that many equal micro-batches"
        )
    # Every rank runs the same checks on the same plan: all change, or all raise alike.
    _simulate_plan(new, local.num_chunks)
    if isinstance(decision, SetMicrobatches):
        local.set_microbatches(decision.microbatches)
        log.info("microbatches.change", old=plan.microbatches, new=decision.microbatches)
        return f"set micro-batches {plan.microbatches} -> {decision.microbatches}"
    if isinstance(decision, SetSchedule):
        local.set_schedule(decision.schedule)
        log.info("schedule.change", old=plan.schedule, new=decision.schedule)
        return f"set schedule {plan.schedule} -> {decision.schedule}"
    layers = _moving_layers(plan, decision)
    log.info("migration.begin", decision=describe(decision), layers=layers, step=local.step_count)
    t0 = time.perf_counter()
    try:
        nbytes = _move(local, decision, new)
    except MigrationAborted as exc:
        log.warning("migration.abort", decision=describe(decision), error=str(exc))
        raise
    ms = (time.perf_counter() - t0) * 1e3
    log.info(
        "migration.commit",
        decision=describe(decision),
        layers=layers,
        bytes=nbytes,
        ms=round(ms, 3),
        partition=list(new.partition.bounds),
    )
    return (
        f"moved layers {layers[0]}-{layers[-1]} from stage {decision.src} to stage "
        f"{decision.dst} ({nbytes} bytes, {ms:.1f} ms); partition {plan.partition} -> "
        f"{new.partition}"
    )


def _agree(local: LocalStage, decision: Decision) -> None:
    mine = {
        "decision": to_dict(decision),
        "partition": list(local.partition.bounds),
        "m": local.microbatches,
    }
    views = local.control.all_gather(mine, "the decision agreement")
    if any(v != views[0] for v in views):
        raise DecisionMismatch(
            f"stage {local.stage}: ranks disagree on {describe(decision)}: {views}; refused",
            stage=local.stage,
        )


def _simulate_plan(plan: Plan, chunks: int = 1) -> None:
    """Run the simulator on the new plan (unit costs): a schedule that cannot run is refused.

    ``chunks``: model chunks per rank (the partition has a range per virtual stage).
    """
    from ..core.schedules import make_schedule

    s = plan.partition.num_stages // chunks
    simulate(
        make_schedule(plan.schedule, s, plan.microbatches, chunks, lead=plan.lead),
        Costs.build(s, plan.microbatches, 1.0, 2.0),
    )


def _moving_layers(plan: Plan, move: MoveLayers) -> list[int]:
    own = list(plan.partition.layers(move.src))
    return own[-move.count :] if move.dst == move.src + 1 else own[: move.count]


def _link_to(local: LocalStage, peer: int) -> Link:
    link = local.link_to(peer)
    if link is None:
        raise PipelineError(f"stage {local.stage} has no link to stage {peer}")
    return link


def _send_json(link: Link, ident: int, obj: Any, version: int) -> None:
    data = json_tensor(obj)
    link.send(
        Header(
            MessageKind.CONTROL, ident, link.round, version, -1, -1, torch.uint8, (data.numel(),)
        ),
        data,
    )


def _take_json(link: Link, ident: int, timeout: float, what: str) -> Any:
    msg = link.take(MessageKind.CONTROL, ident, timeout, what)
    return tensor_json(msg.payload)


def _move(local: LocalStage, move: MoveLayers, new: Plan) -> int:
    t_start = time.perf_counter()
    layers = _moving_layers(local.plan, move)
    names = {layer_name(i): local.blocks[i] for i in layers}
    ok, error, nbytes = True, "", 0
    carried: dict[str, dict[str, Any]] = {}
    timeout = local.recv_timeout
    # src and dst are (virtual) stages: under interleaved, chunks of neighbouring ranks (the
    # last rank's chunk c and the first's c + 1 across the wrap-around link); under ZB-V's V
    # placement, virtual stages S-1 and S are both rank S-1's: the layers stay (their modules
    # and optimizer state move from one chunk to the other in adopt_partition), nothing travels.
    src, dst = local.rank_of(move.src), local.rank_of(move.dst)
    if src == dst:
        pass
    elif local.stage == src:
        nbytes = _send_layers(local, _link_to(local, dst), names)
        reply = _take_json(_link_to(local, dst), ACK, timeout, "migration acknowledgement")
        ok, error = bool(reply["ok"]), str(reply["error"])
    elif local.stage == dst:
        link = _link_to(local, src)
        try:
            carried, nbytes = _receive_layers(local, link, names, timeout)
        except (PipelineError, KeyError, ValueError) as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"
        _send_json(link, ACK, {"ok": ok, "error": error}, local.version)
        link.flush()
    t_moved = time.perf_counter()
    votes = local.control.all_gather(
        {"ok": ok, "error": error, "bytes": nbytes}, "the migration vote"
    )
    t_voted = time.perf_counter()
    nbytes = max(int(v["bytes"]) for v in votes)
    failed = [v["error"] for v in votes if not v["ok"]]
    if failed:
        raise MigrationAborted(
            f"migration {describe(move)} aborted before commit, every stage keeps partition "
            f"{local.partition}: {failed[0]}",
            stage=local.stage,
        )
    older = carried.pop(OLDER, None)
    local.adopt_partition(new.partition, carried, older)
    log.debug(
        "migration.phases",
        stage=local.stage,
        transfer_ms=round((t_moved - t_start) * 1e3, 3),
        vote_ms=round((t_voted - t_moved) * 1e3, 3),
        commit_ms=round((time.perf_counter() - t_voted) * 1e3, 3),
    )
    return nbytes


def _send_layers(local: LocalStage, link: Link, modules: dict[str, torch.nn.Module]) -> int:
    """Manifest (names, shapes, scalar optimizer state, version), then one tensor each."""
    tensors: list[torch.Tensor] = []
    entries: list[dict[str, Any]] = []
    for name, t in module_state(modules).items():
        entries.append({"name": name, "opt": None, "tensor": len(tensors)})
        tensors.append(t)
    for pname, st in optimizer_state(local.optimizer, modules).items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                entries.append(
                    {
                        "name": pname,
                        "opt": key,
                        "tensor": len(tensors),
                        "scalar_tensor": value.dim() == 0,
                    }
                )
                tensors.append(value.detach().reshape(-1) if value.dim() == 0 else value.detach())
            elif isinstance(value, numbers.Number):
                entries.append({"name": pname, "opt": key, "tensor": None, "value": value})
            else:
                raise PipelineError(
                    f"cannot migrate optimizer state {pname}[{key!r}] of type "
                    f"{type(value).__name__}",
                    stage=local.stage,
                )
    if local.stream is not None:  # PipeDream-2BW: the older version travels too
        older = local.stream.versions.older()
        for pname in named_params(modules):
            entries.append({"name": pname, "opt": None, "older": True, "tensor": len(tensors)})
            tensors.append(older[pname])
    versions = {name: local.version for name in modules}
    _send_json(
        link,
        MANIFEST,
        {"entries": entries, "versions": versions},
        local.version,
    )
    for i, t in enumerate(tensors):
        link.send(
            Header(
                MessageKind.STATE,
                i,
                link.round,
                local.version,
                -1,
                -1,
                t.dtype,
                tuple(t.shape),
            ),
            t,
        )
    link.flush()
    return sum(t.numel() * t.element_size() for t in tensors)


def _receive_layers(
    local: LocalStage, link: Link, modules: dict[str, torch.nn.Module], timeout: float
) -> tuple[dict[str, dict[str, Any]], int]:
    manifest = _take_json(link, MANIFEST, timeout, "migration manifest")
    entries = manifest["entries"]
    count = sum(1 for e in entries if e["tensor"] is not None)
    # Take every announced tensor before any check, so a refusal leaves no stale messages.
    tensors = [
        link.take(MessageKind.STATE, i, timeout, "migrating tensor").payload for i in range(count)
    ]
    for name, version in manifest["versions"].items():
        if version != local.version:
            raise VersionMismatch(
                f"stage {local.stage} received {name} at weight version {version}, "
                f"but its own layers are at version {local.version}",
                stage=local.stage,
                layer=int(name.split(".")[1]),
            )
    for module in modules.values():
        if any(t.is_meta for t in module.state_dict().values()):
            module.to_empty(device=local.device)  # materialise the twin; loaded just below
    state = {
        e["name"]: tensors[e["tensor"]] for e in entries if e["opt"] is None and not e.get("older")
    }
    load_module_state(modules, state, f"stage {local.stage} loading migrated layers")
    carried: dict[str, dict[str, Any]] = {}
    older = {e["name"]: tensors[e["tensor"]] for e in entries if e.get("older")}
    if older:
        carried[OLDER] = older
    for e in entries:
        if e["opt"] is None:
            continue
        if e["tensor"] is None:
            value: Any = e["value"]
        else:
            value = tensors[e["tensor"]]
            if e.get("scalar_tensor"):
                value = value.reshape(())
        carried.setdefault(e["name"], {})[e["opt"]] = (
            value.to(local.device) if isinstance(value, torch.Tensor) else value
        )
    return carried, sum(t.numel() * t.element_size() for t in tensors)
