"""Build of the one C piece, pyunionfs/_fuseshim.c; everything else is in pyproject.toml."""

import shlex
import subprocess

from setuptools import Extension, setup


def _pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", *args, "fuse3"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        hint = "apt-get install libfuse3-dev pkg-config"
        raise SystemExit(f"pyunionfs: pkg-config cannot find fuse3 ({exc}): {hint}") from None
    return shlex.split(out)


setup(
    ext_modules=[
        Extension(
            "pyunionfs._fuseshim",
            sources=["pyunionfs/_fuseshim.c"],
            extra_compile_args=_pkg_config("--cflags"),
            extra_link_args=[*_pkg_config("--libs"), "-ldl"],
        )
    ]
)
