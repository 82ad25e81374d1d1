"""`microvmm images build|path`: the default guest images for `microvmm run`."""

from __future__ import annotations

import logging
import subprocess
import sys

from microvmm.images import BUILD_HINT, KERNEL_IMAGE, candidate_images_dirs, default_images_dir, user_images_dir


def images_command(action: str, force: bool = False) -> int:
    if action == "path":
        found = default_images_dir()
        print(found)
        if not (found / KERNEL_IMAGE).is_file():
            looked = ", ".join(str(d) for d in candidate_images_dirs())
            print(f"microvmm: no images yet (looked in {looked}): {BUILD_HINT}", file=sys.stderr)
            return 1
        return 0
    from microvmm.guestbuild.build import build_images
    from microvmm.guestbuild.errors import GuestBuildError
    # The builder's progress (phases, a kernel build line every 10 s) is INFO.
    logging.getLogger("microvmm.guestbuild").setLevel(logging.INFO)
    out = user_images_dir()
    try:
        build_images(out.resolve(), force=force)
    except GuestBuildError as exc:
        print(f"microvmm: error: images build: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"microvmm: error: images build: command failed (exit {exc.returncode}): "
              f"{' '.join(map(str, exc.cmd))}", file=sys.stderr)
        return 1
    print(out)
    return 0
