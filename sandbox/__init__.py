"""The sandbox service: an E2B-compatible control plane, proxy and envd data plane over cubefs
micro-VMs (``vmm``) and volumes (``cubefs``).  Nothing in ``vmm`` or ``cubefs`` imports from here."""
