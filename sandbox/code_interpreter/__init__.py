"""The ``code-interpreter-v1`` template's server: ``server.py`` runs inside the guest with the
image's own ``python3`` (stdlib only) and serves the e2b-code-interpreter protocol on port 49999."""
