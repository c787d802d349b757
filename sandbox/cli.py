"""``cubefs sandbox ...``: the E2B-compatible sandbox service, its templates, and a client for people.

Registered through the ``cubefs.commands`` entry point (pyproject.toml): cubefs
never imports this package.  Imports of aiohttp and the service wait until a
command runs, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from cubefs.errors import EXIT_ERROR, EXIT_OK, UsageError
from cubefs.volume.cli import volume_dir_arg
from vmm.cli import key_values

EPILOG = """\
examples:
  cubefs sandbox template create base --from debian:12       # an image as a sandbox template
  cubefs sandbox template create code-interpreter-v1 --from debian:12 --code-interpreter
  cubefs sandbox serve                                       # API :3000, proxy :3002, both loopback
  export E2B_API_URL=http://127.0.0.1:3000 E2B_SANDBOX_URL=http://127.0.0.1:3002
  export E2B_API_KEY=$(head -1 /var/lib/cubefs/sandbox/api-keys)
  python3 -c 'from e2b import Sandbox; s = Sandbox.create(); print(s.commands.run("uname -a").stdout)'
  cubefs sandbox create base --env FOO=bar                   # or from the shell
  cubefs sandbox exec ID -- 'echo $FOO; id'
  cubefs sandbox ls; cubefs sandbox logs ID; cubefs sandbox kill ID
  cubefs sandbox snapshot ID --name step3                   # memory and disk at one instant
  cubefs sandbox create step3                                # a sandbox that goes on from it
  cubefs sandbox rollback ID step3                           # back to it in place, processes too
  cubefs sandbox fork ID --count 3                           # three copies of its present
  cubefs sandbox pause ID; cubefs sandbox resume ID
  cubefs sandbox network ID --deny 0.0.0.0/0 --allow 10.1.0.0/16   # its egress, changed while it runs
  cubefs sandbox network ID [--json]          # its bytes out/in, open and last connections
  cubefs sandbox snapshot ls; cubefs sandbox snapshot rm step3

