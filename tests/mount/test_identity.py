"""Objects, not paths: a request about an inode reaches that inode, whatever its name now shows.

Why: the kernel talks to a FUSE daemon about node ids.  Once a name has
been unlinked, or another file renamed over it, an old descriptor, an
``O_PATH`` handle or a ``/proc/self/fd/N`` link still stands for the *old*
file.  A daemon that answers such a request by the node's last known path
reaches whatever file now has that name: it sets an xattr or an ACL on it,
chmods it, opens it with root's rights for a user who was only allowed to
open the old one.  The kernel's overlayfs keeps objects, so it is the
oracle: every scenario runs on it first (its answers are asserted where the
specification fixes them) and then on pyunionfs, which must answer the same.

Also here, because they are the same kind of mistake (the daemon's file
is not what the kernel thinks it is): flags changed on an open file with
``fcntl(F_SETFL)``, ``O_DIRECT`` with its alignment rules, and POSIX ACLs,
whose effect on the mode and on permission checks must be what the kernel
shows at once.

Lower hardlinks are compared with the kernel mounted ``-o index=on``: that
is the mode in which the kernel keeps two names of a lower inode one file,
which pyunionfs always does (see test_write_links.py).

The races at the end are bounded stress tests: a few seconds on pyunionfs,
a one-second run on the kernel only to prove that the checker reports
nothing on a filesystem that keeps objects (the kernel's answers do not
depend on timing, so a longer run there would only cost time).
"""

from __future__ import annotations

import collections
import ctypes
import fcntl
import hashlib
import mmap
import os
import random
import resource
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.mounting import Daemon
from tests.support.writecheck import (
    errname,
    errno_of,
    on_kernel_and_ours,
    public_dir,
    put,
    run_as,
)

Mount = Callable[..., Daemon]
Obs = dict[str, Any]

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

#: POSIX ACL entry tags and the "no id" value of the xattr format (include/uapi/linux/posix_acl_xattr.h).
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
NO_ID = 0xFFFFFFFF
ACCESS_ACL = "system.posix_acl_access"
DEFAULT_ACL = "system.posix_acl_default"


def acl(*entries: tuple[int, int, int]) -> bytes:
    """The value of a ``system.posix_acl_*`` xattr: version 2, then (tag u16, perm u16, id u32) entries.

    Why by hand: the acl package (setfacl) is not installed here; the
    kernel takes this format from setxattr(2) directly.  Entries must be
    given in the kernel's order (user::, user:N, group::, group:N, mask::,
    other::).
    """
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


def attempt(fn: Callable[..., Any], *args: Any) -> Any:
    """What *fn* returned (``"ok"`` for None), or the errno name it failed with: comparable between mounts."""
    try:
        value = fn(*args)
    except OSError as exc:
        return errname(exc.errno or -1)
    return "ok" if value is None else value


def user_xattrs(names: list[str]) -> list[str]:
    """The ``user.*`` names of a listxattr answer (the ones the scenarios set), sorted."""
    return sorted(n for n in names if n.startswith("user."))


def mode_of(p: Path | str, follow: bool = False) -> str:
    return oct(stat.S_IMODE(os.stat(p, follow_symlinks=follow).st_mode))


def fd_mode(fd: int) -> str:
    return oct(stat.S_IMODE(os.fstat(fd).st_mode))


def mode_and_data(p: Path) -> tuple[str, bytes]:
    return mode_of(p), p.read_bytes()


def owner_and_mode(p: Path) -> tuple[int, str]:
    return os.stat(p).st_uid, mode_of(p)


def make_file(p: Path | str, data: bytes, mode: int) -> None:
    """Create *p* with *mode* from the start (a secret is never readable by others, not even for a moment)."""
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def differences(kernel: Obs, ours: Obs) -> str:
    """One line per key whose value differs, for assertion messages."""
    keys = list(kernel) + [k for k in ours if k not in kernel]
    return "\n".join(f"  {k}:\n    kernel    {kernel.get(k)!r}\n    pyunionfs {ours.get(k)!r}"
                     for k in keys if kernel.get(k) != ours.get(k))


_ON_FD_AS_USER = r"""
import errno, os, sys
os.setgroups([])
os.setgid(1000)
os.setuid(1000)
fd, name, value = int(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[3])
try:
    os.setxattr(fd, name, value)
    print("ok")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"""


