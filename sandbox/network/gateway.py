"""The node's gateway: one nftables table, ``inet cubefs``, in the node's namespace, and the
small ruleset inside each sandbox's namespace.

Node side (``table inet cubefs``):

* ``forward``: a packet from a sandbox's veth (``cfhN``) to another sandbox's veth is dropped;
  otherwise it jumps to that sandbox's chain ``sN`` through the ``egress`` verdict map (the
  veth it came in on is the key: the guest cannot choose it); a veth with no entry is
  dropped.  Nothing new goes *into* a veth (only replies): ingress is the proxy's.
* ``input``: nothing from a veth reaches the node itself (API, proxy, peer port, etcd...).
* ``postrouting``: what leaves for anywhere else is masqueraded to the node's address.
* ``ended``: a sandbox's TCP connection leaves the conntrack table 2 s after it closes (not
  the 120 s of TIME_WAIT): ``accounting`` logs it with its bytes when its entry goes.
* ``protected``: a set of networks no sandbox reaches whatever its policy: the cluster's etcd,
  its nodes (API, proxy, peer port), the store, ``--deny-always`` (``protect.Protected`` fills
  it, one transaction per change: ``protected_elements``).
* ``sN``: packets of open connections to the set ``protected`` are refused (TCP with a reset: a
  connection opened before its address was protected is cut), then replies pass; a source other
  than the sandbox's own address is dropped (spoofing); link-local (169.254.0.0/16, the metadata
  address), the other clouds' metadata addresses, loopback and the sandboxes' range are refused,
  then the set ``protected``, before any allow rule (an ``allowOut`` cannot open them); then the
  policy (``policy.Policy``): allowed networks and the set ``aN`` (the addresses of allowed
  names, put there by the resolver, each with a timeout), refused networks and the set ``dN``
  (those of denied names), the default.  Every new connection is logged to NFLOG group
  ``LOG_GROUP`` with a prefix naming the slot and the verdict (``flowlog`` reads them).

Sandbox side (``table ip cubefs`` in its namespace): only the guest's address (169.254.0.21)
is forwarded from the tap, SNATed to the namespace's address on its veth; only replies are
forwarded back; DNS from the tap to any address (UDP and TCP port 53) is DNATed to the
resolver's socket in the namespace (``GATEWAY_IP``:53), the only thing of the namespace the
guest reaches.
"""

from __future__ import annotations

import ipaddress

from sandbox.network.policy import Policy

TABLE = "cubefs"
LOG_GROUP = 7
ENDED_SECONDS = 2  # a sandbox's closed TCP connection's conntrack entry lives this long (TIME_WAIT: 120)
NODE_VETH = "cfh"  # + slot: the node's end of a sandbox's veth pair
SANDBOX_NET = ipaddress.IPv4Network("10.200.0.0/16")  # a /30 per slot: 16384 slots
MAX_SLOTS = SANDBOX_NET.num_addresses // 4
GUEST_IP, GATEWAY_IP = "169.254.0.21", "169.254.0.22"  # in every namespace, the same (guest_init.sh)
GATEWAY_MAC = "02:cf:00:00:00:02"  # tap0's, in every namespace (the guest's is vmm.machine.NIC_MAC)
MAX_CONNS = 4096  # a sandbox's concurrent connections (conntrack entries) at the gateway; more are refused
# Cloud metadata services outside 169.254/16: Alibaba's (100.100.100.200), Azure's wire server
# (168.63.129.16: the host's agent channel, DHCP and DNS), Oracle Cloud Classic's (192.0.0.192).
# AWS's IPv6 one (fd00:ec2::254) needs nothing: a sandbox's IPv6 is dropped whole.
METADATA = ("100.100.100.200/32", "168.63.129.16/32", "192.0.0.192/32")
REFUSED_ALWAYS = ("169.254.0.0/16", "127.0.0.0/8", "0.0.0.0/8", "224.0.0.0/3", str(SANDBOX_NET), *METADATA)
PROTECTED = "protected"  # the set of what the node protects (etcd, nodes, store, --deny-always)


def addresses(slot: int) -> tuple[str, str]:
    """(the node's end, the sandbox namespace's end) of slot ``slot``'s veth pair."""
    base = int(SANDBOX_NET.network_address) + 4 * slot
    return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


