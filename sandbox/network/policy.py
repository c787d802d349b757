"""A sandbox's egress policy, as the E2B API states it.

E2B documents (``SandboxNetworkConfig`` in its API spec): ``allowOut`` and ``denyOut`` are
lists of CIDR blocks or bare IPs; "allowed entries always take precedence over denied
entries"; ``allow_internet_access=False`` "behaves the same as" ``denyOut: ["0.0.0.0/0"]``;
everything else goes out (the default).  So a destination in allowOut goes out, else one in
denyOut is refused, else it goes out.  ``PUT /sandboxes/{id}/network`` replaces the whole
policy: a field left out is cleared.  Domain names (allowOut only, in E2B) need a resolver
the gateway controls: refused here with a clear error until there is one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Any

from cubefs.errors import UsageError

ALL_TRAFFIC = "0.0.0.0/0"
MAX_ENTRIES = 1000


@dataclass
class Policy:
    allow_out: list[str] = field(default_factory=list)
    deny_out: list[str] = field(default_factory=list)
    internet: bool = True  # allow_internet_access

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
        return cls(_cidrs(network.get("allowOut"), "allowOut"), _cidrs(network.get("denyOut"), "denyOut"),
                   allow_internet_access)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Policy:
        return cls(list(doc.get("allow_out", [])), list(doc.get("deny_out", [])), bool(doc.get("internet", True)))

    def effective(self) -> tuple[list[str], list[str]]:
        """(allowed, refused) networks, each collapsed (nft refuses overlapping intervals in
        one set); allowed wins where both hold."""
        deny = self.deny_out + ([] if self.internet else [ALL_TRAFFIC])
        return _collapse(self.allow_out), _collapse(deny)

    def api(self) -> dict[str, Any]:
        """As the E2B API shows it (``SandboxDetail.network``)."""
        return {"allowOut": list(self.allow_out), "denyOut": list(self.deny_out)}


def _cidrs(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_ENTRIES:
        raise UsageError(f"network.{what} must be a list of at most {MAX_ENTRIES} CIDR blocks or IP addresses")
    out = []
    for entry in value:
        if not isinstance(entry, str):
            raise UsageError(f"network.{what}: {entry!r} is not a CIDR block or an IP address")
        try:
            net = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            if any(c.isalpha() for c in entry) and "/" not in entry:
                raise UsageError(f"network.{what}: {entry!r}: domain names are not supported yet (they need a "
                                 "resolver the gateway controls); give CIDR blocks or IP addresses") from None
            raise UsageError(f"network.{what}: {entry!r} is not a CIDR block or an IP address") from None
        if net.version != 4:
            raise UsageError(f"network.{what}: {entry!r}: sandboxes have IPv4 only")
        out.append(str(net))
    return out


def _collapse(nets: list[str]) -> list[str]:
    return [str(n) for n in ipaddress.collapse_addresses(ipaddress.IPv4Network(n) for n in nets)]
