"""cubefs: block-deduplicated images in an object store, mounted lazily."""

__version__ = "0.1.0"