def node_table() -> str:
    """The table, made if missing; its base chains' rules replaced (sandbox chains kept: a
    restarted service keeps its sandboxes' rules)."""
    v = NODE_VETH
    ended = f"time_wait : {ENDED_SECONDS}, close : {ENDED_SECONDS}"
    return f"""
add table inet {TABLE}
add map inet {TABLE} egress {{ type ifname : verdict ; }}
add set inet {TABLE} {PROTECTED} {{ type ipv4_addr ; flags interval ; }}
add chain inet {TABLE} forward {{ type filter hook forward priority filter - 5 ; policy accept ; }}
add chain inet {TABLE} input {{ type filter hook input priority filter - 5 ; policy accept ; }}
add chain inet {TABLE} postrouting {{ type nat hook postrouting priority srcnat ; policy accept ; }}
flush chain inet {TABLE} forward
flush chain inet {TABLE} input
flush chain inet {TABLE} postrouting
add rule inet {TABLE} forward iifname "{v}*" oifname "{v}*" counter drop
add ct timeout inet {TABLE} ended {{ protocol tcp ; l3proto ip ; policy = {{ {ended} }} ; }}
add rule inet {TABLE} forward iifname "{v}*" ct state new ct timeout set "ended"
add rule inet {TABLE} forward iifname "{v}*" iifname vmap @egress
add rule inet {TABLE} forward iifname "{v}*" counter drop
add rule inet {TABLE} forward oifname "{v}*" ct state established,related accept
add rule inet {TABLE} forward oifname "{v}*" counter drop
add rule inet {TABLE} input iifname "{v}*" counter drop
add rule inet {TABLE} postrouting iifname "{v}*" oifname != "{v}*" masquerade
"""


def chain_name(slot: int) -> str:
    return f"s{slot}"


def set_names(slot: int) -> tuple[str, str]:
    """Slot ``slot``'s sets: (addresses of allowed names, addresses of denied names)."""
    return f"a{slot}", f"d{slot}"


def sandbox_chain(slot: int, policy: Policy | None, flush_sets: bool = False, max_conns: int = MAX_CONNS) -> str:
    """Slot ``slot``'s chain with ``policy`` (None: not handed out yet, nothing goes out),
    made or replaced in one transaction, and its entry in the verdict map; its name sets
    emptied too with ``flush_sets`` (the policy's names changed).  A new connection past
    ``max_conns`` of the sandbox's open ones is refused (``ct count``): one guest cannot fill
    the node's conntrack table (262,144 entries here), which would stop every sandbox's and
    the node's own new connections."""
    _node_end, own = addresses(slot)
    c = chain_name(slot)
    veth = f"{NODE_VETH}{slot}"
    refuse = "reject with icmpx type admin-prohibited"

    def log(verdict: str) -> str:
        return f'log group {LOG_GROUP} prefix "cubefs {slot} {verdict}"'

    rules = [
        # an open connection's packets pass unless to a protected address, whose connection is cut: one
        # made before the address was protected (a sandbox kept across an upgrade, a node joining later, the seconds
        # before the node list or a new template's endpoint is in) does not carry on.  Nothing the
        # sandbox needs crosses here to them: its DNS and the proxy's connections are sockets in its
        # namespace, never forwarded by the node.  Not logged: NFLOG counts connections, not packets.
        # One set lookup per packet of an open connection: 100 MB uploads through the gateway with
        # 1,000 networks protected, 9 rounds alternated (tools/bench/egress_accounting.py's Lab):
        # median 575 MB/s against 595 with no lookup, 613 with two; noise, not a cost.
        f"ct state established,related ip daddr != @{PROTECTED} accept",
        "ct state established,related meta l4proto tcp counter reject with tcp reset",
        f"ct state established,related counter {refuse}",
        f"ip saddr != {own} counter drop",  # spoofed (the namespace SNATs the guest to {own})
        "meta nfproto ipv6 counter drop",
        f"ct state new ct count over {max_conns} counter {refuse}",
        f"ip daddr {{ {', '.join(REFUSED_ALWAYS)} }} {log('refused')} counter {refuse}",
        f"ip daddr @{PROTECTED} {log('refused')} counter {refuse}",  # before allowOut: it cannot open them
    ]
    allowed, denied = set_names(slot)
    if policy is None:
        rules.append(f"counter {refuse}")
    else:
        allow, deny = policy.effective()
        if allow:
            rules.append(f"ip daddr {{ {', '.join(allow)} }} {log('allowed')} counter accept")
        rules.append(f"ip daddr @{allowed} {log('allowed')} counter accept")
        if deny:
            rules.append(f"ip daddr {{ {', '.join(deny)} }} {log('refused')} counter {refuse}")
        rules.append(f"ip daddr @{denied} {log('refused')} counter {refuse}")
        rules.append(f"{log('allowed')} counter accept")
    sets = "\n".join(f"add set inet {TABLE} {n} {{ type ipv4_addr ; flags timeout ; }}" for n in (allowed, denied))
    if flush_sets:
        sets += "\n" + "\n".join(f"flush set inet {TABLE} {n}" for n in (allowed, denied))
    body = "\n".join(f"add rule inet {TABLE} {c} {r}" for r in rules)
    return f"""
{sets}
add chain inet {TABLE} {c}
flush chain inet {TABLE} {c}
{body}
add element inet {TABLE} egress {{ "{veth}" : jump {c} }}
"""


