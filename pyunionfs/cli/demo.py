"""The built-in demo: two lowers and an upper, mounted, shown, unmounted.

It runs the real command line (``pyunionfs mount`` / ``umount``) in a
subprocess, so it exercises exactly what a user's script would.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from ..fs.markers import Markers


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _whiteout(path: Path) -> None:
    """A deletion marker: the kernel's char 0/0 device (root), else OCI's .wh. file."""
    name = os.fsencode(path.name)
    parent = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        Markers.make_whiteout(parent, name)
    except PermissionError:
        marker = Markers().oci_whiteout_name(name)
        assert marker is not None, "a short demo name"
        (path.parent / os.fsdecode(marker)).touch()
    finally:
        os.close(parent)


def build(base: Path) -> tuple[Path, Path, Path, Path]:
    """Lay out the demo's layers; return (lower1, lower2, upper, mountpoint)."""
    lower1, lower2, upper, mnt = (base / n for n in ("lower1", "lower2", "upper", "mnt"))
    for d in (lower1, lower2, upper, mnt):
        d.mkdir()
    # lower2: the "base image"
    _write(lower2 / "etc/os-release", "NAME=demo-base\n")
    _write(lower2 / "etc/motd", "motd from lower2 (base)\n")
    _write(lower2 / "app/config.ini", "level=base\n")
    _write(lower2 / "app/old.log", "stale log from lower2\n")
    # lower1: a layer on top of it
    _write(lower1 / "app/config.ini", "level=lower1\n")
    _write(lower1 / "app/main.py", "print('hello from lower1')\n")
    (lower1 / "bin").mkdir()
    os.symlink("../app/main.py", lower1 / "bin/app")
    # upper: the container's writable layer
    _write(upper / "etc/motd", "motd from upper (container)\n")
    (upper / "app").mkdir()
    _whiteout(upper / "app" / "old.log")
    return lower1, lower2, upper, mnt


def show_tree(root: Path) -> list[str]:
    """Lines describing every entry below *root* (contents of small files inline)."""
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        depth = len(rel.parts)
        if depth:
            lines.append(f"{'  ' * (depth - 1)}{rel.name}/")
        for name in sorted(filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                desc = f"-> {os.readlink(p)}"
            elif Markers.is_device_whiteout(st):
                desc = "(whiteout: char device 0/0)"
            else:
                desc = repr(p.read_text().strip())
            lines.append(f"{'  ' * depth}{name}  {desc}")
    return lines


def run_demo(keep: bool = False) -> int:
    base = Path(tempfile.mkdtemp(prefix="pyunionfs-demo-"))
    lower1, lower2, upper, mnt = build(base)
    cmd = [sys.executable, "-m", "pyunionfs"]
    print(f"demo folder: {base}")
    for name, layer in (("lower2 (bottom)", lower2), ("lower1", lower1), ("upper (top, writable)", upper)):
        print(f"\n== {name}")
        for line in show_tree(layer):
            print("   " + line)
    layers = f"{lower1}:{lower2}"
    print(f"\n$ pyunionfs mount {layers} {upper} {mnt}")
    res = subprocess.run(cmd + ["mount", layers, str(upper), str(mnt)])
    if res.returncode != 0:
        return res.returncode
    try:
        print(f"\n== merged view at {mnt}")
        for line in show_tree(mnt):
            print("   " + line)
        print(
            "\n   etc/motd comes from the upper (it hides lower2's), app/config.ini from lower1,"
            "\n   and app/old.log is gone: the upper's whiteout hides lower2's file."
        )
    finally:
        print(f"\n$ pyunionfs umount {mnt}")
        subprocess.run(cmd + ["umount", str(mnt)], check=True)
        if not keep:
            shutil.rmtree(base)
    return 0
