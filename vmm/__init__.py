"""Micro-VMs whose root filesystem is served over virtio-fs (see ARCHITECTURE.md)."""