def protected_elements(networks: list[str]) -> str:
    """The set ``protected`` replaced by ``networks`` (collapsed: an interval set refuses
    overlapping elements) in one transaction: never empty in between."""
    body = f"\nadd element inet {TABLE} {PROTECTED} {{ {', '.join(networks)} }}" if networks else ""
    return f"flush set inet {TABLE} {PROTECTED}{body}\n"


def remove_chain(slot: int) -> str:
    return f"""
delete element inet {TABLE} egress {{ "{NODE_VETH}{slot}" }}
delete chain inet {TABLE} {chain_name(slot)}
delete set inet {TABLE} {set_names(slot)[0]}
delete set inet {TABLE} {set_names(slot)[1]}
"""


def set_elements(slot: int, which: int, addresses: dict[str, int]) -> str:
    """Put ``addresses`` (address -> seconds to keep it) in slot ``slot``'s allow set
    (``which`` 0) or deny set (1), each kept that long from now.  An element already there
    keeps its old timeout on an ``add``, so it is added (if missing), deleted and added again
    in one transaction: never absent in between."""
    name = set_names(slot)[which]
    plain = ", ".join(addresses)
    timed = ", ".join(f"{a} timeout {t}s" for a, t in addresses.items())
    return f"""
add element inet {TABLE} {name} {{ {plain} }}
delete element inet {TABLE} {name} {{ {plain} }}
add element inet {TABLE} {name} {{ {timed} }}
"""


def namespace_rules(slot: int) -> str:
    """The namespace's table, made anew (an adopted namespace of an older service gets
    today's rules)."""
    _node_end, own = addresses(slot)
    dns = "meta l4proto { udp, tcp } th dport 53"
    return f"""
add table ip {TABLE}
delete table ip {TABLE}
add table ip {TABLE}
add chain ip {TABLE} prerouting {{ type nat hook prerouting priority dstnat ; policy accept ; }}
add rule ip {TABLE} prerouting iifname "tap0" {dns} dnat to {GATEWAY_IP}
add chain ip {TABLE} forward {{ type filter hook forward priority filter ; policy drop ; }}
add chain ip {TABLE} input {{ type filter hook input priority filter ; policy accept ; }}
add chain ip {TABLE} postrouting {{ type nat hook postrouting priority srcnat ; policy accept ; }}
add rule ip {TABLE} forward iifname "tap0" oifname "veth0" ip saddr {GUEST_IP} accept
add rule ip {TABLE} forward iifname "veth0" oifname "tap0" ct state established,related accept
add rule ip {TABLE} input iifname "tap0" ip daddr {GATEWAY_IP} {dns} accept
add rule ip {TABLE} input iifname "tap0" drop
add rule ip {TABLE} postrouting oifname "veth0" ip saddr {GUEST_IP} snat to {own}
"""
