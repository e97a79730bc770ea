"""The systems under test and how each one is mounted and unmounted.

Each system turns (lower, fresh empty upper, work dir, mountpoint) into a live union and back,
the way its own documentation says to use it, with default options: the bench compares the
programs as an operator would run them. ``plain`` is the baseline with no union at all.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .osutil import BenchError, find_daemon, force_unmount, mount_fstype, pid_alive, run, wait_until

MOUNT_TIMEOUT = 60.0


class System:
    """One filesystem under test; subclasses say how to mount it."""

    name = ""
    fuse = True  # has a daemon whose CPU time and memory are measured
    fstype = ""  # the type mountinfo shows once it is live
    daemon_names: tuple[str, ...] = ()  # argv[0]/argv[1] substrings of its daemon
    package = ""  # Debian package that provides it, for --install-peers

    def missing(self) -> str | None:
        """Why this system cannot run here, or None."""
        return None

    def version(self) -> str:
        return "-"

    def fingerprint(self) -> str | None:
        """Identity of the code that a mount made now would run, when it can change during a run."""
        return None

    def mount(self, lower: Path, upper: Path, work: Path, mnt: Path, extra: Sequence[str] = ()) -> int | None:
        """Mount and wait until mountinfo shows it; return the daemon's pid (None without a daemon).

        *extra* are more ``-o`` options in the system's own spelling (``bench.floor`` passes ``timeout=0``);
        the bench itself passes none: it measures every system with its defaults.
        """
        self._start(lower, upper, work, mnt, extra)
        wait_until(lambda: mount_fstype(mnt) == self.fstype, MOUNT_TIMEOUT, f"{self.name} to mount at {mnt}")
        if not self.fuse:
            return None
        pid = find_daemon(mnt, self.daemon_names)
        if pid is None:
            raise BenchError(f"{self.name} is mounted at {mnt} but its daemon was not found")
        return pid

    def _start(self, lower: Path, upper: Path, work: Path, mnt: Path, extra: Sequence[str]) -> None:
        raise NotImplementedError

    def unmount(self, mnt: Path, pid: int | None) -> None:
        """Unmount; wait for the daemon to exit so its CPU and I/O do not leak into the next measurement."""
        try:
            if mount_fstype(mnt) is not None:
                res = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=120)
                if res.returncode != 0:
                    force_unmount(mnt)
            if pid is not None:
                wait_until(lambda: not pid_alive(pid), 60, f"the {self.name} daemon (pid {pid}) to exit")
        finally:
            force_unmount(mnt)
            if pid is not None and pid_alive(pid):
                os.kill(pid, 9)


class Plain(System):
    """No union: workloads run on the lower itself (read-only ones) or on a plain writable folder."""

    name = "plain"
    fuse = False

    def mount(self, lower: Path, upper: Path, work: Path, mnt: Path, extra: Sequence[str] = ()) -> int | None:
        return None

    def unmount(self, mnt: Path, pid: int | None) -> None:
        return None

    def version(self) -> str:
        return "ext4 (the lower itself)"


class KernelOverlay(System):
    name = "overlay"
    fuse = False
    fstype = "overlay"

    def missing(self) -> str | None:
        try:
            with open("/proc/filesystems") as f:
                if "overlay" in f.read():
                    return None
        except OSError:
            pass
        res = subprocess.run(["modprobe", "overlay"], capture_output=True)
        return None if res.returncode == 0 else "the kernel has no overlayfs (modprobe overlay failed)"

    def version(self) -> str:
        return f"kernel {os.uname().release}"

    def _start(self, lower: Path, upper: Path, work: Path, mnt: Path, extra: Sequence[str]) -> None:
        opts = ",".join([f"lowerdir={lower},upperdir={upper},workdir={work}", *extra])
        run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt])


class FuseOverlayfs(System):
    name = "fuse-overlayfs"
    fstype = "fuse.fuse-overlayfs"
    daemon_names = ("fuse-overlayfs",)
    package = "fuse-overlayfs"

    def missing(self) -> str | None:
        if shutil.which("fuse-overlayfs"):
            return None
        return "fuse-overlayfs is not installed (apt-get install fuse-overlayfs)"

    def version(self) -> str:
        res = subprocess.run(["fuse-overlayfs", "--version"], capture_output=True, text=True)
        for line in (res.stdout + res.stderr).splitlines():  # its first line is fusermount3's version
            if line.startswith("fuse-overlayfs"):
                return line.split()[-1]
        return "?"

    def _start(self, lower: Path, upper: Path, work: Path, mnt: Path, extra: Sequence[str]) -> None:
        run(["fuse-overlayfs", "-o", ",".join([f"lowerdir={lower},upperdir={upper},workdir={work}", *extra]), mnt])


class UnionfsFuse(System):
    """unionfs-fuse: copy-on-write with ``-o cow``; its whiteouts are its own (a .unionfs folder), not overlayfs's."""

    name = "unionfs-fuse"
    fstype = "fuse.unionfs"
    daemon_names = ("unionfs",)
    package = "unionfs-fuse"

    def missing(self) -> str | None:
        return None if shutil.which("unionfs") else "unionfs-fuse is not installed (apt-get install unionfs-fuse)"

    def version(self) -> str:
        res = subprocess.run(["unionfs", "--version"], capture_output=True, text=True)
        for line in (res.stdout + res.stderr).splitlines():
            if line.startswith("unionfs"):
                return line.split(":")[-1].strip()
        return "?"

    def mount(self, lower: Path, upper: Path, work: Path, mnt: Path, extra: Sequence[str] = ()) -> int | None:
        run(["unionfs", "-o", ",".join(["cow", *extra]), f"{upper}=RW:{lower}=RO", mnt])
        wait_until(lambda: (mount_fstype(mnt) or "").startswith("fuse"), MOUNT_TIMEOUT, f"unionfs to mount at {mnt}")
        pid = find_daemon(mnt, self.daemon_names)
        if pid is None:
            raise BenchError(f"unionfs-fuse is mounted at {mnt} but its daemon was not found")
        return pid


