"""What no sandbox reaches, whatever its policy: the cluster's own services.

``gateway.REFUSED_ALWAYS`` covers what is the same on every node (link-local, loopback, the
metadata addresses, the sandboxes' range) and the node's ``input`` drop covers this node's own
addresses; neither covers the *other* machines of the cluster, which a sandbox with the
default policy (everything out, masqueraded to the node's address) reached: with etcd at
10.0.0.5:2379 and no etcd auth, a guest could rewrite the routes and node records; the other
nodes' API, proxy and peer-cache ports, and the S3 store, answered it too.

So the gateway keeps a set of networks (``gateway.PROTECTED``) refused in every sandbox's
chain before its allow rules (an ``allowOut`` naming them opens nothing), filled from:

* ``--deny-always CIDR`` (repeatable): whatever else the operator protects (the fronts, a
  monitoring host, a management network);
* the ``--etcd`` endpoints;
* the store's S3 endpoint: ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL`` and each sandbox
  template's ``s3_endpoint`` (a template made later is seen within ``RESCAN`` seconds); no
  endpoint means AWS's public S3, which is not refused (it is the internet, and keys guard it);
* every node of the cluster: the hosts of its API, proxy and peer addresses in ``nodes/NAME``
  and ``members/NAME``, followed as members come (``node_listener``).  A node that leaves
  etcd keeps its addresses refused for the service's life: a node cut off from etcd loses its
  keys but still serves its ports.

Addresses, not names: nftables matches addresses, and a name looked up per packet could be
answered by whoever controls that DNS.  A host name is resolved when it first appears (the
service's start, a new template, a node joining) and its addresses kept; one that does not
resolve (a DNS hiccup at the start) is not taken as "no addresses" for good: it is looked up
again every ``RESCAN`` seconds, with a warning naming it each time, until it resolves (else
``--etcd http://etcd.internal:2379`` stayed reachable for the service's life).  IPv6 addresses
are skipped (a sandbox's IPv6 is dropped whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cubefs.errors import UsageError
from sandbox.network.policy import collapse

log = logging.getLogger("cubefs.sandbox.network")

RESCAN = 30.0  # seconds between looks at the templates' store endpoints
STORE_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def parse_networks(entries: Iterable[str], what: str = "--deny-always") -> list[str]:
    """``entries`` (CIDR blocks or addresses) as IPv4 networks; UsageError naming a bad one.
    IPv6 ones are accepted and left out: a sandbox has no IPv6 to reach them with."""
    out = []
    for entry in entries:
        try:
            net = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise UsageError(f"{what} {entry!r}: not a CIDR block or an IP address (names are not taken: "
                             "give addresses)") from None
        if net.version == 4:
            out.append(str(net))
    return out


def host_of(address: str) -> str | None:
    """The host of ``http(s)://HOST:PORT[/...]`` or ``HOST:PORT`` (None for ``""``)."""
    address = address.strip()
    if not address:
        return None
    try:
        return urlsplit(address if "://" in address else f"//{address}").hostname
    except ValueError:
        return None


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve(host: str) -> list[str]:
    """``host``'s IPv4 addresses as /32s (an address is itself; an unknown name: none, logged)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [f"{ip}/32"] if ip.version == 4 else []
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:  # UnicodeError: a label IDNA refuses (over 63 characters)
        log.warning("sandbox networks: cannot resolve %s to refuse it to sandboxes (tried again in %.0f s): %s",
                    host, RESCAN, err)
        return []
    return sorted({f"{info[4][0]}/32" for info in infos})


def store_endpoints(state: Path) -> list[str]:
    """The S3 endpoints the node's sandboxes' roots read: the environment's and each template's."""
    out = [os.environ[k] for k in STORE_ENV if os.environ.get(k)]
    for path in sorted((state / "templates").glob("*.json")):
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            endpoint = json.loads(path.read_text()).get("store", {}).get("s3_endpoint")
            if endpoint:
                out.append(str(endpoint))
    return out


class Protected:
    """The networks refused to every sandbox, by source; ``apply`` is called with the
    collapsed whole whenever it changes (``Networks`` puts it in the gateway's set)."""

    def __init__(self, deny_always: Iterable[str] = (), etcd: str | None = None, state: Path | None = None,
                 peer: str | None = None) -> None:
        self.static = parse_networks(deny_always)
        self.etcd_hosts = [h for h in (host_of(e) for e in (etcd or "").split(",")) if h]
        self.state = state
        self.peer = peer
        self.sources: dict[str, set[str]] = {}  # source ("deny-always", "etcd", "store", "node NAME") -> networks
        self._resolved: dict[str, list[str]] = {}  # host -> its addresses, once it has some
        self._named: dict[str, list[str]] = {}  # source -> the hosts it names (looked up again while one fails)
        self._lock = threading.Lock()
        self._applied: list[str] | None = None
        self.apply: Callable[[list[str]], None] = lambda networks: None

    def start(self, apply: Callable[[list[str]], None]) -> None:
        """The static sources (looked up now) applied before any sandbox has a policy."""
        self.apply = apply
        self.set("deny-always", self.static)
        self.set_hosts("etcd", self.etcd_hosts)
        self.set_hosts("peer", [h for h in (host_of(self.peer or ""),) if h])
        self._store()

    def _store(self) -> None:
        if self.state is not None:
            self.set_hosts("store", [h for h in map(host_of, store_endpoints(self.state)) if h])

    def rescan(self) -> None:
        """The store endpoints again (a template made since may name another), and every source
        naming a host that did not resolve yet."""
        self._store()
        with self._lock:
            failing = [(src, hosts) for src, hosts in self._named.items()
                       if src != "store" and any(h not in self._resolved for h in hosts)]
        for source, hosts in failing:
            self.set_hosts(source, hosts, keep=source.startswith("node "))

    def set_hosts(self, source: str, hosts: list[str], keep: bool = False) -> None:
        """``source``'s networks from ``hosts``' addresses (``set``'s ``keep``); the hosts are
        remembered so that one not resolving now is tried again at the next ``rescan``."""
        with self._lock:
            self._named[source] = sorted(set(hosts) | set(self._named.get(source, ()) if keep else ()))
        self.set(source, self.hosts(hosts), keep)

    def hosts(self, hosts: Iterable[str]) -> list[str]:
        """The addresses of ``hosts``; one that resolves to none is not kept (tried again next time)."""
        out: set[str] = set()
        for host in hosts:
            found = self._resolved.get(host)
            if found is None:
                found = resolve(host)
                if found or is_address(host):  # an IPv6 address has none and needs no second look
                    self._resolved[host] = found
            out.update(found)
        return sorted(out)

    def unresolved(self) -> list[str]:
        """The hosts named by some source that have no address yet (each rescan tries them again)."""
        with self._lock:
            return sorted({h for hosts in self._named.values() for h in hosts if h not in self._resolved})

    def set(self, source: str, networks: Iterable[str], keep: bool = False) -> None:
        """``source``'s networks from now on (``keep``: added to what it had, none dropped)."""
        with self._lock:
            new = set(networks)
            if keep:
                new |= self.sources.get(source, set())
            self.sources[source] = new
            whole = collapse(x for nets in self.sources.values() for x in nets)
            if whole == self._applied:
                return
            self.apply(whole)
            self._applied = whole
        log.info("sandbox networks: refused to every sandbox: %s", ", ".join(whole) or "nothing")


def node_listener(etcd: Any, node_key: Callable[[str], str], protected: Protected) -> Callable[[str, str], Any]:
    """What the node's member follower (``NodeMember.follow_members``) calls for each node that
    joins: its peer host and the API, proxy and peer hosts of its record (``nodes/NAME``, read
    then) added to ``protected``.  A failure (etcd's, nft's) raises: the follower tries again."""
    from sandbox.cluster.keys import NodeInfo

    async def add(name: str, peer: str) -> None:
        hosts = [host_of(peer)]
        kv = await etcd.get(node_key(name))
        if kv is not None:
            with contextlib.suppress(ValueError, TypeError):
                info = NodeInfo.decode(kv.value)
                hosts += [host_of(info.api), host_of(info.proxy), host_of(info.peer)]
        # lookups and nft off the loop (a large set takes ~0.1 s)
        await asyncio.to_thread(protected.set_hosts, f"node {name}", [h for h in hosts if h], True)

    return add