def setxattr_as_user(fd: int, name: str, value: bytes) -> str:
    """``fsetxattr(fd, name, value)`` by uid/gid 1000 on a descriptor root opened: ``ok`` or the errno name.

    Why a child that inherits the descriptor: fsetxattr checks the caller's
    rights against the file the descriptor stands for, not against the
    opener's, so root can open and replace while uid 1000 makes the call.
    """
    res = subprocess.run([sys.executable, "-c", _ON_FD_AS_USER, str(fd), name, value.hex()],
                         pass_fds=(fd,), capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"the step as uid 1000 failed:\n{res.stderr}"
    return res.stdout.strip()


def replace(m: Path, name: str, how: str, data: bytes = b"the new file at the name\n", mode: int = 0o644) -> None:
    """Make *name* show another file: unlink it and create a new one, or rename a new one over it."""
    if how == "unlink":
        os.unlink(m / name)
        make_file(m / name, data, mode)
    else:
        make_file(m / "replacement", data, mode)
        os.rename(m / "replacement", m / name)


# --------------------------------------------------------------------------
# xattrs through a descriptor whose name now shows another file
# --------------------------------------------------------------------------


def _xattr_lower(low: Path) -> None:
    put(low / "f", "the lower f\n")


def _xattr_story(m: Path, where: str, how: str) -> Obs:
    """Open f, replace the name, then set/get/list/remove a user xattr through the old descriptor."""
    if where == "upper":
        os.unlink(m / "f")
        put(m / "f", "an upper-only f\n")
    fd = os.open(m / "f", os.O_RDONLY)
    try:
        ino = os.fstat(fd).st_ino
        replace(m, "f", how)
        obs: Obs = {"set through old fd": attempt(os.setxattr, fd, "user.x", b"1")}
        obs["get through old fd"] = attempt(os.getxattr, fd, "user.x")
        obs["list through old fd"] = attempt(lambda: user_xattrs(os.listxattr(fd)))
        obs["get on the new f"] = attempt(os.getxattr, m / "f", "user.x")
        obs["list on the new f"] = attempt(lambda: user_xattrs(os.listxattr(m / "f")))
        obs["remove through old fd"] = attempt(os.removexattr, fd, "user.x")
        obs["old fd after remove"] = attempt(lambda: user_xattrs(os.listxattr(fd)))
        obs["new f after remove"] = attempt(lambda: user_xattrs(os.listxattr(m / "f")))
        obs["old fd: same inode, size"] = attempt(lambda: (os.fstat(fd).st_ino == ino, os.fstat(fd).st_size))
        obs["old fd data"] = attempt(os.pread, fd, 100, 0)
        obs["new f data"] = attempt((m / "f").read_bytes)
    finally:
        os.close(fd)
    return obs


@pytest.mark.parametrize("how", ["unlink", "rename"])
@pytest.mark.parametrize("where", ["lower", "upper"])
def test_xattrs_through_an_old_descriptor_reach_the_old_file(tmp_path: Path, mount: Mount, where: str,
                                                             how: str) -> None:
    """fsetxattr/fgetxattr/flistxattr/fremovexattr on a replaced file's fd never touch the new file at its name.

    The kernel's answers, which pyunionfs must give too: an upper file
    keeps its xattrs through the descriptor; an unlinked *lower* file
    cannot be copied up any more (the copy-up would land on the name,
    which is taken: EEXIST) and shows no xattr.  Either way the new file
    at the name never gets one.
    """
    results = on_kernel_and_ours(tmp_path, mount, _xattr_lower, lambda m: _xattr_story(m, where, how))
    k, p = results["kernel"], results["pyunionfs"]
    assert k["get on the new f"] == "ENODATA" and k["list on the new f"] == [], k
    assert k["old fd: same inode, size"][0] and k["new f data"] == b"the new file at the name\n", k
    if where == "upper":
        assert (k["set through old fd"], k["get through old fd"], k["list through old fd"]) == ("ok", b"1", ["user.x"])
        assert k["remove through old fd"] == "ok" and k["old fd after remove"] == [], k
    else:
        assert (k["set through old fd"], k["get through old fd"], k["list through old fd"]) == ("EEXIST", "ENODATA", [])
    assert p == k, f"xattrs through the old descriptor of a {where} file ({how}) differ:\n{differences(k, p)}"


def _acl_lower(low: Path) -> None:
    put(low / "mine", "uid 1000's lower file\n", 0o644)
    os.chown(low / "mine", 1000, 1000)
    put(low / "control", "anyone may read this\n", 0o644)


#: uid 1000 opens its own file to everyone: user::rw- group::rw- other::rw- (mode 0666).
_OPEN_ACL = acl((USER_OBJ, 6, NO_ID), (GROUP_OBJ, 6, NO_ID), (OTHER, 6, NO_ID))


def _acl_story(m: Path) -> Obs:
    """uid 1000 sets an ACL through descriptors of its files after root put 0600 files at their names."""
    put(m / "mine-up", "uid 1000's upper file\n", 0o644)
    os.chown(m / "mine-up", 1000, 1000)
    obs: Obs = {}
    for name in ("mine", "mine-up"):
        fd = os.open(m / name, os.O_RDONLY)
        try:
            os.unlink(m / name)
            make_file(m / name, b"root's secret\n", 0o600)  # as root
            obs[f"{name}: ACL through old fd as 1000"] = setxattr_as_user(fd, ACCESS_ACL, _OPEN_ACL)
            obs[f"{name}: old fd mode"] = attempt(fd_mode, fd)
        finally:
            os.close(fd)
        obs[f"{name}: new file"] = attempt(owner_and_mode, m / name)
        obs[f"{name}: new file's ACL"] = attempt(os.getxattr, m / name, ACCESS_ACL)
    obs["as 1000"] = run_as(1000, 1000, m, """
out["read mine"] = err(open, m + "/mine")
out["read mine-up"] = err(open, m + "/mine-up")
out["read control"] = err(open, m + "/control")
""")
    return obs


def test_acl_set_through_an_old_descriptor_never_opens_roots_new_file(tmp_path: Path, mount: Mount) -> None:
    """uid 1000's ACL set through the fd of its replaced file leaves root's new 0600 file at the name alone.

    Why it matters: the kernel lets the owner of the *old* file set its
    ACL; a daemon that goes by the name would write that ACL (and the mode
    it implies) onto root's file, and uid 1000 could then read it.
    """
    with public_dir() as pub:
        results = on_kernel_and_ours(tmp_path, mount, _acl_lower, _acl_story, pub)
    k, p = results["kernel"], results["pyunionfs"]
    for name in ("mine", "mine-up"):
        assert k[f"{name}: new file"] == (0, "0o600"), k
        assert k[f"{name}: new file's ACL"] == "ENODATA", k
    assert k["as 1000"] == {"read mine": "EACCES", "read mine-up": "EACCES", "read control": "ok"}, k
    assert k["mine-up: ACL through old fd as 1000"] == "ok" and k["mine-up: old fd mode"] == "0o666", k
    assert k["mine: ACL through old fd as 1000"] == "EEXIST", k  # an unlinked lower file cannot be copied up
    for side in ("kernel", "pyunionfs"):
        on_disk = {n: mode_of(tmp_path / side / "up" / n) for n in ("mine", "mine-up")}
        assert on_disk == {"mine": "0o600", "mine-up": "0o600"}, f"{side}: root's new files in the upper: {on_disk}"
    assert p == k, f"an ACL set through an old descriptor:\n{differences(k, p)}"


# --------------------------------------------------------------------------
# Lower hardlinks: the descriptor of an unlinked name stands for the file, which lives on
# --------------------------------------------------------------------------


def _links_lower(low: Path) -> None:
    put(low / "a", "one file, two names\n")
    os.link(low / "a", low / "b")


def _links_story(m: Path) -> Obs:
    fd = os.open(m / "a", os.O_RDONLY)
    try:
        os.unlink(m / "a")
        obs: Obs = {"set through a's fd": attempt(os.setxattr, fd, "user.x", b"1")}
        obs["get through a's fd"] = attempt(os.getxattr, fd, "user.x")
        obs["get on b"] = attempt(os.getxattr, m / "b", "user.x")
        obs["lstat a"] = errname(errno_of(os.lstat, m / "a"))
        obs["nlink: fd, b"] = attempt(lambda: (os.fstat(fd).st_nlink, os.lstat(m / "b").st_nlink))
        obs["same inode"] = attempt(lambda: os.fstat(fd).st_ino == os.lstat(m / "b").st_ino)
        obs["b data"] = attempt((m / "b").read_bytes)
    finally:
        os.close(fd)
    return obs


def test_xattr_through_an_unlinked_lower_hardlink_lands_on_the_surviving_name(tmp_path: Path,
                                                                              mount: Mount) -> None:
    """a and b are one lower file: after unlink(a), an xattr set through a's descriptor shows on b."""
    results = on_kernel_and_ours(tmp_path, mount, _links_lower, _links_story, kernel_options=["index=on"])
    k, p = results["kernel"], results["pyunionfs"]
    assert k["set through a's fd"] == "ok" and k["get on b"] == b"1" and k["get through a's fd"] == b"1", k
    assert k["nlink: fd, b"] == (1, 1) and k["same inode"], k
    assert p == k, f"an xattr through the descriptor of an unlinked lower hardlink:\n{differences(k, p)}"


# --------------------------------------------------------------------------
# Reopening /proc/self/fd/N
# --------------------------------------------------------------------------


def _reopen_lower(low: Path) -> None:
    put(low / "f", "the old f, lower\n")


def _reopen(fd: int, flags: int, data: bytes | None = None) -> Any:
    new = os.open(f"/proc/self/fd/{fd}", flags)
    try:
        return os.pread(new, 100, 0) if data is None else os.pwrite(new, data, 0)
    finally:
        os.close(new)


def _reopen_story(m: Path, where: str) -> Obs:
    """Open f read-only, rename g over f, reopen the descriptor through /proc, read and write."""
    if where == "upper":
        os.unlink(m / "f")
        put(m / "f", "the old f, upper\n")
    fd = os.open(m / "f", os.O_RDONLY)
    try:
        put(m / "g", "g, renamed over f\n")
        os.rename(m / "g", m / "f")
        obs: Obs = {"reopen O_RDONLY, read": attempt(_reopen, fd, os.O_RDONLY)}
        obs["reopen O_RDWR, write"] = attempt(_reopen, fd, os.O_RDWR, b"CHANGED")
        obs["old fd reads"] = attempt(os.pread, fd, 100, 0)
        obs["f reads"] = attempt((m / "f").read_bytes)
    finally:
        os.close(fd)
    return obs


@pytest.mark.parametrize("where", ["lower", "upper"])
def test_reopening_proc_fd_opens_the_old_file(tmp_path: Path, mount: Mount, where: str) -> None:
    """open("/proc/self/fd/N") after a rename over the name opens the file N stands for, not the new one.

    Writing an unlinked *lower* file would need a copy-up onto a name that
    is taken: the kernel refuses with EEXIST (and never writes the new f).
    """
    results = on_kernel_and_ours(tmp_path, mount, _reopen_lower, lambda m: _reopen_story(m, where))
    k, p = results["kernel"], results["pyunionfs"]
    old = f"the old f, {where}\n".encode()
    assert k["reopen O_RDONLY, read"] == old and k["f reads"] == b"g, renamed over f\n", k
    if where == "upper":
        assert k["reopen O_RDWR, write"] == 7 and k["old fd reads"] == b"CHANGED" + old[7:], k
    else:
        assert k["reopen O_RDWR, write"] == "EEXIST" and k["old fd reads"] == old, k
    assert p == k, f"reopening /proc/self/fd of a replaced {where} file:\n{differences(k, p)}"


# --------------------------------------------------------------------------
# chmod through an O_PATH descriptor
# --------------------------------------------------------------------------


def _opath_lower(low: Path) -> None:
    put(low / "h1", "one lower file, names h1 and h2\n", 0o644)
    os.link(low / "h1", low / "h2")


def _opath_story(m: Path) -> Obs:
    """Hold h1 and an upper file u by O_PATH, replace both names by root's 0600 files, chmod via /proc."""
    put(m / "u", "an upper file\n", 0o644)
    held = {name: os.open(m / name, os.O_PATH) for name in ("h1", "u")}  # h2 is never looked up before the chmod
    obs: Obs = {}
    try:
        for name, fd in held.items():
            os.unlink(m / name)
            make_file(m / name, b"root's new file\n", 0o600)
            obs[f"chmod {name} via /proc"] = errname(errno_of(os.chmod, f"/proc/self/fd/{fd}", 0o666))
            obs[f"held {name} mode"] = attempt(fd_mode, fd)
            obs[f"new {name}"] = attempt(mode_and_data, m / name)
        obs["h2"] = attempt(mode_and_data, m / "h2")
    finally:
        for fd in held.values():
            os.close(fd)
    return obs


def test_chmod_through_an_o_path_descriptor_changes_the_held_file(tmp_path: Path, mount: Mount) -> None:
    """chmod("/proc/self/fd/N") on an O_PATH handle of an unlinked name changes that file, never the new one."""
    results = on_kernel_and_ours(tmp_path, mount, _opath_lower, _opath_story, kernel_options=["index=on"])
    k, p = results["kernel"], results["pyunionfs"]
    assert k == {"chmod h1 via /proc": "ok", "held h1 mode": "0o666", "new h1": ("0o600", b"root's new file\n"),
                 "chmod u via /proc": "ok", "held u mode": "0o666", "new u": ("0o600", b"root's new file\n"),
                 "h2": ("0o666", b"one lower file, names h1 and h2\n")}, k
    assert p == k, f"chmod through an O_PATH descriptor:\n{differences(k, p)}"


# --------------------------------------------------------------------------
# fcntl(F_SETFL) changes O_APPEND on an open file
# --------------------------------------------------------------------------


def _digits_lower(low: Path) -> None:
    for name in ("lo-clear", "lo-set"):
        put(low / name, "0123456789")


def _setfl_story(m: Path) -> Obs:
    for name in ("up-clear", "up-set"):
        put(m / name, "0123456789")
    obs: Obs = {}
    for where in ("lo", "up"):
        fd = os.open(m / f"{where}-clear", os.O_WRONLY | os.O_APPEND)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, 0)
            obs[f"{where}: append cleared, pwrite at 0"] = attempt(os.pwrite, fd, b"AB", 0)
            obs[f"{where}-clear after pwrite"] = (m / f"{where}-clear").read_bytes()
            obs[f"{where}: then write"] = attempt(os.write, fd, b"cd")  # at the file position, still 0
        finally:
            os.close(fd)
        obs[f"{where}-clear after write"] = (m / f"{where}-clear").read_bytes()
        fd = os.open(m / f"{where}-set", os.O_WRONLY)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND)
            obs[f"{where}: append set"] = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)
            obs[f"{where}: write"] = attempt(os.write, fd, b"XY")
        finally:
            os.close(fd)
        obs[f"{where}-set"] = (m / f"{where}-set").read_bytes()
    return obs


