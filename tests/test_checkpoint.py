"""Multi-process: a checkpoint that does not fit loads on no rank; export under model names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import checkpoint_cases as cc
import pytest
import torch
from conftest import PoolFor
from torch import nn

from adaptive_pp.runtime import checkpoint

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def saved(pools: PoolFor, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    """8 x Linear(64, 64) trained two steps on 4 stages, checkpointed; each rank's state."""
    ck = tmp_path_factory.mktemp("checkpoint") / "ck"
    return ck, pools(4).run(cc.save, str(ck), timeout=120)


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two ``cc.state`` snapshots hold equal parameters, optimizer state and step count."""
    assert a["step_count"] == b["step_count"]
    assert a["params"].keys() == b["params"].keys()
    for name, sd in a["params"].items():
        for key, tensor in sd.items():
            assert torch.equal(tensor, b["params"][name][key]), (name, key)
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for idx, st in opt_a.items():
        for key, value in st.items():
            assert torch.equal(value, opt_b[idx][key]), (idx, key)


def assert_refused_everywhere(ranks: list[dict[str, Any]], kind: str, *names: str) -> None:
    """Every rank raised the same CheckpointError naming ``names``; nothing changed; steps go on."""
    errors = [r[kind]["error"] for r in ranks]
    assert all(e is not None and e[0] == "CheckpointError" for e in errors), errors
    assert len({e[1] for e in errors}) == 1, errors
    for name in names:
        assert name in errors[0][1], (name, errors[0][1])
    for r in ranks:
        assert_same(r[kind]["before"], r[kind]["after"])
        assert r[kind]["final"]["step_count"] == 2


def test_stage2_mismatch_is_refused_on_every_rank(saved: tuple[Path, Any], pools: PoolFor) -> None:
    ck = str(saved[0])
    ranks = pools(4).run(cc.try_loads, [("width", ck), ("bias", ck)], timeout=120)
    assert_refused_everywhere(ranks, "width", "stage 2: ", "layers.4.0.weight")
    assert_refused_everywhere(ranks, "bias", "stage 2: ", "layers.5.0.bias")
    assert "stage 0" not in ranks[0]["width"]["error"][1]  # the other stages fit
    # Bit for bit the run that never tried to load: no rank moved on a version or a step.
    losses, params = cc.reference("width")
    assert all(r["width"]["loss"] == losses[1] for r in ranks)
    held = {
        f"{name.removeprefix('layers.')}.{key}": tensor
        for r in ranks
        for name, sd in r["width"]["final"]["params"].items()
        for key, tensor in sd.items()
    }
    assert held.keys() == params.keys()
    assert all(torch.equal(tensor, params[key]) for key, tensor in held.items())


def test_wholly_different_model_or_optimizer_state_is_a_checkpoint_error(
    saved: tuple[Path, list[Any]], pools: PoolFor
) -> None:
    ck, saved_ranks = saved
    ranks = pools(4).run(cc.try_loads, [("other", str(ck))], timeout=120)
    every = [f"stage {s}: " for s in range(4)] + [f"layers.{2 * s}.0.weight" for s in range(4)]
    assert_refused_everywhere(ranks, "other", *every)
    # The saved model, its checkpoint with one optimizer tensor of the wrong shape.
    bad = ck.with_name("bad-optimizer")
    bad.mkdir()
    for f in ck.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = torch.load(bad / "stage-2-of-4.pt", weights_only=True)
    shard["optimizer"]["layers.4.0.weight"]["exp_avg"] = torch.zeros(64, 32)
    torch.save(shard, bad / "stage-2-of-4.pt")
    ranks = pools(4).run(cc.try_loads, [("saved", str(bad))], str(ck), timeout=120)
    assert_refused_everywhere(ranks, "saved", "stage 2: ", "'exp_avg' of layers.4.0.weight")
    for r, saved_state in zip(ranks, saved_ranks, strict=True):  # a good load still works
        assert_same(r["saved"]["reloaded"], saved_state)


def test_export_loads_into_the_plain_model(pools: PoolFor, tmp_path: Path) -> None:
    ranks = pools(3).run(cc.train_for_export, str(tmp_path / "ck"), timeout=120)
    model = nn.Sequential(*cc.export_blocks(99))  # other values than the trained ones
    model.pre, model.post = nn.Linear(6, 6), nn.Linear(4, 4)  # named "pre.*", "post.*"
    model.load_state_dict(checkpoint.export_state_dict(tmp_path / "ck"), strict=True)
    held = {
        f"{name.removeprefix('layers.')}.{key}": tensor
        for sd_by_module in ranks
        for name, sd in sd_by_module.items()
        for key, tensor in sd.items()
    }
    assert {"0.0.weight", "4.0.bias", "pre.weight", "post.bias"} <= held.keys()
    assert held.keys() == model.state_dict().keys()
    for key, tensor in held.items():
        assert torch.equal(model.state_dict()[key], tensor), key