The stock E2B SDK drives the service unchanged: E2B_API_URL names the API, E2B_SANDBOX_URL the
proxy, E2B_API_KEY one of the keys ($CUBEFS_SANDBOX_API_KEY, comma-separated, or the lines of
--api-key-file; with neither, the service makes one in $CUBEFS_SANDBOX_DIR/api-keys, 0600).
State (templates, one record per sandbox, snapshots) lives in $CUBEFS_SANDBOX_DIR (default
/var/lib/cubefs/sandbox); sandboxes outlive the service and a restarted one adopts them.
"""


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", default=None, metavar="URL", help="the API (default $E2B_API_URL or "
                   "http://127.0.0.1:3000)")
    p.add_argument("--proxy", default=None, metavar="URL", help="the proxy (default $E2B_SANDBOX_URL or "
                   "http://127.0.0.1:3002)")
    p.add_argument("--api-key", default=None, help="default $E2B_API_KEY, else this node's key file")
    p.add_argument("--json", action="store_true")


def _cluster_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--etcd", default=None, required=required, metavar="URL[,URL...]",
                   help="the cluster's etcd endpoints" + ("" if required else ": join that cluster") +
                   " (user and password from $CUBEFS_ETCD_USER and $CUBEFS_ETCD_PASSWORD)")
    p.add_argument("--etcd-prefix", default="/cubefs/", metavar="PATH",
                   help="the keys of this cluster live under it (default /cubefs/)")


def add_parsers(sub: Any, store_args: Any) -> None:
    p = sub.add_parser("sandbox", help="E2B-compatible sandboxes: serve, templates, create, exec, kill",
                       description="Sandboxes for agents: micro-VMs restored from a template, each with its own "
                       "copy-on-write root, served to the stock E2B SDK (control-plane API + proxy + envd).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="sandbox_command", metavar="ACTION", required=True)

    q = s.add_parser("serve", help="run the service (foreground): the API and the sandbox proxy")
    q.add_argument("--api-listen", default="127.0.0.1:3000", metavar="HOST:PORT", help="the API (E2B_API_URL)")
    q.add_argument("--proxy-listen", default="127.0.0.1:3002", metavar="HOST:PORT",
                   help="the sandbox proxy (E2B_SANDBOX_URL)")
    q.add_argument("--domain", default=None, help="sandbox domain: Host PORT-ID.DOMAIN routes too")
    q.add_argument("--api-key-file", default=None, metavar="FILE", help="API keys, one a line (0600)")
    q.add_argument("--kernel", default=None, metavar="DIR", help="guest kernel (default $CUBEFS_VM_KERNEL)")
    q.add_argument("--network", action="store_true",
                   help="a NIC per sandbox, egress through this node's gateway (network namespaces, nftables)")
    q.add_argument("--network-pool", type=int, default=4, metavar="N",
                   help="with --network: namespaces kept ready (default 4)")
    q.add_argument("--dns-upstream", action="append", default=None, metavar="IP[:PORT]",
                   help="with --network: where the sandboxes' resolver forwards (repeatable; default: "
                   "/etc/resolv.conf's nameservers)")
    q.add_argument("--max-connections", type=int, default=4096, metavar="N",
                   help="with --network: a sandbox's concurrent connections at the gateway; more are refused "
                   "(default 4096)")
    q.add_argument("--deny-always", action="append", default=None, metavar="CIDR",
                   help="with --network: a network no sandbox reaches whatever its policy (repeatable); the "
                   "--etcd endpoints, the cluster's nodes and the S3 store endpoint are refused already")
    q.add_argument("--pool-size", type=int, default=2, metavar="N",
                   help="sandboxes kept made and paused per template, so a create only resumes one (default 2; "
                   "0: none)")
    q.add_argument("--snapshot-dir", default=None, metavar="DIR",
                   help="where sandbox snapshots (their RAM) are kept (default $CUBEFS_SNAPSHOT_DIR, "
                   "else STATE/snapshots)")
    q.add_argument("--max-vcpus", type=int, default=None, help="vCPUs this node holds (default 16 per host CPU)")
    q.add_argument("--max-memory", type=int, default=None, metavar="MB",
                   help="guest memory this node holds (default: the host's); past either limit a create is "
                   "refused with 429 and Should-Retry: false")
    q.add_argument("--max-restores", type=int, default=None, metavar="N",
                   help="VM restores at once (creates not served from a pool, from a snapshot, forks, pool "
                   "fills); more wait in order (default: one per host CPU)")
    q.add_argument("--max-queue-wait", type=float, default=None, metavar="SECONDS",
                   help="a create whose restore would start later than this is refused at once with 503 and "
                   "Retry-After, nothing made (default 60: the E2B SDK's request timeout, past which its caller "
                   "has given up; 0: queue without bound)")
    _cluster_args(q)
    q.add_argument("--node", default=None, metavar="NAME",
                   help="this node's name in the cluster (with --etcd; default: the host name)")
    q.add_argument("--advertise", default=None, metavar="HOST",
                   help="the address other nodes and fronts reach this node's API, proxy and peer port on "
                   "(default: the --api-listen host; required when that is 0.0.0.0)")
    q.add_argument("--peer", default=None, metavar="HOST:PORT",
                   help="where the cluster reaches this node's peer chunk server (run 'cubefs serve --listen "
                   "HOST:PORT' beside the service): the nodes' sandbox roots then read chunks from each "
                   "other's disk caches before the store, each chunk fetched from the store once per cluster")
    q.add_argument("--lease-ttl", type=int, default=10, metavar="SECONDS",
                   help="with --etcd: a node silent this long is dead to the cluster, its sandboxes reported "
                   "gone (default 10)")

    q = s.add_parser("api", help="a front for a cluster (foreground): the API and proxy of every node, on etcd",
                     description="A stateless front: serves the same E2B API and sandbox proxy as a node, for "
                     "every node registered in etcd ('cubefs sandbox serve --etcd URL --node NAME'). Creates "
                     "are placed (a ready pool first, then cached image bytes, then room), reserved in one etcd "
                     "transaction and sent to the node; everything else goes to the sandbox's node. Run as many "
                     "as you like; all share the nodes' API keys.",
                     epilog="example:\n  cubefs sandbox serve --etcd http://10.0.0.5:2379 --node n1 "
                     "--api-listen 0.0.0.0:3000 --advertise 10.0.0.11\n  cubefs sandbox api --etcd "
                     "http://10.0.0.5:2379 --api-listen 0.0.0.0:3000 --proxy-listen 0.0.0.0:3002",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--api-listen", default="127.0.0.1:3000", metavar="HOST:PORT", help="the API (E2B_API_URL)")
    q.add_argument("--proxy-listen", default="127.0.0.1:3002", metavar="HOST:PORT",
                   help="the sandbox proxy (E2B_SANDBOX_URL)")
    q.add_argument("--domain", default=None, help="sandbox domain: Host PORT-ID.DOMAIN routes too")
    q.add_argument("--api-key-file", default=None, metavar="FILE", help="API keys, one a line (0600)")
    q.add_argument("--policy", choices=("spread", "pack"), default="spread",
                   help="after pools and cached images: most free memory first (spread) or least (pack)")
    q.add_argument("--sample", type=int, default=None, metavar="K",
                   help="score K random candidate nodes instead of all (best-of-K); 0: every node (default: "
                   "every node up to 256, best-of-16 above)")
    q.add_argument("--name", default=None, help="this front's name in etcd (default HOST:PORT)")
    q.add_argument("--lease-ttl", type=int, default=10, metavar="SECONDS",
                   help="a front killed mid-create holds its reservations this long (default 10)")
    _cluster_args(q, required=True)

    q = s.add_parser("template", help="sandbox templates: create, ls, rm",
                     description="A sandbox template is an image prepared for sandboxes (user 'user' with "
                     "home /home/user and sudo, as E2B templates have), snapshotted as a volume every sandbox "
                     "clones in O(1), plus a saved VM of its size every sandbox is restored from.")
    q.add_argument("action", choices=("create", "ls", "rm"))
    q.add_argument("name", nargs="?")
    q.add_argument("--from", dest="image", metavar="NAME:TAG", help="the image (create)")
    q.add_argument("--cpus", type=int, default=1)
    q.add_argument("--memory", type=int, default=512, metavar="MB")
    q.add_argument("--start-cmd", default=None, help="started (as root) in every new sandbox")
    q.add_argument("--ready-port", type=int, default=None, help="a create waits until this port listens")
    q.add_argument("--code-interpreter", action="store_true",
                   help="install the code interpreter (/execute on port 49999) as the start command")
    q.add_argument("--kernel", default=None, metavar="DIR")
    q.add_argument("--disk", default=None, metavar="SIZE", help="its sandboxes' roots on disks of this size (e.g. "
                   "2G): the image under an overlay on a block volume each, where writes go at disk speed")
    q.add_argument("--cache-dir", default=None, help="the disk cache its sandboxes' roots read the image through")
    q.add_argument("--json", action="store_true")
    store_args(q)
    volume_dir_arg(q)

    q = s.add_parser("ls", help="list sandboxes")
    _client_args(q)
    q = s.add_parser("create", help="create a sandbox; prints its id")
    q.add_argument("template", nargs="?", default="base")
    q.add_argument("--timeout", type=int, default=None, help="seconds to live (default 300)")
    q.add_argument("--metadata", "-m", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE")
    _client_args(q)
    q = s.add_parser("exec", help="run a command (bash -l -c) in a sandbox, output as it comes")
    q.add_argument("sandbox")
    q.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--workdir", "-w", default=None)
    q.add_argument("--user", default=None, help="default: user")
    q.add_argument("cmd", nargs="*", metavar="-- CMD")
    _client_args(q)
    q = s.add_parser("network", help="a sandbox's connections and bytes; with options, replace its egress policy",
                     description="Without options: its egress policy, bytes out and in, open connections and the "
                     "last ended or refused ones (GET /sandboxes/ID/network). With options, as the E2B API's PUT "
                     "/sandboxes/ID/network: the whole policy is replaced; a destination in --allow goes out, "
                     "else one in --deny is refused, else it goes out (--no-internet: refused).")
    q.add_argument("sandbox")
    q.add_argument("--allow", action="append", default=[],
                   metavar="CIDR|NAME", help="may be repeated; NAME: a domain or *.DOMAIN")
    q.add_argument("--deny", action="append", default=[], metavar="CIDR|NAME", help="may be repeated")
    q.add_argument("--no-internet", action="store_true", help="refuse what --allow does not name")
    _client_args(q)
    q = s.add_parser("logs", help="a sandbox's console log")
    q.add_argument("sandbox")
    _client_args(q)
    q = s.add_parser("snapshot", help="snapshot a sandbox (memory and disk); snapshot ls; snapshot rm SNAP",
                     description="'snapshot ID' takes a snapshot of a running sandbox: its memory, processes and "
                     "files at one instant (the guest pauses only for that instant). 'snapshot ls' lists "
                     "snapshots, 'snapshot rm SNAP...' deletes them. A snapshot is a template to 'create'.")
    q.add_argument("words", nargs="+", metavar="ID | ls | rm SNAP...")
    q.add_argument("--name", default=None, help="a name to create sandboxes from (besides its snap-ID)")
    q.add_argument("--disk-only", action="store_true",
                   help="the files alone: sandboxes made from it boot their template afresh on them")
    q.add_argument("--sandbox", default=None, metavar="ID", help="ls: only snapshots of this sandbox")
    _client_args(q)
    q = s.add_parser("rollback", help="put a sandbox back to a snapshot, in place (processes and files)")
    q.add_argument("sandbox")
    q.add_argument("snapshot", help="snap-ID or name")
    _client_args(q)
    q = s.add_parser("fork", help="copies of a running sandbox's present (it runs on)")
    q.add_argument("sandbox")
    q.add_argument("--count", type=int, default=1)
    q.add_argument("--timeout", type=int, default=None, help="seconds each copy lives (default 300)")
    _client_args(q)
    for action, what in (("pause", "pause a sandbox where it is (envd answers 502 until resumed)"),
                         ("resume", "resume a paused sandbox")):
        q = s.add_parser(action, help=what)
        q.add_argument("sandbox")
        if action == "resume":
            q.add_argument("--timeout", type=int, default=None, help="seconds to live from now (default 300)")
        _client_args(q)
    q = s.add_parser("kill", help="kill sandboxes")
    q.add_argument("sandboxes", nargs="*")
    q.add_argument("--all", action="store_true")
    _client_args(q)


def _traffic(doc: dict[str, Any], as_json: bool) -> int:
    """``cubefs sandbox network ID``: the record of the sandbox's traffic."""
    if as_json:
        print(json.dumps(doc, indent=1))
        return EXIT_OK
    policy, t = doc.get("network") or {}, doc.get("traffic") or {}
    conns = t.get("connections") or {}
    print(f"sandbox {doc.get('sandboxID')}: internet {'yes' if doc.get('allowInternetAccess', True) else 'no'}, "
          f"allow {' '.join(policy.get('allowOut') or []) or '-'}, deny {' '.join(policy.get('denyOut') or []) or '-'}")
    print(f"  {t.get('bytesOut', 0)} B out, {t.get('bytesIn', 0)} B in, {t.get('packets', 0)} packets; connections: "
          f"{conns.get('allowed', 0)} allowed, {conns.get('refused', 0)} refused, {len(t.get('open') or [])} open")
    for c in [*(t.get("recent") or []), *(t.get("open") or [])]:
        print(f"  {c['state']:12} {c['protocol']:4} {c['destination']}:{c['port']:<5} {c['verdict']:8} "
              f"{c['bytesOut']:>10} B out {c['bytesIn']:>10} B in {c['seconds']:>8.3f} s")
    return EXIT_OK


