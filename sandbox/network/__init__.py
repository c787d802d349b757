"""Sandbox networking: a NIC per sandbox, its egress policy at the node's gateway, isolation.

Each sandbox gets a network namespace of its own (``netns``), pre-made in a pool (``pool``),
in which its guest has the same address, MAC and gateway as every other guest (so a VM
restored from a template or a snapshot needs no fix-up) and is NATed to an address of its
own on a veth pair into the node's namespace.  There, one nftables table (``gateway``)
decides what each sandbox may reach (``policy``: E2B's allowOut/denyOut), keeps sandboxes
from each other, from the node, from the metadata addresses and from the rest of the cluster
(``protect``: etcd, the other nodes, the store, ``--deny-always``), and logs every connection
(``flowlog``).  Ingress is only through the sandbox proxy (over the agent channel): no rule
lets a connection into a sandbox.
"""
