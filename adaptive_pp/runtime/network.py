"""The network a process group spans: which interface gloo uses, and what a failure to join
means, said with the host, the rank and the fix.

Read from the environment (torchrun sets all but GLOO_SOCKET_IFNAME): RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK and GROUP_WORLD_SIZE (node rank and node count), MASTER_ADDR and
MASTER_PORT (the rendezvous store), GLOO_SOCKET_IFNAME (the interface(s) gloo binds to).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import socket
import struct
from collections.abc import MutableMapping

_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


class NetworkSetupError(RuntimeError):
    """This rank could not join the process group; the message names the host, the rank,
    what failed and the fix."""


def who(env: MutableMapping[str, str] = os.environ) -> str:
    """This process as error messages name it: 'rank 1 (node 1 of 2) on host h2'."""
    node = ""
    if int(env.get("GROUP_WORLD_SIZE", "1")) > 1:
        node = f" (node {env.get('GROUP_RANK', '?')} of {env['GROUP_WORLD_SIZE']})"
    return f"rank {env.get('RANK', '?')}{node} on host {socket.gethostname()}"


def spans_hosts(env: MutableMapping[str, str] = os.environ) -> bool:
    """True when torchrun says the job has more than one node (agent)."""
    world = int(env.get("WORLD_SIZE", "1"))
    return (
        int(env.get("GROUP_WORLD_SIZE", "1")) > 1
        or int(env.get("LOCAL_WORLD_SIZE", str(world))) < world
    )


def interfaces() -> dict[str, str | None]:
    """This host's network interfaces and their IPv4 address (None: none, or not Linux)."""
    out: dict[str, str | None] = {}
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(
                    s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode())
                )
                out[name] = socket.inet_ntoa(packed[20:24])
            except OSError:
                out[name] = None
    return out


def route_source(host: str, port: int) -> str | None:
    """The local address this host sends from to reach ``host`` (no packet is sent)."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            return str(s.getsockname()[0])
    except OSError:  # gaierror included: an unknown name, no route
        return None


def prepare(env: MutableMapping[str, str] = os.environ) -> str | None:
    """Check GLOO_SOCKET_IFNAME, or set it on a job that spans hosts; return the interface.

    Unset on a multi-host job, gloo would advertise the address this host's name resolves to
    (often 127.0.0.1), which the other hosts cannot reach: the runtime sets it to the
    interface on the route to MASTER_ADDR. A name that is no interface here raises
    NetworkSetupError.
    """
    named = env.get("GLOO_SOCKET_IFNAME")
    known = interfaces()
    if named:
        missing = [n for n in named.split(",") if n not in known]
        if missing:
            raise NetworkSetupError(
                f"{who(env)}: GLOO_SOCKET_IFNAME={named} names no interface of this host "
                f"({', '.join(missing)}; it has {', '.join(known) or 'none'}). Fix: set it to "
                f"the interface the other hosts reach this one on (`ip route get "
                f"{env.get('MASTER_ADDR', 'MASTER_ADDR')}` names it), or unset it: the runtime "
                "then picks the interface on the route to MASTER_ADDR"
            )
    if not spans_hosts(env) or "MASTER_ADDR" not in env:
        return named or None
    source = route_source(env["MASTER_ADDR"], int(env.get("MASTER_PORT", "0")))
    if source is None or _is_loopback(source):
        return named or None  # every node on this host (or no route: the store step says so)
    if named:
        lo = [n for n in named.split(",") if _is_loopback(known[n] or "")]
        if lo:
            raise NetworkSetupError(
                f"{who(env)}: GLOO_SOCKET_IFNAME={named} includes the loopback interface "
                f"({', '.join(lo)}), which the other hosts of this job cannot reach. Fix: set "
                f"it to the interface on the route to MASTER_ADDR (here: "
                f"{_name_of(source, known) or source}), or unset it"
            )
        return named
    name = _name_of(source, known)
    if name is not None:
        env["GLOO_SOCKET_IFNAME"] = name
    return name


def probe_store(timeout_s: float, env: MutableMapping[str, str] = os.environ) -> None:
    """Under torchrun (its agent serves the store before the workers start): a store address
    that refuses connections raises NetworkSetupError now, not after the store's retries."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in env:
        return
    try:
        socket.create_connection(
            (env["MASTER_ADDR"], int(env["MASTER_PORT"])), min(timeout_s, 5)
        ).close()
    except ConnectionRefusedError as exc:
        raise explain(exc, "store", timeout_s, env) from exc
    except (OSError, ValueError, KeyError):
        return  # slow, unknown or no route: the store's own attempt reports it


