"""The node: mount daemons, the warm mount server that forks and supervises them, their control sockets, and the
peer chunk server; it serves the image and volume fs operations, and never decides what a file holds."""