def test_fcntl_setfl_changes_o_append_of_an_open_file(tmp_path: Path, mount: Mount) -> None:
    """Clearing O_APPEND with F_SETFL makes pwrite write at its offset; setting it makes write append."""
    results = on_kernel_and_ours(tmp_path, mount, _digits_lower, _setfl_story)
    k, p = results["kernel"], results["pyunionfs"]
    for where in ("lo", "up"):
        assert k[f"{where}-clear after pwrite"] == b"AB23456789", k
        assert k[f"{where}-clear after write"] == b"cd23456789", k
        assert k[f"{where}: append set"] and k[f"{where}-set"] == b"0123456789XY", k
    assert p == k, f"O_APPEND changed by fcntl(F_SETFL):\n{differences(k, p)}"


# --------------------------------------------------------------------------
# O_DIRECT
# --------------------------------------------------------------------------

#: Four full blocks and a partial one: direct reads at the end come back short.
_DIRECT_SIZE = 4 * 4096 + 1000


def _direct_data(name: str) -> bytes:
    return random.Random(name).randbytes(_DIRECT_SIZE)


def _direct_lower(low: Path) -> None:
    for name in ("lo", "lo-dd"):
        put(low / name, _direct_data(name))


def _records(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "records" in line]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _direct_story(m: Path) -> Obs:
    for name in ("up", "up-dd"):
        put(m / name, _direct_data(name))
    obs: Obs = {}
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    for where in ("lo", "up"):
        p = m / where
        r = subprocess.run(["dd", f"if={p}", "of=/dev/null", "iflag=direct", "bs=4096"],
                           capture_output=True, text=True, timeout=30)
        obs[f"{where}: dd iflag=direct"] = (r.returncode, _records(r.stderr))
        d = m / f"{where}-dd"
        r = subprocess.run(["dd", "if=/dev/zero", f"of={d}", "oflag=direct", "bs=4096", "count=4"],
                           capture_output=True, text=True, timeout=30)
        obs[f"{where}: dd oflag=direct"] = (r.returncode, _records(r.stderr))
        obs[f"{where}-dd after"] = _sha(d.read_bytes())
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        try:
            obs[f"{where}: preadv at 4096"] = (attempt(os.preadv, fd, [buf], 4096), _sha(buf[:]))
            obs[f"{where}: preadv at the tail"] = (attempt(os.preadv, fd, [buf], 4 * 4096), _sha(buf[:1000]))
            obs[f"{where}: preadv past the end"] = attempt(os.preadv, fd, [buf], 8 * 4096)
            os.lseek(fd, 8192, os.SEEK_SET)
            obs[f"{where}: readv at 8192"] = (attempt(os.readv, fd, [buf]), _sha(buf[:]))
        finally:
            os.close(fd)
        fd = os.open(p, os.O_RDWR | os.O_DIRECT)
        try:
            buf[:] = b"Z" * 4096
            obs[f"{where}: pwrite at 4096"] = attempt(os.pwrite, fd, buf, 4096)
        finally:
            os.close(fd)
        data = p.read_bytes()
        obs[f"{where} after"] = (len(data), _sha(data))
    buf.close()
    return obs


