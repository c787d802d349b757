"""Writable volumes: the read-write fs operations over a CoW index (``cubefs/cow/``), ``cubefs volume`` and
``cubefs commit``; a volume's blocks live in its index and data files, never in the store until committed."""
