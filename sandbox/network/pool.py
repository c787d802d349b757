"""The node's sandbox networks: namespaces made ahead in a pool, handed to sandboxes, their
egress policy set and changed, removed when the sandbox goes, and nothing left behind.

A slot N is a namespace (``PREFIX``N), its veth pair (``cfhN`` in the node's namespace), its
tap and its chain ``sN`` at the gateway.  Making one takes two ``ip`` processes and a few
netlink calls, ~40 ms; a create takes a ready one (~1 ms: open its tap in a thread that
entered the namespace), and a background thread makes the next once that create is past its
first steps (``SETTLE``).  A slot is never reused:
a sandbox's namespace (its conntrack entries, its ARP cache) dies with it.

What a restarted service must know is in ``STATE/network/ID.json`` (the slot and the
policy, 0600); namespaces, veths and chains that no record names are removed at start.
The namespace names carry a tag of the state directory, so two services on one machine
(a test's and the node's) never touch each other's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cubefs.errors import CubefsError, NotFoundError, UsageError
from sandbox.config import private_dir
from sandbox.network import gateway, netns
from sandbox.network.accounting import Accounting
from sandbox.network.flowlog import Flow, FlowLog
from sandbox.network.nft import Nft, NftError, run_once
from sandbox.network.policy import Policy
from sandbox.network.protect import RESCAN, Protected
from sandbox.network.resolver import Resolver, listen_here, upstreams_from
from vmm.machine import Netdev

log = logging.getLogger("cubefs.sandbox.network")

DEFAULT_POOL = 4
# Seconds the pool waits after a sandbox took a network before making the next, while one is
# still ready: the taking is a create's (or the refill of the sandbox pool that a pooled create
# started), and a namespace made at once ran beside that create's first agent requests
# (``_fill``, docs/benchmarks.md issue 17)
SETTLE = 0.5


class Networks:
    """The node's sandbox networks (one per service)."""

    def __init__(self, state: Path, pool_size: int = DEFAULT_POOL, dns_upstream: list[str] | None = None,
                 max_conns: int = gateway.MAX_CONNS, protected: Protected | None = None) -> None:
        if max_conns < 1:
            raise UsageError(f"--max-connections {max_conns}: give at least 1")
        self.max_conns = max_conns  # a sandbox's concurrent connections at the gateway (``gateway.sandbox_chain``)
        self.upstreams = upstreams_from(dns_upstream)  # the resolver's (resolver.py): a bad one refused now
        self._resolver: Resolver | None = None
        self.protected = protected if protected is not None else Protected()  # refused to all (protect.py)
        self.dir = state / "network"
        self.prefix = "cf" + hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:6] + "-"
        self.pool_size = pool_size
        self.ready: list[int] = []
        self.slots: dict[str, int] = {}  # sandbox -> slot
        self.policies: dict[str, Policy | None] = {}  # sandbox -> its policy (None: not handed out)
        self.making: set[int] = set()
        self.flows: Counter[tuple[str, str]] = Counter()  # (live sandbox, verdict) -> connections
        self.totals: Counter[str] = Counter()  # verdict -> connections of every sandbox ever (monotonic)
        self.made = 0
        self._taken = 0.0  # when a sandbox last took a ready network (monotonic): the filler settles
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._nft: Nft | None = None
        self._filler: threading.Thread | None = None
        self._rescanner: threading.Thread | None = None
        self._flowlog: FlowLog | None = None
        self._accounting: Accounting | None = None  # bytes per connection (accounting.py)

    # -- life --------------------------------------------------------------------------
    def start(self, sandboxes: set[str]) -> None:
        """Set up the gateway, keep the networks of ``sandboxes`` (those with a record), remove
        everything else of ours, start the pool."""
        netns.write_sysctl("net.ipv4.ip_forward", "1")
        self._nft = Nft()
        self._nft.run(gateway.node_table())
        nft = self._nft
        self.protected.start(lambda networks: nft.run(gateway.protected_elements(networks)))
        if not self.upstreams:
            log.warning("sandbox DNS: no upstream (no nameserver in /etc/resolv.conf, no --dns-upstream): "
                        "every name fails")
        self._resolver = Resolver(self.upstreams, self._dns_lookup, self._dns_admit)
        private_dir(self.dir)
        chains = set(self._chains())
        for path in sorted(self.dir.glob("*.json")):
            sid = path.stem
            try:
                doc = json.loads(path.read_text())
                slot = int(doc["slot"])
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
                continue
            self.slots[sid] = slot
            if sid not in sandboxes or not netns.exists(self.ns(slot)):
                self.release(sid)
                continue
            policy = Policy.from_dict(doc["policy"]) if doc.get("policy") is not None else None
            self.policies[sid] = policy
            # made anew from the record (written after every change): an adopted sandbox of an
            # older service gets today's rules (the protected set, the metadata addresses)
            self._nft.run(gateway.sandbox_chain(slot, policy, max_conns=self.max_conns))
            if policy is not None:
                self._resolver.deny_names(slot, policy.names()[1])
            self._resolver.add(slot, netns.in_netns(self.ns(slot), lambda s=slot: _dns_inside(s)))
        kept = set(self.slots.values())
        for name in netns.names(self.prefix):
            tail = name[len(self.prefix):]
            if not tail.isdigit() or int(tail) not in kept:
                log.info("network namespace %s: no sandbox has it: removed", name)
                netns.remove(name)
        for slot in chains:
            if slot not in kept:
                self._nft_quiet(gateway.remove_chain(slot))
        try:
            self._flowlog = FlowLog(gateway.LOG_GROUP, self._on_flow)
        except OSError as err:
            log.warning("sandbox connections are not logged: %s", err)
        try:
            self._accounting = Accounting(self._sandbox_of, lambda: bool(self.slots))
        except OSError as err:
            log.warning("sandbox connections' bytes are not counted: %s", err)
        self._filler = threading.Thread(target=self._fill, name="netns pool", daemon=True)
        self._filler.start()
        self._rescanner = threading.Thread(target=self._rescan, name="netns protect", daemon=True)
        self._rescanner.start()
        log.info("sandbox networks: gateway table inet %s, %d in use, a pool of %d", gateway.TABLE,
                 len(self.slots), self.pool_size)

    def close(self) -> None:
        """Stop the pool and remove its namespaces; sandboxes keep theirs (a restarted service
        adopts them)."""
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._filler is not None:
            self._filler.join(30)
        if self._rescanner is not None:
            self._rescanner.join(30)
        with self._lock:
            ready, self.ready = self.ready, []
        for slot in ready:
            self._remove(slot)
        if self._flowlog is not None:
            self._flowlog.close()
        if self._accounting is not None:
            self._accounting.close()
        if self._resolver is not None:
            self._resolver.close()
        if self._nft is not None:
            if not self.slots:  # no sandbox keeps a chain in it: the node is left as it was
                self._nft_quiet(f"delete table inet {gateway.TABLE}")
            self._nft.close()

    # -- sandboxes ----------------------------------------------------------------------
    def ns(self, slot: int) -> str:
        return f"{self.prefix}{slot}"

    def attach(self, sandbox_id: str) -> Netdev:
        """A tap of the sandbox's namespace for its QEMU (given one from the pool first if it
        has none; nothing goes out until ``set_policy``).  The caller closes the fd once QEMU
        has started (``close_fds``)."""
        with self._lock:
            slot = self.slots.get(sandbox_id)
            if slot is None and self.ready:
                slot = self.ready.pop(0)
                self.slots[sandbox_id] = slot
                self._taken = time.monotonic()
            self._wake.notify_all()
        if slot is None:  # the pool is empty: made now
            slot = self._new_slot()
            with self._lock:
                self.slots[sandbox_id] = slot
            try:
                self._make(slot)
            except BaseException:
                with self._lock:
                    self.slots.pop(sandbox_id, None)
                raise
        self._save(sandbox_id, slot, self.policies.setdefault(sandbox_id, None))
        fd = netns.in_netns(self.ns(slot), lambda: netns.open_tap("tap0"))
        return Netdev(f"tap,fd={fd}", (fd,))

    @staticmethod
    def close_fds(netdev: Netdev | None) -> None:
        for fd in netdev.fds if netdev is not None else ():
            with contextlib.suppress(OSError):
                os.close(fd)

    def set_policy(self, sandbox_id: str, policy: Policy) -> None:
        """The sandbox's egress policy from now on (new connections; open ones go on)."""
        slot = self.slots.get(sandbox_id)
        if slot is None or self._nft is None:
            raise NotFoundError(f"sandbox {sandbox_id!r} has no network")
        old = self.policies.get(sandbox_id)
        renamed = old is not None and old.names() != policy.names()  # the sets' addresses came from old names
        # the policy swapped first, and the resolver's generation of the slot moved on while
        # the sets are emptied: a query judged under the old policy adds nothing after
        changing = self._resolver.changing(slot) if self._resolver is not None else contextlib.nullcontext()
        with changing:
            self.policies[sandbox_id] = policy
            try:
                self._nft.run(gateway.sandbox_chain(slot, policy, flush_sets=renamed, max_conns=self.max_conns))
            except BaseException:
                self.policies[sandbox_id] = old
                raise
        if self._resolver is not None:
            self._resolver.deny_names(slot, policy.names()[1])
        self._save(sandbox_id, slot, policy)
        log.info("sandbox %s: egress policy: internet %s, allow %s, deny %s", sandbox_id,
                 "yes" if policy.internet else "no", policy.allow_out or "-", policy.deny_out or "-")

    def policy(self, sandbox_id: str) -> Policy | None:
        return self.policies.get(sandbox_id)

    def address(self, sandbox_id: str) -> str | None:
        """The sandbox's own address on the node (its connections come from it)."""
        slot = self.slots.get(sandbox_id)
        return None if slot is None else gateway.addresses(slot)[1]

    def release(self, sandbox_id: str) -> None:
        """Remove the sandbox's network (nothing if it has none)."""
        if self._accounting is not None and (own := self.address(sandbox_id)) is not None:
            self._accounting.flush(sandbox_id, own)  # its open connections logged, their entries gone
        with self._lock:
            slot = self.slots.pop(sandbox_id, None)
            self.policies.pop(sandbox_id, None)
        if slot is not None:
            self._remove(slot)
        (self.dir / f"{sandbox_id}.json").unlink(missing_ok=True)
        for verdict in ("allowed", "refused"):
            self.flows.pop((sandbox_id, verdict), None)
        if self._accounting is not None:  # what came in between (a late refused packet's line): dropped too
            self._accounting.forget(sandbox_id)

    # -- the pool ----------------------------------------------------------------------
    def _fill(self) -> None:
        """Keep ``pool_size`` networks ready; the next one made ``SETTLE`` s after the last was
        taken while another is still ready (an empty pool is refilled at once: a create would
        make its network itself).

        Why: what a network added to a pooled create (~+6.5 ms p50, all of it after the guest's
        ``cont``) was this refill.  The create's VM-pool refill takes a network the moment the
        create starts, and the next namespace was made at once (two ``ip`` processes, a kernel
        namespace, its rules, the gateway's chain: 20-90 ms wall), in the same milliseconds as
        the create's ``cont``, ``freshen`` and ``set_defaults``.  Timed with schedstat in those
        steps (20 creates each): the service's CPU 12.7 ms with the make at once, 9.1 with it
        held back (7.7 without a network), its threads' run-queue wait 30.5 / 22.8 ms (16.8),
        the guest's QEMU 35.2 / 30.6 ms of CPU (28.8).  The guest is not slower with a tap: VMs
        restored with and without one, paused and continued with no service (30 each), used
        33.1 / 31.1 ms of CPU from ``cont`` to the second agent answer, and no packet crossed
        the NIC then (tools/bench/sandbox_network.py ``--parts resume``; docs/benchmarks.md)."""
        while True:
            with self._lock:
                while not self._stop:
                    if len(self.ready) + len(self.making) >= self.pool_size:
                        self._wake.wait(5)
                        continue
                    settle = self._taken + SETTLE - time.monotonic()
                    if self.ready and settle > 0:
                        self._wake.wait(settle)
                        continue
                    break
                if self._stop:
                    return
            slot = self._new_slot()
            try:
                self._make(slot)
            except CubefsError as err:
                log.warning("network pool: %s", err)
                with self._lock:
                    self.making.discard(slot)
                    self._wake.wait(5)
                continue
            with self._lock:
                self.making.discard(slot)
                if self._stop:
                    stop = True
                else:
                    stop = False
                    self.ready.append(slot)
            if stop:
                self._remove(slot)

    def _rescan(self) -> None:
        """The templates' store endpoints looked at again every ``RESCAN`` seconds."""
        while True:
            with self._lock:
                self._wake.wait_for(lambda: self._stop, RESCAN)
                if self._stop:
                    return
            try:
                self.protected.rescan()
            except CubefsError as err:
                log.warning("sandbox networks: the protected set: %s", err)

    def _new_slot(self) -> int:
        with self._lock:
            used = set(self.slots.values()) | set(self.ready) | self.making
            slot = next((s for s in range(self._next, gateway.MAX_SLOTS) if s not in used), None)
            if slot is None:
                slot = next((s for s in range(gateway.MAX_SLOTS) if s not in used), None)
            if slot is None:
                raise CubefsError(f"all {gateway.MAX_SLOTS} sandbox networks are in use")
            self._next = (slot + 1) % gateway.MAX_SLOTS  # not reused soon: a late packet of the last owner
            self.making.add(slot)
            return slot

    _next = 0

    def _make(self, slot: int) -> None:
        """Namespace, veth pair, tap, the namespace's rules, the gateway's chain (nothing out)."""
        ns, veth = self.ns(slot), f"{gateway.NODE_VETH}{slot}"
        node_end, own = gateway.addresses(slot)
        try:
            netns.ip(batch=f"netns add {ns}\nlink add {veth} type veth peer name veth0 netns {ns}\n"
                           f"addr add {node_end}/30 dev {veth}\nlink set {veth} up\n")
            netns.ip(netns=ns, batch=f"link set lo up\naddr add {own}/30 dev veth0\nlink set veth0 up\n"
                                     f"route add default via {node_end}\n"
                                     "tuntap add dev tap0 mode tap multi_queue vnet_hdr\n"
                                     # the gateway's MAC is the same in every namespace too: a guest
                                     # restored from a snapshot into another namespace keeps its ARP cache
                                     f"link set tap0 address {gateway.GATEWAY_MAC}\n"
                                     f"addr add {gateway.GATEWAY_IP}/30 dev tap0\nlink set tap0 up\n")

            def inside() -> Any:
                netns.write_sysctl("net.ipv4.ip_forward", "1")
                netns.write_sysctl("net.ipv6.conf.all.disable_ipv6", "1")
                return _dns_inside(slot)

            socks = netns.in_netns(ns, inside)
            if self._resolver is not None:
                self._resolver.add(slot, socks)
            else:
                for s in socks:
                    s.close()
            assert self._nft is not None
            self._nft.run(gateway.sandbox_chain(slot, None))
        except BaseException:
            self._remove(slot)
            raise
        self.made += 1

    def _remove(self, slot: int) -> None:
        if self._resolver is not None:
            self._resolver.remove(slot)
        self._nft_quiet(gateway.remove_chain(slot))
        try:
            netns.remove(self.ns(slot))
        except CubefsError as err:
            log.warning("removing network namespace %s: %s", self.ns(slot), err)
        if Path(f"/sys/class/net/{gateway.NODE_VETH}{slot}").exists():  # its namespace was never made
            with contextlib.suppress(CubefsError):
                netns.ip("link", "del", f"{gateway.NODE_VETH}{slot}")

    def _nft_quiet(self, commands: str) -> None:
        if self._nft is not None:
            with contextlib.suppress(NftError):
                self._nft.run(commands)

    def _chains(self) -> list[int]:
        assert self._nft is not None
        out = self._nft.run(f"list table inet {gateway.TABLE}")
        return [int(m) for m in re.findall(r"^\s*chain s(\d+) \{", out, re.M)]

    def _save(self, sandbox_id: str, slot: int, policy: Policy | None) -> None:
        """The record, replaced atomically but not fsynced: an fsync here was most of a policy
        change (~3-10 ms on this disk, on every create), and what it would protect is only
        needed after a crash of the machine, which takes the sandboxes with it.  A restarted
        service keeps the kernel's chain when there is one."""
        self.policies[sandbox_id] = policy
        path = self.dir / f"{sandbox_id}.json"
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"slot": slot, "policy": policy.to_dict() if policy else None}) + "\n")
        os.replace(tmp, path)

    # -- connections --------------------------------------------------------------------
    def _on_flow(self, flow: Flow) -> None:
        slot, verdict, proto, dest, port = flow
        sid = next((s for s, n in list(self.slots.items()) if n == slot), None)
        if sid is None:
            return
        self.flows[(sid, verdict)] += 1
        self.totals[verdict] += 1
        if self._accounting is None:
            log.info("sandbox %s: connection %s %s:%d %s", sid, proto, dest, port, verdict)
        elif verdict == "refused":
            self._accounting.refused(sid, proto, dest, port)
        else:  # logged with its bytes when it ends
            log.debug("sandbox %s: connection %s %s:%d %s", sid, proto, dest, port, verdict)

    def _sandbox_of(self, slot: int) -> str | None:
        return next((s for s, n in list(self.slots.items()) if n == slot), None)

    def traffic(self, sandbox_id: str) -> dict[str, Any]:
        """The sandbox's connections and bytes so far (``GET /sandboxes/ID/network``)."""
        if sandbox_id not in self.slots:
            raise NotFoundError(f"sandbox {sandbox_id!r} has no network")
        doc = self._accounting.record(sandbox_id) if self._accounting is not None else {}
        return {"connections": {v: self.flows[(sandbox_id, v)] for v in ("allowed", "refused")}, **doc}

    def metrics(self) -> list[str]:
        lines = ["# TYPE cubefs_sandbox_networks_ready gauge", f"cubefs_sandbox_networks_ready {len(self.ready)}",
                 "# TYPE cubefs_sandbox_networks_in_use gauge", f"cubefs_sandbox_networks_in_use {len(self.slots)}",
                 "# TYPE cubefs_sandbox_networks_made_total counter", f"cubefs_sandbox_networks_made_total {self.made}",
                 "# TYPE cubefs_sandbox_egress_connections_total counter"]
        for (sid, verdict), n in sorted(self.flows.items()):
            lines.append(f'cubefs_sandbox_egress_connections_total{{sandbox="{sid}",verdict="{verdict}"}} {n}')
        lines.append("# TYPE cubefs_egress_connections_total counter")
        lines += [f'cubefs_egress_connections_total{{verdict="{v}"}} {self.totals[v]}' for v in ("allowed", "refused")]
        if self._accounting is not None:
            lines += self._accounting.metrics()
        if self._resolver is not None:
            lines += self._resolver.metrics()
        return lines

    def _dns_lookup(self, slot: int) -> tuple[str, Policy | None] | None:
        """The sandbox on slot ``slot`` and its policy (for the resolver)."""
        sid = next((s for s, n in list(self.slots.items()) if n == slot), None)
        return None if sid is None else (sid, self.policies.get(sid))

    def _dns_admit(self, slot: int, which: int, addresses: dict[str, int]) -> None:
        assert self._nft is not None
        self._nft.run(gateway.set_elements(slot, which, addresses))

    def info(self) -> dict[str, Any]:
        return {"ready": len(self.ready), "in_use": len(self.slots)}


def _dns_inside(slot: int) -> Any:
    """In slot ``slot``'s namespace: its rules (made anew), the resolver's sockets."""
    run_once(gateway.namespace_rules(slot))
    return listen_here()


@contextlib.contextmanager
def nic(networks: Networks | None, sandbox_id: str) -> Any:
    """The NIC back-end for a sandbox's QEMU while it starts (None without networks); its
    file descriptor closed here afterwards (QEMU has its own copy by then)."""
    netdev = networks.attach(sandbox_id) if networks is not None else None
    try:
        yield netdev
    finally:
        Networks.close_fds(netdev)