def test_o_direct_reads_and_writes_match_the_kernel(tmp_path: Path, mount: Mount) -> None:
    """dd iflag/oflag=direct and aligned O_DIRECT preadv/readv/pwrite give the kernel's results and data."""
    results = on_kernel_and_ours(tmp_path, mount, _direct_lower, _direct_story)
    k, p = results["kernel"], results["pyunionfs"]
    for where in ("lo", "up"):
        data = bytearray(_direct_data(where))
        assert k[f"{where}: dd iflag=direct"] == (0, ["4+1 records in", "4+1 records out"]), k
        assert k[f"{where}: dd oflag=direct"] == (0, ["4+0 records in", "4+0 records out"]), k
        assert k[f"{where}-dd after"] == _sha(bytes(4 * 4096)), k
        assert k[f"{where}: preadv at 4096"] == (4096, _sha(bytes(data[4096:8192]))), k
        assert k[f"{where}: preadv at the tail"] == (1000, _sha(bytes(data[16384:]))), k
        assert k[f"{where}: preadv past the end"] == 0, k
        assert k[f"{where}: pwrite at 4096"] == 4096, k
        data[4096:8192] = b"Z" * 4096
        assert k[f"{where} after"] == (_DIRECT_SIZE, _sha(bytes(data))), k
    assert p == k, f"O_DIRECT:\n{differences(k, p)}"