def cmd_sandbox(args: argparse.Namespace) -> int:
    action = args.sandbox_command
    if action == "serve":
        return _serve(args)
    if action == "api":
        return _front(args)
    if action == "template":
        return _template(args)
    from sandbox.client import Client

    client = Client(args.api, args.proxy, args.api_key)
    if action == "ls":
        items = client.call("GET", "/sandboxes")
        if args.json:
            print(json.dumps(items, indent=1))
        elif not items:
            print("no sandboxes")
        for s in items if not args.json else []:
            meta = ",".join(f"{k}={v}" for k, v in (s.get("metadata") or {}).items())
            print(f"{s['sandboxID']:22} {s['templateID']:20} {s['state']:8} started {s['startedAt']}  "
                  f"ends {s['endAt']}  {meta}")
        return EXIT_OK
    if action == "create":
        body: dict[str, Any] = {"templateID": args.template, "metadata": key_values(args.metadata, "--metadata"),
                                "envVars": key_values(args.env, "--env")}
        if args.timeout is not None:
            body["timeout"] = args.timeout
        t0 = time.monotonic()
        made = client.call("POST", "/v2/sandboxes", body)
        if args.json:
            print(json.dumps(made | {"seconds": round(time.monotonic() - t0, 3)}, indent=1))
        else:
            print(made["sandboxID"])
        return EXIT_OK
    if action == "exec":
        if not args.cmd:
            raise UsageError("usage: cubefs sandbox exec ID -- CMD")
        return client.exec(args.sandbox, " ".join(args.cmd), key_values(args.env, "--env"), args.workdir, args.user)
    if action == "network" and not (args.allow or args.deny or args.no_internet):
        return _traffic(client.call("GET", f"/sandboxes/{args.sandbox}/network"), args.json)
    if action == "network":
        client.call("PUT", f"/sandboxes/{args.sandbox}/network",
                    {"allowOut": args.allow, "denyOut": args.deny, "allow_internet_access": not args.no_internet})
        print(f"sandbox {args.sandbox}: internet {'no' if args.no_internet else 'yes'}, allow "
              f"{' '.join(args.allow) or '-'}, deny {' '.join(args.deny) or '-'}")
        return EXIT_OK
    if action == "logs":
        for entry in client.call("GET", f"/sandboxes/{args.sandbox}/logs").get("logs", []):
            print(entry["line"])
        return EXIT_OK
    if action in ("snapshot", "rollback", "fork", "pause", "resume"):
        return _snapshots(client, args)
    ids = [s["sandboxID"] for s in client.call("GET", "/sandboxes")] if args.all else args.sandboxes
    if not ids:
        raise UsageError("usage: cubefs sandbox kill ID... | --all")
    for sid in ids:
        client.call("DELETE", f"/sandboxes/{sid}")
        print(f"killed {sid}")
    return EXIT_OK


