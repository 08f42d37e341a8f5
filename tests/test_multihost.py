"""Multi-host: two torchrun agents (``--nnodes 2``) train like one process, on one machine and
in two network namespaces joined by a veth pair; network mistakes are named with the fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import runtime_cases as rc
import torch
import torchrun_train as tt

from adaptive_pp.runtime import network
from adaptive_pp.runtime.launch import free_port, launch

HERE = Path(__file__).parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def run_agents(commands: list[list[str]], timeout: float = 240) -> list[str]:
    """Start every agent command at once; wait for all; their combined output each."""
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    env.pop("GLOO_SOCKET_IFNAME", None)
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


def assert_trained_like_one_process(folder: Path) -> None:
    ranks = [torch.load(folder / f"rank-{r}.pt", weights_only=False) for r in range(2)]
    rc.assert_matches_reference(tt.CASE, ranks)


def agent(node: int, folder: Path, *rendezvous: str) -> list[str]:
    """One torchrun agent of two nodes, one stage each, running tests/torchrun_train.py."""
    head = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "0"]
    return [*head, *rendezvous, str(HERE / "torchrun_train.py"), str(folder)]


@pytest.mark.multiprocess
def test_two_agents_on_one_machine_train_like_one_process(tmp_path: Path) -> None:
    """Static rendezvous: node 0's agent serves the store at --master-addr."""
    port = str(free_port())
    run_agents(
        [
            agent(
                n,
                tmp_path,
                "--node-rank",
                str(n),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
            )
            for n in range(2)
        ]
    )
    assert_trained_like_one_process(tmp_path)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """Two network namespaces joined by a veth pair, 10.213.N.1 and .2; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to create network namespaces")
    tag, net = os.getpid() % 100_000, os.getpid() % 250
    ns, veth = (f"app{tag}a", f"app{tag}b"), (f"apv{tag}a", f"apv{tag}b")
    made: list[str] = []

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)

    try:
        for name in ns:
            try:
                ip("netns", "add", name)
            except subprocess.CalledProcessError as exc:
                pytest.skip(f"`ip netns add` is not available here: {exc.stderr.strip()}")
            made.append(name)
        ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for i, (name, dev) in enumerate(zip(ns, veth, strict=True)):
            ip("link", "set", dev, "netns", name)
            ip("-n", name, "addr", "add", f"10.213.{net}.{i + 1}/24", "dev", dev)
            ip("-n", name, "link", "set", dev, "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield ns[0], ns[1]
    finally:
        for name in made:  # deleting a namespace deletes its end of the veth pair, and the pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.mark.multiprocess
def test_two_agents_in_two_network_namespaces_train_like_one_process(
    tmp_path: Path, namespaces: tuple[str, str]
) -> None:
    """c10d rendezvous across a veth pair, as on two hosts: is_host on node 0, --local-addr on
    each, and no GLOO_SOCKET_IFNAME (the runtime picks the veth, on the route to node 0)."""
    net = os.getpid() % 250
    endpoint = f"10.213.{net}.1:29500"
    commands = []
    for n, name in enumerate(namespaces):
        rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "mh"]
        rdzv += ["--local-addr", f"10.213.{net}.{n + 1}"]
        if n == 0:
            rdzv += ["--rdzv-conf", "is_host=true"]
        commands.append(["ip", "netns", "exec", name, *agent(n, tmp_path, *rdzv)])
    run_agents(commands)
    assert_trained_like_one_process(tmp_path)


# --- what a user sees when the network is wrong (no processes) ---------------------------------


def torchrun_env(**extra: str) -> dict[str, str]:
    """A worker's environment on node 1 of 2 (one rank per node)."""
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": "1",
        "GROUP_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    return {**env, **extra}


def test_an_interface_that_is_not_there_is_named_with_the_fix() -> None:
    with pytest.raises(network.NetworkSetupError) as info:
        network.prepare(torchrun_env(GLOO_SOCKET_IFNAME="nosuch9"))
    text = str(info.value)
    assert text.startswith("rank 1 (node 1 of 2) on host ")
    assert "GLOO_SOCKET_IFNAME=nosuch9 names no interface of this host" in text
    assert "lo" in text and "ip route get 127.0.0.1" in text


def test_a_multihost_job_gets_the_interface_on_the_route_to_the_store() -> None:
    routable = {n: a for n, a in network.interfaces().items() if a and not a.startswith("127.")}
    if not routable:
        pytest.skip("this host has no IPv4 interface besides loopback")
    name, address = next(iter(routable.items()))
    env = torchrun_env(MASTER_ADDR=address)
    assert network.prepare(env) == name and env["GLOO_SOCKET_IFNAME"] == name
    with pytest.raises(network.NetworkSetupError, match="includes the loopback interface"):
        network.prepare(torchrun_env(MASTER_ADDR=address, GLOO_SOCKET_IFNAME="lo"))
    single = {**torchrun_env(MASTER_ADDR=address), "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1"}
    assert network.prepare(single) is None and "GLOO_SOCKET_IFNAME" not in single


def test_raw_store_and_gloo_errors_become_the_cause_and_the_fix() -> None:
    refused = RuntimeError("[Errno 111] Connection refused")
    text = str(network.explain(refused, "store", 30, torchrun_env(MASTER_ADDR="localhost")))
    assert "rank 1 (node 1 of 2) on host" in text
    assert (
        "could not reach the rendezvous store at MASTER_ADDR:MASTER_PORT = localhost:29500" in text
    )
    assert "loopback" in text and "--local-addr" in text
    single = {
        **torchrun_env(MASTER_ADDR="localhost"),
        "GROUP_WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "2",
    }
    text = str(network.explain(refused, "store", 30, single))
    assert "nothing answered at 127.0.0.1:29500 within 30 s" in text
    text = str(network.explain(refused, "store", 30, torchrun_env(MASTER_ADDR="nohost.invalid")))
    assert "nohost.invalid does not resolve on this host" in text
    mesh = RuntimeError(
        "Gloo connectFullMesh failed with [pair.cc:152] timed out connecting: SO_ERROR: "
        "Connection refused, remote=[127.0.0.1]:13745"
    )
    env = torchrun_env(MASTER_ADDR="10.0.0.1")
    text = str(network.explain(mesh, "group", 30, env))
    assert "could not connect gloo to the other ranks" in text
    assert "advertised the loopback address 127.0.0.1" in text and "GLOO_SOCKET_IFNAME" in text
    late = RuntimeError("wait timeout after 5000ms, keys: /adaptive_pp/0/1//0//cpu//0/1")
    text = str(network.explain(late, "group", 5, env))
    assert "not every rank connected within 5 s" in text and "same torchrun command" in text


def torchrun_variables() -> dict[str, str]:
    """Rank job: the torchrun-style variables this rank sees."""
    prefixes = ("GROUP_", "ROLE_", "TORCHELASTIC_", "MASTER_", "RANK", "WORLD_SIZE")
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes)}


@pytest.mark.multiprocess
def test_launch_inside_a_torchrun_job_runs_its_ranks_on_this_host_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A parent under torchrun (node 1 of 2, agent store, restart 1): launch's ranks must not
    wait on that store or call themselves multi-host."""
    for key, value in torchrun_env(TORCHELASTIC_USE_AGENT_STORE="True").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    (seen,) = launch(torchrun_variables, 1, timeout=60)
    assert seen["MASTER_ADDR"] == "127.0.0.1" and seen["WORLD_SIZE"] == "1"
    assert not [k for k in seen if k.startswith(("GROUP_", "TORCHELASTIC_"))], seen
