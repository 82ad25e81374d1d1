"""Fakes for tests, fuzzing and benchmarks (no KVM needed):

* virtio_driver: a fake Linux virtio front-end (split rings, legacy PCI
  transport, INTx and MSI recorders) over a real GuestMemory and PciBus;
* soak: the no-loss soak rig (every port of a 16-port console streaming both
  ways through the real device, transport and I/O thread);
* hostile: the hostile-guest harness (a guest that lies about everything,
  every entry point and guest-memory access checked).
"""