def _snapshots(client: Any, args: argparse.Namespace) -> int:
    """snapshot / snapshot ls / snapshot rm / rollback / fork / pause / resume."""
    action = args.sandbox_command

    def show(doc: Any, line: str) -> None:
        print(json.dumps(doc, indent=1) if args.json else line)

    t0 = time.monotonic()
    if action == "snapshot" and args.words[0] == "ls":
        items = client.call("GET", "/snapshots" + (f"?sandboxID={args.sandbox}" if args.sandbox else ""))
        show(items, "\n".join(f"{s['snapshotID']:24} {' '.join(s['names'])}" for s in items) or "no snapshots")
        return EXIT_OK
    if action == "snapshot" and args.words[0] == "rm":
        if len(args.words) < 2:
            raise UsageError("usage: cubefs sandbox snapshot rm SNAP...")
        for snap in args.words[1:]:
            client.call("DELETE", f"/templates/{snap}")
            print(f"removed {snap}")
        return EXIT_OK
    if action == "snapshot":
        if len(args.words) != 1:
            raise UsageError("usage: cubefs sandbox snapshot ID [--name N] | snapshot ls | snapshot rm SNAP...")
        body: dict[str, Any] = {"memory": not args.disk_only} | ({"name": args.name} if args.name else {})
        info = client.call("POST", f"/sandboxes/{args.words[0]}/snapshots", body)
        show(info | {"seconds": round(time.monotonic() - t0, 3)}, info["snapshotID"])
        return EXIT_OK
    if action == "rollback":
        made = client.call("POST", f"/sandboxes/{args.sandbox}/rollback", {"snapshotID": args.snapshot})
        show(made | {"seconds": round(time.monotonic() - t0, 3)},
             f"{args.sandbox} rolled back to {args.snapshot} in {time.monotonic() - t0:.2f} s")
        return EXIT_OK
    if action == "fork":
        results = client.call("POST", f"/sandboxes/{args.sandbox}/fork",
                              {"count": args.count} | ({"timeout": args.timeout} if args.timeout else {}))
        show(results, "\n".join(r["sandbox"]["sandboxID"] if "sandbox" in r else
                                f"failed: {r['error']['message']}" for r in results))
        return EXIT_OK if all("sandbox" in r for r in results) else EXIT_ERROR
    if action == "pause":
        client.call("POST", f"/sandboxes/{args.sandbox}/pause", {})
        show({"sandboxID": args.sandbox, "state": "paused"}, f"paused {args.sandbox}")
        return EXIT_OK
    made = client.call("POST", f"/sandboxes/{args.sandbox}/connect",
                       {"timeout": args.timeout} if args.timeout else {})
    show(made, f"resumed {args.sandbox}")
    return EXIT_OK


