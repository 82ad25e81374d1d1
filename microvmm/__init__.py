"""microvmm: a KVM micro-VMM with an integrated virtio-console."""
