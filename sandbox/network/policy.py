"""A sandbox's egress policy, as the E2B API states it.

E2B documents (``SandboxNetworkConfig`` in its API spec): ``allowOut`` and ``denyOut`` are
lists of CIDR blocks or bare IPs; "allowed entries always take precedence over denied
entries"; ``allow_internet_access=False`` "behaves the same as" ``denyOut: ["0.0.0.0/0"]``;
everything else goes out (the default).  So a destination in allowOut goes out, else one in
denyOut is refused, else it goes out.  ``PUT /sandboxes/{id}/network`` replaces the whole
policy: a field left out is cleared.

Domain names: E2B accepts them in allowOut, with wildcards (``*.example.com``: any name
under example.com, not example.com itself); here denyOut takes them too.  They work through
the node's resolver (``resolver``), which every guest's DNS goes to: an answer for an allowed
name puts its addresses in the sandbox's allow set before the guest sees it; a denied name
is answered REFUSED.  A name in both lists is allowed (E2B: allowed entries take precedence).
A name in neither is resolved as usual, unless the policy refuses all traffic
(``0.0.0.0/0`` denied, or no internet): then it is refused too, since such a sandbox could
reach nothing by it and its queries would be a way out (data in the names asked).

``dnsServers`` (E2B): when allowOut holds a name, all traffic to these IPv4 addresses is
allowed too.  E2B opens 8.8.8.8 when the list is left out, as its guests' resolv.conf points
there; here a guest's DNS, to whatever address, is answered by the node's resolver, so nothing
needs opening, and opening 8.8.8.8 to every port would let DNS over HTTPS or TLS past the
resolver's name policy (names are a way out: data in the names asked).  So only the servers a
create or an update lists are opened (its user's choice, say their own DoT server); none when
left out.

Refused with a clear error, never ignored (a silently ignored one would send a sandbox's
traffic out in a way its user did not ask for): ``egressProxy`` (E2B's SOCKS5 tunnel: its
open-source runtime refuses it the same way) and ``rules`` (per-domain transforms of HTTPS
requests, which need a TLS-intercepting proxy this node does not have).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from cubefs.errors import UsageError

ALL_TRAFFIC = "0.0.0.0/0"
MAX_ENTRIES = 1000
MAX_DNS_SERVERS = 10  # E2B's bound
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


@dataclass
class Policy:
    allow_out: list[str] = field(default_factory=list)
    deny_out: list[str] = field(default_factory=list)
    internet: bool = True  # allow_internet_access
    dns_servers: list[str] | None = None  # dnsServers as given; None: left out (none opened)

    @classmethod
    def from_api(cls, network: Any, allow_internet_access: Any = None) -> Policy:
        """From a create's (or an update's) ``network`` object and ``allow_internet_access``;
        UsageError (400) naming the bad entry."""
        if network is None:
            network = {}
        if not isinstance(network, dict):
            raise UsageError("network must be an object")
        if allow_internet_access is None:
            allow_internet_access = True
        if not isinstance(allow_internet_access, bool):
            raise UsageError("allow_internet_access must be true or false")
        if network.get("egressProxy") is not None:
            raise UsageError("network.egressProxy is not supported by this node: its sandboxes' traffic goes "
                             "out through the node's gateway only (leave egressProxy out)")
        if network.get("rules"):
            raise UsageError("network.rules (transforms of HTTPS requests) is not supported by this node "
                             "(leave rules out)")
        return cls(_cidrs(network.get("allowOut"), "allowOut"), _cidrs(network.get("denyOut"), "denyOut"),
                   allow_internet_access, _dns_servers(network.get("dnsServers")))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Policy:
        servers = doc.get("dns_servers")
        return cls(list(doc.get("allow_out", [])), list(doc.get("deny_out", [])), bool(doc.get("internet", True)),
                   None if servers is None else list(servers))

    def effective(self) -> tuple[list[str], list[str]]:
        """(allowed, refused) networks, each collapsed (nft refuses overlapping intervals in
        one set); allowed wins where both hold.  Names are not in them (``names``)."""
        deny = [e for e in self.deny_out if not is_name(e)] + ([] if self.internet else [ALL_TRAFFIC])
        allow = [e for e in self.allow_out if not is_name(e)]
        if len(allow) < len(self.allow_out):  # a name in allowOut: the listed DNS servers are open too
            allow += [f"{ip}/32" for ip in self.dns_servers or []]
        return collapse(allow), collapse(deny)

    def names(self) -> tuple[list[str], list[str]]:
        """(allowed, refused) domain names and wildcards."""
        return [e for e in self.allow_out if is_name(e)], [e for e in self.deny_out if is_name(e)]

    def name_match(self, name: str) -> str | None:
        """``allowed`` or ``refused`` if an entry names ``name`` (lower case, no trailing
        dot), allowOut first; None if none does."""
        allow, deny = self.names()
        if any(_matches(p, name) for p in allow):
            return "allowed"
        if any(_matches(p, name) for p in deny):
            return "refused"
        return None

    def name_verdict(self, name: str) -> str:
        """What the resolver does with a query for ``name``: ``allowed`` (its addresses go
        in the allow set), ``refused`` (REFUSED), or ``passed`` (answered; the addresses
        decide)."""
        match = self.name_match(name)
        if match is not None:
            return match
        return "refused" if ALL_TRAFFIC in self.effective()[1] else "passed"

    def api(self) -> dict[str, Any]:
        """As the E2B API shows it (``SandboxDetail.network``)."""
        doc: dict[str, Any] = {"allowOut": list(self.allow_out), "denyOut": list(self.deny_out)}
        if self.dns_servers is not None:
            doc["dnsServers"] = list(self.dns_servers)
        return doc


def _cidrs(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_ENTRIES:
        raise UsageError(f"network.{what} must be a list of at most {MAX_ENTRIES} CIDR blocks, IP addresses "
                         "or domain names")
    out = []
    for entry in value:
        if not isinstance(entry, str):
            raise UsageError(f"network.{what}: {entry!r} is not a CIDR block, an IP address or a domain name")
        try:
            net = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            name = _domain(entry)
            if name is None:
                raise UsageError(f"network.{what}: {entry!r} is not a CIDR block, an IP address or a domain "
                                 "name") from None
            out.append(name)
            continue
        if net.version != 4:
            raise UsageError(f"network.{what}: {entry!r}: sandboxes have IPv4 only")
        out.append(str(net))
    return out


def _dns_servers(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_DNS_SERVERS:
        raise UsageError(f"network.dnsServers must be a list of at most {MAX_DNS_SERVERS} IPv4 addresses")
    out = []
    for entry in value:
        try:
            if not isinstance(entry, str):
                raise ValueError(entry)
            out.append(str(ipaddress.IPv4Address(entry.strip())))
        except ValueError:
            raise UsageError(f"network.dnsServers: {entry!r} is not an IPv4 address") from None
    return out


def is_name(entry: str) -> bool:
    return any(c.isalpha() or c in "*_-" for c in entry)  # an IPv4 CIDR has none of these


def _domain(entry: str) -> str | None:
    """``entry`` as a domain name or a ``*.`` wildcard (lower case, no trailing dot), or None."""
    name = entry.strip().lower().removesuffix(".")
    body = name[2:] if name.startswith("*.") else name
    labels = body.split(".")
    if not body or len(body) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if labels[-1].isdigit():
        return None  # "1.2.3" is a bad address, not a name
    return name


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


def collapse(nets: Iterable[str]) -> list[str]:
    """IPv4 networks merged where they overlap or adjoin (one nft element each)."""
    return [str(n) for n in ipaddress.collapse_addresses(ipaddress.IPv4Network(n) for n in nets)]