# --------------------------------------------------------------------------
# POSIX ACLs: the mode and the permission checks follow them at once
# --------------------------------------------------------------------------

#: "setfacl -m o::-" on a 0644 file: user::rw- group::r-- other::--- (mode 0640).
_NO_OTHER = acl((USER_OBJ, 6, NO_ID), (GROUP_OBJ, 4, NO_ID), (OTHER, 0, NO_ID))
#: "setfacl -m u:1000:-" on a 0644 file: a named entry denies uid 1000; mask r--, so the mode stays 0644.
_DENY_1000 = acl((USER_OBJ, 6, NO_ID), (USER, 0, 1000), (GROUP_OBJ, 4, NO_ID), (MASK, 4, NO_ID), (OTHER, 4, NO_ID))


#: name -> ACL value, for the ACL scenarios.
_ACLS = {"no-other": _NO_OTHER, "deny-1000": _DENY_1000}


def _acl_files_lower(low: Path) -> None:
    for kind in _ACLS:
        put(low / f"lo-{kind}", f"lo-{kind}\n", 0o644)
    put(low / "control", "anyone may read this\n", 0o644)


def _acl_files_story(m: Path, kind: str) -> Obs:
    """Set the ACL *kind* on a lower and an upper 0644 file (whose mode the kernel has cached), look, try as 1000."""
    put(m / f"up-{kind}", f"up-{kind}\n", 0o644)
    obs: Obs = {}
    for where in ("lo", "up"):
        name = f"{where}-{kind}"
        os.stat(m / name)  # the kernel has the old mode in its caches
        obs[f"set {where}"] = attempt(os.setxattr, m / name, ACCESS_ACL, _ACLS[kind])
        obs[f"mode {where}"] = mode_of(m / name)
        obs[f"ACL {where}"] = attempt(os.getxattr, m / name, ACCESS_ACL)
    obs["as 1000"] = run_as(1000, 1000, m, f"""
for name in ("lo-{kind}", "up-{kind}", "control"):
    out[name] = err(open, m + "/" + name)
""")
    return obs


def test_an_acl_changes_mode_and_access_at_once(tmp_path: Path, mount: Mount) -> None:
    """After an ACL "o::-" (set through system.posix_acl_access), stat shows 0640 at once and uid 1000 is refused.

    Why: the ACL changes the mode; the kernel must not keep showing (and
    checking against) the cached 0644.
    """
    with public_dir() as pub:
        results = on_kernel_and_ours(tmp_path, mount, _acl_files_lower,
                                     lambda m: _acl_files_story(m, "no-other"), pub)
    k, p = results["kernel"], results["pyunionfs"]
    for where in ("lo", "up"):
        assert k[f"set {where}"] == "ok" and k[f"mode {where}"] == "0o640", k
        assert k[f"ACL {where}"] == "ENODATA", k  # a minimal ACL is kept as the mode alone
    assert k["as 1000"] == {"lo-no-other": "EACCES", "up-no-other": "EACCES", "control": "ok"}, k
    assert p == k, f"an ACL equivalent to a chmod:\n{differences(k, p)}"