def _disk_mb(size: str | None) -> int:
    """``--disk SIZE`` in whole MiB (0: none)."""
    if size is None:
        return 0
    from cubefs.humanize import parse_size

    try:
        n = parse_size(size)
    except ValueError as err:
        raise UsageError(f"--disk: {err}") from None
    if n % (1 << 20):
        raise UsageError(f"--disk {size}: a whole number of MiB")
    from vmm.disk import check_size

    return check_size(n) >> 20  # before the progress line: a bad size is one line


def _opts(args: argparse.Namespace) -> Any:
    from sandbox.templates import StoreOptions

    return StoreOptions(store=args.store, s3_endpoint=args.s3_endpoint, cache_dir=args.cache_dir,
                        volume_dir=args.volume_dir)


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from sandbox.admission import MAX_WAIT
    from sandbox.config import ApiKeys
    from sandbox.pool import Capacity
    from sandbox.server import parse_listen, serve

    if args.pool_size < 0:
        raise UsageError("--pool-size must be 0 or more")
    if args.max_restores is not None and args.max_restores < 1:
        raise UsageError("--max-restores must be 1 or more")
    if args.max_queue_wait is not None and not args.max_queue_wait >= 0:
        raise UsageError("--max-queue-wait must be 0 or more seconds")
    keys = ApiKeys.load(args.api_key_file)
    if args.snapshot_dir:
        import os

        os.environ["CUBEFS_SNAPSHOT_DIR"] = os.path.abspath(args.snapshot_dir)
    capacity = Capacity.of_host(vcpus=args.max_vcpus, memory_mb=args.max_memory)
    logging.getLogger("cubefs").setLevel(min(logging.getLogger("cubefs").getEffectiveLevel(), logging.INFO))
    cluster = None
    if args.etcd:
        import socket

        from sandbox.server import ClusterOptions

        if args.lease_ttl < 2:
            raise UsageError("--lease-ttl must be 2 seconds or more")
        cluster = ClusterOptions(args.etcd, args.etcd_prefix, args.node or socket.gethostname(), args.advertise,
                                 args.peer, args.lease_ttl)
    elif args.node or args.peer:
        raise UsageError("--node and --peer belong to a cluster: give --etcd URL too")
    if args.deny_always and not args.network:
        raise UsageError("--deny-always belongs to --network (sandboxes without a network reach nothing)")
    if args.deny_always:
        from sandbox.network.protect import parse_networks

        parse_networks(args.deny_always)  # a bad entry refused before anything starts
    asyncio.run(serve(parse_listen(args.api_listen, 3000), parse_listen(args.proxy_listen, 3002), keys,
                      args.domain, Path(args.kernel) if args.kernel else None,
                      pool_size=args.pool_size,
                      network_pool=args.network_pool if args.network else None, capacity=capacity, cluster=cluster,
                      dns_upstream=args.dns_upstream, max_connections=args.max_connections,
                      max_restores=args.max_restores, deny_always=args.deny_always,
                      max_queue_wait=MAX_WAIT if args.max_queue_wait is None else args.max_queue_wait))
    return EXIT_OK


