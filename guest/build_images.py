#!/usr/bin/env python3
"""Build microvmm's default guest images: `python3 guest/build_images.py --out images`.

The builder and the guest sources live in the package (microvmm/guestbuild/,
its guest/ directory): `microvmm images build` runs the same build from a
pip install. This script keeps `make images` and the docs' command working
from a checkout, whether or not the package is installed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from microvmm.guestbuild.build import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
