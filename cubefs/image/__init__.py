"""Images in a store: finding and loading them (catalog), the read-only fs operations over one, export, du, verify
and the store's garbage collection; it reads and deletes stored objects, and never writes an image (dedup/ builds)."""
