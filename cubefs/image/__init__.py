"""Images in a store: finding and loading them (catalog), the read-only fs operations over one, export, du, verify
and the store's garbage collection; it reads stored images and deletes unreferenced objects, never writes one."""
