"""The node's gateway: one nftables table, ``inet cubefs``, in the node's namespace, and the
small ruleset inside each sandbox's namespace.

Node side (``table inet cubefs``):

* ``forward``: a packet from a sandbox's veth (``cfhN``) to another sandbox's veth is dropped;
  otherwise it jumps to that sandbox's chain ``sN`` through the ``egress`` verdict map (the
  veth it came in on is the key: the guest cannot choose it); a veth with no entry is
  dropped.  Nothing new goes *into* a veth (only replies): ingress is the proxy's.
* ``input``: nothing from a veth reaches the node itself (API, proxy, peer port, etcd...).
* ``postrouting``: what leaves for anywhere else is masqueraded to the node's address.
* ``sN``: replies pass; a source other than the sandbox's own address is dropped (spoofing);
  link-local (169.254.0.0/16, the metadata address), loopback and the sandboxes' range are
  refused; then the policy (``policy.Policy``): allowed networks, refused networks, the
  default.  Every new connection is logged to NFLOG group ``LOG_GROUP`` with a prefix naming
  the slot and the verdict (``flowlog`` reads them).

Sandbox side (``table ip cubefs`` in its namespace): only the guest's address (169.254.0.21)
is forwarded from the tap, SNATed to the namespace's address on its veth; only replies are
forwarded back; nothing from the tap reaches the namespace itself.
"""

from __future__ import annotations

import ipaddress

from sandbox.network.policy import Policy

TABLE = "cubefs"
LOG_GROUP = 7
NODE_VETH = "cfh"  # + slot: the node's end of a sandbox's veth pair
SANDBOX_NET = ipaddress.IPv4Network("10.200.0.0/16")  # a /30 per slot: 16384 slots
MAX_SLOTS = SANDBOX_NET.num_addresses // 4
GUEST_IP, GATEWAY_IP = "169.254.0.21", "169.254.0.22"  # in every namespace, the same (guest_init.sh)
GATEWAY_MAC = "02:cf:00:00:00:02"  # tap0's, in every namespace (the guest's is vmm.machine.NIC_MAC)
REFUSED_ALWAYS = ("169.254.0.0/16", "127.0.0.0/8", "0.0.0.0/8", "224.0.0.0/3", str(SANDBOX_NET))


def addresses(slot: int) -> tuple[str, str]:
    """(the node's end, the sandbox namespace's end) of slot ``slot``'s veth pair."""
    base = int(SANDBOX_NET.network_address) + 4 * slot
    return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


def node_table() -> str:
    """The table, made if missing; its base chains' rules replaced (sandbox chains kept: a
    restarted service keeps its sandboxes' rules)."""
    v = NODE_VETH
    return f"""
add table inet {TABLE}
add map inet {TABLE} egress {{ type ifname : verdict ; }}
add chain inet {TABLE} forward {{ type filter hook forward priority filter - 5 ; policy accept ; }}
add chain inet {TABLE} input {{ type filter hook input priority filter - 5 ; policy accept ; }}
add chain inet {TABLE} postrouting {{ type nat hook postrouting priority srcnat ; policy accept ; }}
flush chain inet {TABLE} forward
flush chain inet {TABLE} input
flush chain inet {TABLE} postrouting
add rule inet {TABLE} forward iifname "{v}*" oifname "{v}*" counter drop
add rule inet {TABLE} forward iifname "{v}*" iifname vmap @egress
add rule inet {TABLE} forward iifname "{v}*" counter drop
add rule inet {TABLE} forward oifname "{v}*" ct state established,related accept
add rule inet {TABLE} forward oifname "{v}*" counter drop
add rule inet {TABLE} input iifname "{v}*" counter drop
add rule inet {TABLE} postrouting iifname "{v}*" oifname != "{v}*" masquerade
"""


def chain_name(slot: int) -> str:
    return f"s{slot}"


def sandbox_chain(slot: int, policy: Policy | None) -> str:
    """Slot ``slot``'s chain with ``policy`` (None: not handed out yet, nothing goes out),
    made or replaced in one transaction, and its entry in the verdict map."""
    _node_end, own = addresses(slot)
    c = chain_name(slot)
    veth = f"{NODE_VETH}{slot}"
    refuse = "reject with icmpx type admin-prohibited"

    def log(verdict: str) -> str:
        return f'log group {LOG_GROUP} prefix "cubefs {slot} {verdict}"'

    rules = [
        "ct state established,related accept",
        f"ip saddr != {own} counter drop",  # spoofed (the namespace SNATs the guest to {own})
        "meta nfproto ipv6 counter drop",
        f"ip daddr {{ {', '.join(REFUSED_ALWAYS)} }} {log('refused')} counter {refuse}",
    ]
    if policy is None:
        rules.append(f"counter {refuse}")
    else:
        allow, deny = policy.effective()
        if allow:
            rules.append(f"ip daddr {{ {', '.join(allow)} }} {log('allowed')} counter accept")
        if deny:
            rules.append(f"ip daddr {{ {', '.join(deny)} }} {log('refused')} counter {refuse}")
        rules.append(f"{log('allowed')} counter accept")
    body = "\n".join(f"add rule inet {TABLE} {c} {r}" for r in rules)
    return f"""
add chain inet {TABLE} {c}
flush chain inet {TABLE} {c}
{body}
add element inet {TABLE} egress {{ "{veth}" : jump {c} }}
"""


def remove_chain(slot: int) -> str:
    return f"""
delete element inet {TABLE} egress {{ "{NODE_VETH}{slot}" }}
delete chain inet {TABLE} {chain_name(slot)}
"""


def namespace_rules(slot: int) -> str:
    _node_end, own = addresses(slot)
    return f"""
add table ip {TABLE}
add chain ip {TABLE} forward {{ type filter hook forward priority filter ; policy drop ; }}
add chain ip {TABLE} input {{ type filter hook input priority filter ; policy accept ; }}
add chain ip {TABLE} postrouting {{ type nat hook postrouting priority srcnat ; policy accept ; }}
add rule ip {TABLE} forward iifname "tap0" oifname "veth0" ip saddr {GUEST_IP} accept
add rule ip {TABLE} forward iifname "veth0" oifname "tap0" ct state established,related accept
add rule ip {TABLE} input iifname "tap0" drop
add rule ip {TABLE} postrouting oifname "veth0" ip saddr {GUEST_IP} snat to {own}
"""
