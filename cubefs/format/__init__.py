"""The on-store format (docs/format.md): image metadata, packs, chunk maps, manifests."""
