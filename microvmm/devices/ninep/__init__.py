"""virtio-9p: a host directory served to the guest over 9P2000.L.

protocol.py  the wire format (bounds-checked reader, writer, constants)
resolve.py   opening guest paths strictly beneath the shared directory
server.py    the file server (fids, operations, limits, read-only)
The device and its `--device virtio-9p` / `--share` plug are
microvmm/devices/virtio_9p.py.
"""
