"""Archives microvmm appends to a guest initramfs: the newc writer, --modules, --add."""
