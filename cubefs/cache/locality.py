"""How much of an image a node's disk cache already holds: what a cluster scheduler places by.

A create placed where the image's chunks are already on disk fetches nothing
(a cold start from the store costs 0.4-3.3 s more on the issue-18 images);
so a node publishes, per sandbox template, the fraction of its image's bytes
(distinct chunks, uncompressed) present in its disk cache.

Read with LMDB's own read-only open beside the running mounts (readers never
block the writer, and nothing here writes): the key set of the cache (32 bytes a
chunk: ~3 MB for 100,000 chunks) against the image's chunk table, which the
metadata cache usually holds: one store request (the manifest, always asked of
the store so a moved tag is seen), none when the cache is empty.
"""

from __future__ import annotations

import os

import lmdb

from cubefs.image.catalog import load_cached
from cubefs.remote import store_session


def cached_digests(cache_dir: str) -> set[bytes]:
    """The chunk digests in the disk cache at ``cache_dir`` (empty if there is none yet)."""
    path = os.path.join(cache_dir, "chunks.lmdb")
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return set()
    env = lmdb.open(path, readonly=True, max_dbs=8, lock=True, create=False)
    try:
        db = env.open_db(b"chunks", create=False)
        with env.begin(db=db) as txn:
            return {bytes(k) for k in txn.cursor().iternext(keys=True, values=False)}
    finally:
        env.close()


def cached_fraction(store_url: str | None, s3_endpoint: str | None, cache_dir: str, ref: str,
                    digests: set[bytes] | None = None) -> float:
    """The fraction (0..1) of image ``ref``'s distinct chunk bytes in the disk cache."""
    have = cached_digests(cache_dir) if digests is None else digests
    if not have:
        return 0.0
    with store_session(store_url, s3_endpoint) as (loop, store):
        _manifest, image, _cmap, _trace, _offline = loop.run(load_cached(store, cache_dir, ref))
    sizes: dict[bytes, int] = {}
    for i in range(image.nchunks):
        digest, ulen = image.chunk(i)
        sizes[digest] = ulen
    total = sum(sizes.values())
    return sum(n for d, n in sizes.items() if d in have) / total if total else 1.0