def test_a_named_acl_entry_is_enforced(tmp_path: Path, mount: Mount) -> None:
    """An ACL entry "u:1000:-" on a 0644 file refuses uid 1000 although the mode bits would let it read.

    Why: the mode (0644, mask r--) does not show the entry, so a permission
    check by mode bits alone lets uid 1000 in where the kernel's overlayfs
    (like any filesystem with ACLs) refuses it.
    """
    with public_dir() as pub:
        results = on_kernel_and_ours(tmp_path, mount, _acl_files_lower,
                                     lambda m: _acl_files_story(m, "deny-1000"), pub)
    k, p = results["kernel"], results["pyunionfs"]
    for where in ("lo", "up"):
        assert k[f"set {where}"] == "ok" and k[f"mode {where}"] == "0o644" and k[f"ACL {where}"] == _DENY_1000, k
    assert k["as 1000"] == {"lo-deny-1000": "EACCES", "up-deny-1000": "EACCES", "control": "ok"}, k
    assert p == k, f"an ACL with a named user entry:\n{differences(k, p)}"


def test_noacl_leaves_permission_checks_to_the_mode_bits(tmp_path: Path, mount: Mount) -> None:
    """``-o noacl`` (fuse-overlayfs's option): the same named entry is stored but not enforced."""
    with public_dir() as pub:
        low, up, mnt = tmp_path / "low", tmp_path / "up", pub / "mnt"
        for d in (low, up, mnt):
            d.mkdir()
        _acl_files_lower(low)
        d = mount([low], up, "noacl", mnt=mnt)
        got = _acl_files_story(d.mnt, "deny-1000")
        d.stop()
    assert got["ACL lo"] == got["ACL up"] == _DENY_1000, got
    assert got["as 1000"] == {"lo-deny-1000": "ok", "up-deny-1000": "ok", "control": "ok"}, got


#: user::rwx group::rwx other::rwx as a directory's default ACL: new entries get the mode asked, umask ignored.
_OPEN_DEFAULT = acl((USER_OBJ, 7, NO_ID), (GROUP_OBJ, 7, NO_ID), (OTHER, 7, NO_ID))


def _default_acl_lower(low: Path) -> None:
    (low / "lo-dir").mkdir()
    os.setxattr(low / "lo-dir", DEFAULT_ACL, _OPEN_DEFAULT)
    (low / "plain").mkdir()