def explain(
    exc: BaseException, phase: str, timeout_s: float, env: MutableMapping[str, str] = os.environ
) -> NetworkSetupError:
    """``exc`` (raised joining the rendezvous store, ``phase`` "store", or connecting gloo's
    pairs, "group") as a NetworkSetupError naming this host and rank, the cause and the fix."""
    text = str(exc).strip()
    raw = text.splitlines()[0] if text else type(exc).__name__
    addr, port = env.get("MASTER_ADDR", "?"), env.get("MASTER_PORT", "?")
    try:
        ip: str | None = str(socket.getaddrinfo(addr, None)[0][4][0])
    except OSError:
        ip = None
    peer = re.search(r"remote=\[([^\]]+)\]", text)
    if ip is not None and _is_loopback(ip) and spans_hosts(env):
        fix = (
            f"MASTER_ADDR={addr} is this host's loopback ({ip}) but the job spans "
            f"{env.get('GROUP_WORLD_SIZE', 'several')} nodes, so the other hosts cannot reach "
            "it: with --rdzv-backend c10d node 0's torchrun hands out its host name unless "
            "given --local-addr ADDRESS_OF_NODE_0; pass that (or use the static rendezvous: "
            "--master-addr ADDRESS_OF_NODE_0 --node-rank R on every host)"
        )
    elif phase == "store" and ip is None:
        fix = (
            f"{addr} does not resolve on this host: give torchrun the address of node 0 "
            "(--master-addr, or --rdzv-endpoint)"
        )
    elif phase == "store":
        fix = (
            f"nothing answered at {ip}:{port} within {timeout_s:g} s: check that node 0's "
            "torchrun runs with the same endpoint, that the port is open between the hosts "
            f"and that {ip} is reachable from here (`ip route get {ip}`)"
        )
    elif peer is not None and _is_loopback(peer.group(1)) and spans_hosts(env):
        fix = (
            f"a peer advertised the loopback address {peer.group(1)}: on a multi-host job "
            "every host must give gloo an interface the others reach. Set GLOO_SOCKET_IFNAME "
            "to it on every host (`ip route get MASTER_ADDR` names it; unset, the runtime "
            "picks the interface on the route to MASTER_ADDR)"
        )
    else:
        iface = env.get("GLOO_SOCKET_IFNAME") or "the address of its host name"
        late = "timed out" in text.lower() or "timeout" in text.lower()
        fix = (
            (f"not every rank connected within {timeout_s:g} s. " if late else "")
            + "Start the same torchrun command (--nnodes, --nproc-per-node, endpoint) on every "
            "host, set GLOO_SOCKET_IFNAME on each to an interface on the network the hosts "
            f"share (this rank uses {iface}) and let TCP through between them; a rank that "
            "failed on another host says why there"
        )
    what = (
        f"reach the rendezvous store at MASTER_ADDR:MASTER_PORT = {addr}:{port}"
        if phase == "store"
        else "connect gloo to the other ranks"
    )
    return NetworkSetupError(f"{who(env)} could not {what}: {raw}. Fix: {fix}")


def _name_of(address: str, known: dict[str, str | None]) -> str | None:
    return next((n for n, a in known.items() if a == address), None)


def _is_loopback(text: str) -> bool:
    try:
        return ipaddress.ip_address(text.split("%")[0]).is_loopback
    except ValueError:
        return text == "localhost"
