"""The default guest's builder, shipped in the package so `microvmm images
build` works from a pip install: a Linux 6.1 kernel from Debian's
linux-source with the guest's patches and config fragment, and a busybox
initramfs. Split by job:

  packages.py   the Debian packages it needs (installed when missing, as root)
  kernel.py     unpack, patch, configure, build the kernel
  initramfs.py  the busybox initramfs
  kconfig.py    .config parsing and verification of the fragment
  cache.py      the build cache and its key
  build.py      the whole build (build_images) and its command line
  command.py    `microvmm images build|path`

The guest sources are package data in guest/: kernel.config (the fragment),
initramfs/ (init, the agent, profile, ...), patches/.
"""

from pathlib import Path

#: The guest sources: every file under it is an input of the image cache key.
GUEST_SOURCES = Path(__file__).resolve().parent / "guest"
