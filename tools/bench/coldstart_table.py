#!/usr/bin/env python3
"""Issue 18's table from ``coldstart.py --json-out`` files, one per image.

Why a separate step: each image is its own harness run (its own tree, layer and
bucket), and the table puts them side by side, loopback rows first, then +10 ms,
with each run's ratios taken within that run (the machine is shared: absolute
seconds drift between runs, ratios within one much less).  Usage::

    .venv/bin/python tools/bench/coldstart_table.py RESULTS/*.json

Runs made with ``--variants`` (first starts only, variants alternated within
each round) get a table of their own: per image, S3 and variant, first start /
full pull (median, and each round), the proxy's sequential chain, chunk GETs,
fetched / read, and in how many rounds the variant beat the first one named.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def rows(path: Path) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    result = json.loads(path.read_text())
    cfg = result["config"]
    name = Path(cfg["rootfs"]).name
    out = []
    for mode, res in result["modes"].items():
        if "variants" in res:
            continue
        where = "loopback" if mode == "direct" else f"+{cfg['delay_ms']:g} ms"
        out.append((f"{name} · `{cfg['cmd']}`", where, res["medians"], res["ratios"]))
    return out


def variant_rows(path: Path) -> list[str]:
    result = json.loads(path.read_text())
    cfg = result["config"]
    out = []
    for mode, res in result["modes"].items():
        if "variants" not in res:
            continue
        where = "loopback" if mode == "direct" else f"+{cfg['delay_ms']:g} ms"
        first = next(iter(res["variants"]))
        rounds = len(res["rounds"])
        for name, v in res["variants"].items():
            wins = sum(1 for r in res["rounds"] if r["variants"][name]["total_s"] < r["variants"][first]["total_s"])
            chains = "-" if v["chain"] is None else f"{v['chain']:.0f} ({', '.join(str(c) for c in v['chains'])})"
            out.append(f"| {Path(cfg['rootfs']).name} | {where} | {name} `{v['mount_args']}` | "
                       f"{v['first_over_pull']:.2f} ({', '.join(f'{x:.2f}' for x in v['first_over_pull_all'])}) | "
                       f"{'-' if name == first else f'{wins} of {rounds}'} | "
                       f"{chains} | {v['gets']:.0f} | {v['fetched_over_read']:.2f} ({v['fetched_mb']:.1f} / "
                       f"{v['read_mb']:.1f} MB) |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args()
    variants = [r for f in args.files for r in variant_rows(f)]
    if variants:
        print("| image | S3 | variant | first start / full pull, median (each round) | rounds faster than the "
              "first variant | chain, median (each) | chunk GETs | fetched / FUSE-read (MB) |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(variants))
    table = [r for f in args.files for r in rows(f)]
    if not table:
        return 0
    print()
    table.sort(key=lambda r: (r[1] != "loopback", r[1]))
    print("| image · command | S3 | full pull (3 GETs + extract) | cubefs first start (no trace) | "
          "later start (published trace) | first / pull (≤ 0.8) | later / pull (≤ 0.5) | "
          "on the node: warm-disk / extracted tree, caches dropped (≤ 1.5) | warm / native (≤ 1.1) | "
          "fetched at first start / FUSE-read |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, where, med, ratios in table:
        cs = med["cold_store"]
        fetched = cs["chunk_bytes"] / cs["fuse_read_bytes"] if cs.get("fuse_read_bytes") else float("nan")
        print(f"| {label} | {where} | {med['pull_total_s']:.2f} | {med['cold_total_s']:.2f} | "
              f"{med['later_total_s']:.2f} | {ratios['lazy_cold_over_full_pull']:.2f} | "
              f"{ratios['later_over_full_pull']:.2f} | {med['warmdisk_total_s']:.2f} / {med['native_cold_s']:.2f} = "
              f"{ratios['warmdisk_over_native_cold']:.2f} | {med['warm_run_s']:.3f} / {med['native_warm_s']:.3f} = "
              f"{ratios['lazy_warm_over_native_warm']:.2f} | {fetched:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
