"""The device manager: the PCI functions of a VM, planned once, wired once.

`plan`      which function sits in which slot with which INTx GSI, derived
            from one list of requested devices (the MP table is written from
            it before the bus exists; the bus is checked against it after).
`registry`  `--device NAME,...`: NAME -> the module of a virtio device that
            plugs in (a new device is one file plus one line there).
`ioeventfds` one VM-wide registry of queue-kick eventfds, keyed by device and queue.
`manager`   builds the functions on the bus, owns the one GSI router, the
            ioeventfds and the BAR windows, and finds running devices.

Cheap to import: the heavy parts (KVM, the devices) load when a VM is built.
"""