def _front(args: argparse.Namespace) -> int:
    import asyncio

    from sandbox.cluster.front import run_front
    from sandbox.config import ApiKeys
    from sandbox.server import parse_listen

    if args.sample is not None and args.sample < 0:
        raise UsageError("--sample must be 0 (score every node) or more")
    keys = ApiKeys.load(args.api_key_file)
    logging.getLogger("cubefs").setLevel(min(logging.getLogger("cubefs").getEffectiveLevel(), logging.INFO))
    asyncio.run(run_front(args.etcd, parse_listen(args.api_listen, 3000), parse_listen(args.proxy_listen, 3002),
                          keys, args.etcd_prefix, args.name, args.policy, args.sample, args.domain,
                          args.lease_ttl))
    return EXIT_OK


def _template(args: argparse.Namespace) -> int:
    from sandbox import templates

    if args.action == "ls":
        items = templates.SandboxTemplate.list()
        if args.json:
            from dataclasses import asdict

            print(json.dumps([asdict(t) for t in items], indent=1))
        elif not items:
            print("no sandbox templates")
        for t in items if not args.json else []:
            print(f"{t.name:24} {t.image:24} {t.cpus} vCPU {t.memory_mb} MiB  "
                  f"{'start: ' + t.start_cmd if t.start_cmd else ''}")
        return EXIT_OK
    if not args.name:
        raise UsageError(f"usage: cubefs sandbox template {args.action} NAME")
    if args.action == "rm":
        from sandbox.config import state_dir

        users = []
        for p in (state_dir() / "sandboxes").glob("*.json"):
            try:
                if json.loads(p.read_text()).get("template") == args.name:
                    users.append(p.stem)
            except (OSError, ValueError):
                continue
        templates.remove(args.name, users)
        print(f"removed sandbox template {args.name}")
        return EXIT_OK
    if not args.image:
        raise UsageError("usage: cubefs sandbox template create NAME --from IMAGE")
    disk_mb = _disk_mb(args.disk)
    print(f"making sandbox template {args.name} from {args.image} (the first of its size boots a VM: "
          "seconds under TCG)...", file=sys.stderr, flush=True)
    t = templates.create(args.name, args.image, _opts(args), cpus=args.cpus, memory_mb=args.memory,
                         start_cmd=args.start_cmd, ready_port=args.ready_port,
                         code_interpreter=args.code_interpreter, kernel=Path(args.kernel) if args.kernel else None,
                         disk_mb=disk_mb)
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(t), indent=1))
    else:
        print(f"sandbox template {t.name}: image {t.image}, VM template {t.vm_template}, volume {t.volume} "
              f"({t.seconds:.1f} s)")
    return EXIT_OK


COMMANDS = {"sandbox": cmd_sandbox}
