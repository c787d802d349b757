"""The guest agent: one program, run from the micro-VM's initramfs by Debian's python3.11
(or on the host, in host mode, for tests).  It imports only the standard library and
its own modules, since it ships alone into the initramfs (tools/make_vm_kernel.py)."""