def _default_acl_story(m: Path) -> Obs:
    (m / "up-dir").mkdir()
    os.setxattr(m / "up-dir", DEFAULT_ACL, _OPEN_DEFAULT)
    old = os.umask(0o022)
    try:
        obs: Obs = {}
        for d in ("lo-dir", "up-dir", "plain"):
            os.close(os.open(m / d / "file", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            os.mkdir(m / d / "sub", 0o777)
            obs[d] = (mode_of(m / d / "file"), mode_of(m / d / "sub"),
                      attempt(os.getxattr, m / d / "sub", DEFAULT_ACL))
    finally:
        os.umask(old)
    return obs


def test_a_default_acl_overrides_the_umask_of_new_entries(tmp_path: Path, mount: Mount) -> None:
    """Under a directory with a default ACL, create(0666) and mkdir(0777) with umask 022 keep 0666 and 0777."""
    results = on_kernel_and_ours(tmp_path, mount, _default_acl_lower, _default_acl_story)
    k, p = results["kernel"], results["pyunionfs"]
    for d in ("lo-dir", "up-dir"):
        assert k[d] == ("0o666", "0o777", _OPEN_DEFAULT), k
    assert k["plain"] == ("0o644", "0o755", "ENODATA"), k
    assert p == k, f"modes under a default ACL:\n{differences(k, p)}"


# --------------------------------------------------------------------------
# Races: the name moves on while requests about the old object are in flight
# --------------------------------------------------------------------------

#: Seconds each race runs: long on pyunionfs, a sanity run on the kernel (see the module docstring).
_RACE_SECONDS = {"kernel": 1.0, "pyunionfs": 5.0}


def _durations() -> Callable[[], float]:
    """The run length for each call of a story: on_kernel_and_ours runs the kernel first, then pyunionfs."""
    it = iter((_RACE_SECONDS["kernel"], _RACE_SECONDS["pyunionfs"]))
    return lambda: next(it)


def _run_workers(workers: list[Callable[[Callable[[], bool]], None]], seconds: float) -> list[str]:
    """Run each worker(stop) in a thread for *seconds*; return what they raised (formatted)."""
    deadline = time.monotonic() + seconds
    failures: list[str] = []

    def wrap(fn: Callable[[Callable[[], bool]], None]) -> None:
        try:
            fn(lambda: time.monotonic() > deadline)
        except BaseException as exc:  # reported by the test, not lost in a thread
            failures.append(f"{fn.__name__}: {exc!r}")

    threads = [threading.Thread(target=wrap, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 30)
    failures += [f"thread {t.name} did not finish" for t in threads if t.is_alive()]
    return failures


def _fresh(m: Path, tmp: str, content: Callable[[int], bytes] | None = None, mode: int = 0o644) -> None:
    """Create *tmp*; its content (if given) is made from its own inode number as the mount shows it."""
    fd = os.open(m / tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        if content is not None:
            os.write(fd, content(os.fstat(fd).st_ino))
    finally:
        os.close(fd)


def _ino_readers_story(m: Path, seconds: float) -> Obs:
    """Three readers open r and compare fstat's inode with the one written in the content; two renamers."""
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def named(ino: int) -> bytes:
        return b"%d\n" % ino

    _fresh(m, "first", named)
    os.rename(m / "first", m / "r")  # over the lower r

    def renamer(k: int) -> Callable[[Callable[[], bool]], None]:
        def rename_over_r(stop: Callable[[], bool]) -> None:
            i = 0
            while not stop():
                tmp = f"t{k}-{i}"
                _fresh(m, tmp, named)
                os.rename(m / tmp, m / "r")
                i += 1
            with lock:
                counts["renames"] += i
        return rename_over_r

    def reader(stop: Callable[[], bool]) -> None:
        local: collections.Counter[str] = collections.Counter()
        while not stop():
            try:
                fd = os.open(m / "r", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                local[f"open {errname(exc.errno or -1)}"] += 1
                continue
            try:
                ino = os.fstat(fd).st_ino
                data = os.pread(fd, 100, 0)
            except OSError as exc:
                local[f"read {errname(exc.errno or -1)}"] += 1
                continue
            finally:
                os.close(fd)
            local["reads"] += 1
            if data != named(ino):
                local["mismatches"] += 1
        with lock:
            counts.update(local)

    failures = _run_workers([renamer(0), renamer(1), reader, reader, reader], seconds)
    return {"failures": failures, "counts": dict(counts)}


def test_race_open_while_files_are_renamed_over_it(tmp_path: Path, mount: Mount) -> None:
    """A reader opening r while renames replace it always reads the file whose inode fstat reports."""
    durations = _durations()
    results = on_kernel_and_ours(tmp_path, mount, lambda low: put(low / "r", "lower r\n"),
                                 lambda m: _ino_readers_story(m, durations()))
    for side in ("kernel", "pyunionfs"):
        got = results[side]
        c = got["counts"]
        assert not got["failures"], f"{side}: {got['failures']}"
        assert c.get("reads", 0) > 0 and c.get("renames", 0) > 0, f"{side}: the race did not run: {c}"
        errors = {key: n for key, n in c.items() if key not in ("reads", "renames", "mismatches")}
        assert c.get("mismatches", 0) == 0 and not errors, (
            f"{side}: {c.get('mismatches', 0)} of {c['reads']} reads got a file other than the one fstat names, "
            f"errors {errors}, over {c['renames']} renames")


#: One record per write: the writer's inode number, fixed width so that records stay aligned.
_REC = 21
_libc = ctypes.CDLL(None, use_errno=True)
AT_EMPTY_PATH, AT_STATX_DONT_SYNC, STATX_INO = 0x1000, 0x4000, 0x100


def cached_ino(fd: int) -> int:
    """The inode number the kernel holds for *fd*, without asking the filesystem: statx(AT_STATX_DONT_SYNC).

    Why not fstat: on FUSE fstat may send GETATTR, and a daemon that went
    by the name would answer it from the file it opened, so a write that
    reached the wrong file would carry that wrong file's number and look
    right.  The kernel's own copy comes from the LOOKUP that found the
    file; on the kernel's overlayfs the flag changes nothing.
    """
    buf = ctypes.create_string_buffer(256)  # struct statx; stx_ino is the u64 at offset 32
    if _libc.statx(fd, b"", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_INO, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return struct.unpack_from("<Q", buf, 32)[0]


def _record(ino: int) -> bytes:
    return b"%020d\n" % ino


#: At most this many replaced files are kept alive by a descriptor (the others by a link): a quarter of
#: the descriptors this process may open, so that neither it nor the daemon runs out.
_HELD_MAX = min(1500, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)


def _ino_writers_story(m: Path, seconds: float) -> Obs:
    """Writers write the inode number of the file they opened as r while a renamer replaces r.

    Why the renamer keeps every r alive: a write that reached the wrong file
    can only be seen if every file that ever was r can still be read
    afterwards.  Every other new file is linked under keep/ before it is
    renamed over r (the old r keeps a name); the rest are held by the
    renamer's descriptor (the old r has no name left, as in the reader
    race).  The number a writer writes is the kernel's
    (:func:`cached_ino`); fstat must agree with it, else the writer counts
    a "fstat disagrees".
    """
    (m / "keep").mkdir()
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    held: dict[int, int] = {}  # descriptor -> inode number, for files kept by a descriptor
    linked: dict[str, int] = {}  # name under keep/ -> inode number

    def new_r(i: int) -> None:
        tmp = f"n{i}"
        fd = os.open(m / tmp, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        ino = cached_ino(fd)
        if i % 2 and len(held) < _HELD_MAX:
            held[fd] = ino
        else:
            os.close(fd)
            os.link(m / tmp, m / "keep" / tmp)
            linked[tmp] = ino
        os.rename(m / tmp, m / "r")

    new_r(0)  # over the lower r

    def rename_over_r(stop: Callable[[], bool]) -> None:
        i = 1
        while not stop():
            new_r(i)
            i += 1
        with lock:
            counts["renames"] += i - 1

    def writer(flags: int) -> Callable[[Callable[[], bool]], None]:
        kind = "append" if flags & os.O_APPEND else "pwrite at 0"

        def write_own_inode(stop: Callable[[], bool]) -> None:
            local: collections.Counter[str] = collections.Counter()
            while not stop():
                try:
                    fd = os.open(m / "r", flags | os.O_CLOEXEC)
                except OSError as exc:
                    local[f"open {errname(exc.errno or -1)}"] += 1
                    continue
                try:
                    ino = cached_ino(fd)
                    if os.fstat(fd).st_ino != ino:
                        local["fstat disagrees"] += 1
                    rec = _record(ino)
                    n = os.write(fd, rec) if flags & os.O_APPEND else os.pwrite(fd, rec, 0)
                    local[kind if n == _REC else f"{kind} short"] += 1
                except OSError as exc:
                    local[f"{kind} {errname(exc.errno or -1)}"] += 1
                finally:
                    os.close(fd)
            with lock:
                counts.update(local)
        return write_own_inode

    try:
        failures = _run_workers([rename_over_r, writer(os.O_WRONLY | os.O_APPEND),
                                 writer(os.O_WRONLY | os.O_APPEND), writer(os.O_RDWR)], seconds)
        contents = [(os.pread(fd, 1 << 20, 0), ino) for fd, ino in held.items()]
        contents += [((m / "keep" / name).read_bytes(), ino) for name, ino in linked.items()]
    finally:
        for fd in held:
            os.close(fd)
    misplaced = garbled = records = 0
    for data, ino in contents:
        own = _record(ino)
        if len(data) % _REC:
            garbled += 1
        for i in range(0, len(data) - len(data) % _REC, _REC):
            records += 1
            rec = data[i : i + _REC]
            if rec != own:
                if rec.endswith(b"\n") and rec[:-1].isdigit():
                    misplaced += 1
                else:
                    garbled += 1
    return {"failures": failures, "counts": dict(counts), "misplaced": misplaced, "garbled": garbled,
            "records": records, "files": (len(held), len(linked))}


def test_race_writes_while_files_are_renamed_over_it(tmp_path: Path, mount: Mount) -> None:
    """Writes through a descriptor of r land in the file the descriptor's fstat names, never in a newer r."""
    durations = _durations()
    results = on_kernel_and_ours(tmp_path, mount, lambda low: put(low / "r", "lower r\n"),
                                 lambda m: _ino_writers_story(m, durations()))
    for side in ("kernel", "pyunionfs"):
        got = results[side]
        c = got["counts"]
        assert not got["failures"], f"{side}: {got['failures']}"
        appends, pwrites = c.get("append", 0), c.get("pwrite at 0", 0)
        assert appends > 0 and pwrites > 0 and c.get("renames", 0) > 0, f"{side}: the race did not run: {c}"
        errors = {key: n for key, n in c.items() if key not in ("append", "pwrite at 0", "renames")}
        summary = (f"{side}: {got['misplaced']} records in a file other than their writer's, {got['garbled']} "
                   f"garbled, {got['records']} records for {appends} appends + {pwrites} pwrites at 0, "
                   f"{c['renames']} renames (files kept by descriptor, by link: {got['files']}), errors {errors}")
        assert got["misplaced"] == 0 and got["garbled"] == 0 and not errors, summary
        # a pwrite at 0 may overwrite an earlier record of the same file; an append is never lost
        assert appends <= got["records"] <= appends + pwrites, summary


_PRIVATE_READER = r"""
import time
deadline = time.monotonic() + float(SECONDS)
seen = {}
while time.monotonic() < deadline:
    try:
        with open(m + "/pub", "rb") as f:
            data = f.read()
    except OSError as e:
        key = errno.errorcode.get(e.errno, str(e.errno))
    else:
        key = "leaked" if data.startswith(b"SECRET") else "public" if data.startswith(b"public") else "other"
    seen[key] = seen.get(key, 0) + 1
out["seen"] = seen
out["control"] = err(open, m + "/control")
"""


def _private_story(m: Path, seconds: float) -> Obs:
    """uid 1000 keeps reading pub while root renames a 0600 file and a 0644 file over it, in turn."""
    put(m / "control", "anyone may read this\n", 0o644)
    stop = threading.Event()
    renames = [0]
    failures: list[str] = []

    def swap() -> None:
        try:
            i = 0
            while not stop.is_set():
                secret = i % 2 == 0
                tmp = f"s{i}"
                make_file(m / tmp, b"SECRET %d\n" % i if secret else b"public %d\n" % i, 0o600 if secret else 0o644)
                os.rename(m / tmp, m / "pub")
                i += 1
            renames[0] = i
        except BaseException as exc:
            failures.append(repr(exc))

    t = threading.Thread(target=swap, daemon=True)
    t.start()
    try:
        out = run_as(1000, 1000, m, _PRIVATE_READER.replace("SECONDS", repr(seconds)), timeout=seconds + 60)
    finally:
        stop.set()
        t.join(timeout=30)
    return {"seen": out["seen"], "control": out["control"], "renames": renames[0], "failures": failures,
            "swapper alive": t.is_alive()}


def test_race_a_user_never_opens_the_private_file_renamed_over_a_public_one(tmp_path: Path,
                                                                            mount: Mount) -> None:
    """uid 1000 opening pub while root renames a 0600 and a 0644 file over it never reads the 0600 one.

    Why: the kernel checks uid 1000's right to open against the inode it
    looked up (0644); a daemon that then opens by name, with root's rights,
    may open the 0600 file that took the name in between.
    """
    durations = _durations()
    with public_dir() as pub:
        results = on_kernel_and_ours(tmp_path, mount, lambda low: put(low / "pub", "public lower\n"),
                                     lambda m: _private_story(m, durations()), pub)
    for side in ("kernel", "pyunionfs"):
        got = results[side]
        seen = got["seen"]
        assert not got["failures"] and not got["swapper alive"], f"{side}: {got}"
        assert got["control"] == "ok", f"{side}: uid 1000 cannot read a 0644 file at all: {got}"
        assert seen.get("public", 0) > 0 and got["renames"] > 0, f"{side}: the race did not run: {got}"
        unexpected = {k: n for k, n in seen.items() if k not in ("public", "EACCES")}
        assert not unexpected, (f"{side}: uid 1000 got {unexpected} ('leaked': it read root's 0600 file) "
                                f"in {sum(seen.values())} opens ({seen}) over {got['renames']} renames")