class Pyunionfs(System):
    """pyunionfs with its default FUSE engine (the native one, speaking the protocol on /dev/fuse itself)."""

    name = "pyunionfs"
    fstype = "fuse.pyunionfs"
    daemon_names = ("pyunionfs",)
    engine_options: tuple[str, ...] = ()  # -o options that pick the FUSE engine; none: the default one

    def _exe(self) -> str | None:
        sibling = Path(sys.executable).with_name("pyunionfs")
        return str(sibling) if sibling.exists() else shutil.which("pyunionfs")

    def missing(self) -> str | None:
        return None if self._exe() else "the pyunionfs command is not installed beside this Python (pip install -e .)"

    def version(self) -> str:
        res = subprocess.run([self._exe() or "pyunionfs", "--version"], capture_output=True, text=True)
        version = res.stdout.strip().split()[-1] if res.returncode == 0 and res.stdout.strip() else "?"
        return version + "".join(f" -o {o}" for o in self.engine_options)

    def fingerprint(self) -> str | None:
        """Hash of the package's sources: pyunionfs is installed editable and may be edited while the bench runs.

        Each mount starts a new daemon from the current sources, so the report can tell when two rounds
        measured two different versions. Subpackages (the engine's ``fuse/``) count too.
        """
        spec = importlib.util.find_spec("pyunionfs")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        top = Path(next(iter(spec.submodule_search_locations)))
        h = hashlib.sha256()
        for f in sorted(top.rglob("*.py")):
            h.update(f.relative_to(top).as_posix().encode() + b"\0" + f.read_bytes())
        return h.hexdigest()[:10]

    def _start(self, lower: Path, upper: Path, work: Path, mnt: Path, extra: Sequence[str]) -> None:
        opts = [f"workdir={work}", *self.engine_options, *extra]
        run([self._exe() or "pyunionfs", "mount", lower, upper, mnt, *(a for o in opts for a in ("-o", o))])

    def unmount(self, mnt: Path, pid: int | None) -> None:
        if mount_fstype(mnt) is not None:
            subprocess.run([self._exe() or "pyunionfs", "umount", str(mnt)], capture_output=True, timeout=120)
        super().unmount(mnt, pid)


class PyunionfsPyfuse3(Pyunionfs):
    """pyunionfs on its older engine: pyfuse3 (libfuse3) driven by trio, picked with ``-o engine=pyfuse3``."""

    name = "pyunionfs-pyfuse3"
    engine_options = ("engine=pyfuse3",)

    def missing(self) -> str | None:
        if importlib.util.find_spec("pyfuse3") is None:
            return "pyfuse3 is not installed beside this Python (the pyfuse3 engine needs it)"
        return super().missing()


class PyunionfsAll(Pyunionfs):
    """pyunionfs with ``-o passthrough=all``: big lower files read by the kernel itself."""

    name = "pyunionfs-all"
    engine_options = ("passthrough=all",)


class PyunionfsUring(Pyunionfs):
    """pyunionfs where the admin allows FUSE over io_uring (``fuse.enable_uring=1``): requests on the caller's CPU.

    The module parameter is off by default and is global; it is set only while this system's mount
    command runs and put back at once (a connection that agreed io_uring at INIT keeps it), so every
    other system, the default ``pyunionfs`` included, runs with the machine's own setting.
    """

    name = "pyunionfs-uring"
    PARAMETER = Path("/sys/module/fuse/parameters/enable_uring")

    def missing(self) -> str | None:
        if not os.access(self.PARAMETER, os.W_OK):
            return f"{self.PARAMETER} is missing or not writable (Linux 6.14+ with CONFIG_FUSE_IO_URING, as root)"
        return super().missing()

    def _start(self, lower: Path, upper: Path, work: Path, mnt: Path, extra: Sequence[str]) -> None:
        before = self.PARAMETER.read_text().strip()
        self.PARAMETER.write_text("1")
        try:
            super()._start(lower, upper, work, mnt, extra)
        finally:
            self.PARAMETER.write_text("1" if before == "Y" else "0")


ALL: list[System] = [
    Plain(),
    KernelOverlay(),
    FuseOverlayfs(),
    UnionfsFuse(),
    Pyunionfs(),
    PyunionfsPyfuse3(),
    PyunionfsAll(),
    PyunionfsUring(),
]
BY_NAME = {s.name: s for s in ALL}
KERNEL = "overlay"
REFERENCE_FUSE = "fuse-overlayfs"
SUBJECT = "pyunionfs"  # the system the bench is about: pyunionfs as it mounts by default
#: Every pyunionfs engine and mode: each gets ratio columns in the report.
SUBJECTS = (SUBJECT, "pyunionfs-pyfuse3", "pyunionfs-all", "pyunionfs-uring")
