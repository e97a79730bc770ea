"""pyunionfs.fuse.transport against the real kernel: mount, serve, unmount, refuse.

Each test mounts for real and answers the kernel with a tiny responder thread:
INIT with a minimal ``fuse_init_out``, GETATTR of the root with a directory,
STATFS with zeros, ENOSYS to anything else (FORGETs get no reply).  Its byte
layouts are written out here rather than taken from the protocol module, so
that the transport is checked on its own.  Every mount is undone in a
``finally``; the user and user-namespace cases run in a child process inside a
private mount namespace, which takes any leftover mount with it when it ends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyunionfs.config import MountConfig
from pyunionfs.errors import MountError
from pyunionfs.fuse.transport import (
    READ_AGAIN,
    READ_UNMOUNTED,
    MountOptions,
    Session,
    open_session,
    read_request,
    request_buffer_size,
    write_reply,
)
from tests.support.writecheck import public_dir

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing: no FUSE here"),
]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting with mount(2) and dropping to uid 1000 need root")

MAX_WRITE = 128 * 1024
REPO = Path(__file__).resolve().parents[2]

# The few layouts of include/uapi/linux/fuse.h the responder needs.
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write,
# time_gran, max_pages, map_alignment, flags2, max_stack_depth, 6 x u32 unused
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
# attr_valid, attr_valid_nsec, dummy; fuse_attr: ino, size, blocks, atime, mtime, ctime,
# atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags
ATTR_OUT = struct.Struct("<QII" "QQQQQQ" "IIIIIIIIII")
STATFS_OUT_SIZE = 80
OP_FORGET, OP_GETATTR, OP_STATFS, OP_INIT, OP_BATCH_FORGET = 2, 3, 17, 26, 42


def answer(request: memoryview) -> list[bytes] | None:
    """The reply to one request, as writev parts; None for the requests that get none."""
    _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(request)
    if opcode in (OP_FORGET, OP_BATCH_FORGET):
        return None
    if opcode == OP_INIT:
        _, minor, max_readahead, _ = INIT_IN.unpack_from(request, IN_HEADER.size)
        body = INIT_OUT.pack(7, minor, max_readahead, 0, 0, 0, MAX_WRITE, 0, 0, 0, 0, 0)
    elif opcode == OP_GETATTR and nodeid == 1:
        body = ATTR_OUT.pack(0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o755, 2,
                             os.getuid(), os.getgid(), 0, 4096, 0)
    elif opcode == OP_STATFS:
        body = bytes(STATFS_OUT_SIZE)
    else:
        return [OUT_HEADER.pack(OUT_HEADER.size, -errno.ENOSYS, unique)]
    return [OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique), body]


class Responder(threading.Thread):
    """Serves one fd until its read says the session ended; records what it saw."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)  # never keeps the test process alive
        self.fd = fd
        self.opcodes: list[int] = []
        self.ended: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        buf = bytearray(request_buffer_size(MAX_WRITE))
        try:
            while True:
                n = read_request(self.fd, buf)
                if n <= 0:
                    self.ended = n
                    return
                request = memoryview(buf)[:n]
                self.opcodes.append(IN_HEADER.unpack_from(request)[1])
                reply = answer(request)
                if reply is not None:
                    write_reply(self.fd, reply)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    def wait_end(self) -> int | None:
        self.join(5)
        assert self.error is None, self.error
        assert not self.is_alive(), "the responder's read did not end"
        return self.ended


def mount_entry(mnt: Path) -> tuple[str, str, set[str]] | None:
    """(source, type, options) of the top mount at *mnt* in /proc/self/mounts."""
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            source, point, fstype, options, *_ = line.split()
            if point == str(mnt):
                found = (source, fstype, set(options.split(",")))
    return found


@contextlib.contextmanager
def served(mnt: Path, options: MountOptions | None = None, serve: bool = True) -> Iterator[tuple[Session, Responder]]:
    """A live mount with a responder on its fd, unmounted and closed whatever happens."""
    session = open_session(os.fsencode(mnt), options)
    responder = Responder(session.fd)
    try:
        if serve:
            responder.start()
        yield session, responder
    finally:
        try:
            if mount_entry(mnt) is not None:
                session.unmount(lazy=True)
            if responder.is_alive():
                responder.join(5)
        finally:
            session.close()
        assert mount_entry(mnt) is None


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@needs_root
def test_a_root_mount_serves_a_directory_and_shows_the_default_options(mnt: Path) -> None:
    with served(mnt) as (session, responder):
        st = os.stat(mnt)
        assert stat.S_ISDIR(st.st_mode) and st.st_ino == 1
        assert session.via == "mount"
        source, fstype, opts = mount_entry(mnt) or ("", "", set())
        assert (source, fstype) == ("pyunionfs", "fuse.pyunionfs")
        assert {"rw", "nosuid", "nodev", "user_id=0", "group_id=0", "default_permissions"} <= opts
        assert "allow_other" not in opts
        session.unmount()
        assert mount_entry(mnt) is None
        assert responder.wait_end() == READ_UNMOUNTED
        assert responder.opcodes[0] == OP_INIT
        assert OP_GETATTR in responder.opcodes
        session.unmount()  # gone already: no error


@needs_root
def test_the_options_asked_for_reach_the_kernel(mnt: Path) -> None:
    options = MountOptions(allow_other=True, readonly=True, default_permissions=False, max_read=65536,
                           flags=("dev", "suid", "noexec", "noatime"))
    with served(mnt, options):
        vfs = os.statvfs(mnt)  # answered by STATFS
        assert vfs.f_flag & os.ST_RDONLY and vfs.f_flag & os.ST_NOEXEC
        _, fstype, opts = mount_entry(mnt) or ("", "", set())
        assert fstype == "fuse.pyunionfs"
        assert {"ro", "noexec", "noatime", "allow_other", "max_read=65536"} <= opts
        assert not opts & {"nosuid", "nodev", "default_permissions"}


def test_options_become_mount_arguments() -> None:
    """What goes to mount(2) and to fusermount3, without mounting."""
    plain = MountOptions()
    assert plain.ms_flags() == 0x2 | 0x4  # MS_NOSUID | MS_NODEV, as FUSE does by default
    assert plain.kernel_data(5, 1000, 100) == b"fd=5,rootmode=40000,user_id=1000,group_id=100,default_permissions"
    assert plain.fusermount_options() == "fsname=pyunionfs,subtype=pyunionfs,rw,nosuid,nodev,exec,default_permissions"
    asked = MountOptions(allow_other=True, flags=("dev", "noatime", "atime", "ro"), max_read=4096)
    assert asked.ms_flags() == 0x1 | 0x2  # the last of atime/noatime wins; ro; nosuid stays
    assert asked.kernel_data(3, 0, 0).endswith(b",default_permissions,allow_other,max_read=4096")
    with pytest.raises(ValueError, match="unknown mount flag 'bogus'"):
        MountOptions(flags=("bogus",))
    with pytest.raises(ValueError, match="without commas"):
        MountOptions(subtype="a,b")
    # a source with commas travels escaped to fusermount3 (mount(2) takes it as its own argument)
    assert MountOptions(fsname="a,b\\c").fusermount_options().startswith("fsname=a\\,b\\\\c,subtype=pyunionfs,")
    cfg = MountConfig(lowers=(b"/l",), upper=None, mountpoint=b"/m", readonly=True, allow_other=True,
                      mount_flags=("dev", "noexec"))
    assert MountOptions.from_config(cfg) == MountOptions(allow_other=True, readonly=True, flags=("dev", "noexec"))
    assert request_buffer_size(MAX_WRITE) == MAX_WRITE + 4096
    assert request_buffer_size(4096) == 65536 + 4096  # a 64 KiB xattr value must fit whatever max_write is


@needs_root
def test_a_busy_mount_refuses_a_plain_unmount_and_a_lazy_one_detaches_it(mnt: Path) -> None:
    with served(mnt) as (session, responder):
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)  # OPENDIR answered ENOSYS: opened without it
        try:
            with pytest.raises(MountError, match=r"^cannot unmount .*: it is busy") as refused:
                session.unmount()
            assert "\n" not in str(refused.value)
            session.unmount(lazy=True)
            assert mount_entry(mnt) is None
            assert stat.S_ISDIR(os.fstat(fd).st_mode)  # still served through the open fd
            assert responder.is_alive()
        finally:
            os.close(fd)
        assert responder.wait_end() == READ_UNMOUNTED  # the last user let go


@needs_root
def test_a_clone_alone_serves_the_mount(mnt: Path) -> None:
    with served(mnt, serve=False) as (session, _):
        clone = session.clone()
        assert clone != session.fd
        responder = Responder(clone)
        responder.start()
        assert stat.S_ISDIR(os.stat(mnt).st_mode)
        assert responder.opcodes[:2] == [OP_INIT, OP_GETATTR]
        session.unmount()
        assert responder.wait_end() == READ_UNMOUNTED
        assert read_request(session.fd, bytearray(request_buffer_size(MAX_WRITE))) == READ_UNMOUNTED


@needs_root
def test_reads_and_writes_map_the_kernels_answers(mnt: Path) -> None:
    with served(mnt) as (session, _):
        os.stat(mnt)  # INIT is done
        idle = session.clone()
        fcntl.fcntl(idle, fcntl.F_SETFL, fcntl.fcntl(idle, fcntl.F_GETFL) | os.O_NONBLOCK)
        assert read_request(idle, bytearray(request_buffer_size(MAX_WRITE))) == READ_AGAIN
        with pytest.raises(OSError, match="too small") as small:
            read_request(idle, bytearray(4096))
        assert small.value.errno == errno.EINVAL
        # A reply to a request the kernel is not waiting for (interrupted meanwhile): dropped quietly.
        assert write_reply(idle, [OUT_HEADER.pack(OUT_HEADER.size, -errno.EIO, 0xDEAD_BEEF)]) is False
        with pytest.raises(OSError, match="malformed"):
            write_reply(idle, [OUT_HEADER.pack(OUT_HEADER.size + 1, 0, 0xDEAD_BEEF)])


@pytest.mark.parametrize("what", ["missing", "file"])
def test_a_bad_mountpoint_is_refused_in_one_line(tmp_path: Path, what: str) -> None:
    target = tmp_path / what
    if what == "file":
        target.write_text("not a directory\n")
    with pytest.raises(MountError) as refused:
        open_session(os.fsencode(target))
    expected = {"missing": "the mountpoint does not exist", "file": "the mountpoint is not a directory"}[what]
    assert str(refused.value) == f"cannot mount {target}: {expected}"
    assert mount_entry(target) is None


def _run_child(body: str, tmp_path: Path, dev_fuse_for_users: bool = True) -> dict:
    """Run Python *body* as root in a private mount namespace; return its ``out`` dict.

    Why a private namespace: a child that dies mid-test takes its mounts with
    it, and /dev/fuse can be replaced there.  *dev_fuse_for_users* puts a 0666
    node over /dev/fuse, as Debian ships it (this kind of machine has 0600,
    which keeps users out whatever the transport does); otherwise /dev is an
    empty tmpfs, as on a machine without the fuse module.
    """
    dev = tmp_path / "dev"
    dev.mkdir()
    if dev_fuse_for_users:
        setup = (f"mount -t tmpfs -o mode=0755 none {dev} && mknod -m 0666 {dev}/fuse c 10 229 && "
                 f"mount --bind {dev}/fuse /dev/fuse")
    else:
        setup = "mount -t tmpfs none /dev"
    code = ("import json, os, sys\nfrom tests.mount.test_fuse_transport import *\nout = {}\n"
            + textwrap.dedent(body) + "\nprint(json.dumps(out))\n")
    script = f"{setup} && exec {sys.executable} -c \"$0\""
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, code],
                         capture_output=True, text=True, timeout=25, cwd=REPO)
    assert res.returncode == 0, f"the child failed:\n{res.stderr}"
    return json.loads(res.stdout.strip().splitlines()[-1])


#: Child code: drop to uid/gid 1000 (everything imported before, as root).
_DROP_TO_1000 = """
os.setgroups([])
os.setgid(1000)
os.setuid(1000)
"""

#: Child code: mount m, check what the kernel shows, unmount, note the responder's end.  *busy*:
#: with a file open in it, try a plain unmount (refused), then a lazy one.
_MOUNT_AND_CHECK = """
def mount_and_check(m, busy):
    from pathlib import Path
    with served(Path(m)) as (session, responder):
        st = os.stat(m)
        entry = mount_entry(Path(m))
        seen = {"via": session.via, "dir": stat.S_ISDIR(st.st_mode), "uid": st.st_uid,
                "type": entry[1], "opts": sorted(entry[2])}
        if busy:
            fd = os.open(m, os.O_RDONLY)
            try:
                try:
                    session.unmount()
                except MountError as exc:
                    seen["busy"] = str(exc)
                session.unmount(lazy=True)
                seen["detached"] = mount_entry(Path(m)) is None
            finally:
                os.close(fd)
        else:
            session.unmount()
        seen["ended"] = responder.wait_end()
        seen["gone"] = mount_entry(Path(m)) is None
        return seen
"""


@needs_root
def test_a_user_mounts_through_fusermount3(tmp_path: Path) -> None:
    with public_dir() as pub:
        mine = pub / "mine"
        mine.mkdir()
        os.chown(mine, 1000, 1000)
        out = _run_child(_MOUNT_AND_CHECK + _DROP_TO_1000 + f"""
m = {str(mine)!r}
out["plain"] = mount_and_check(m, busy=False)
out["busy"] = mount_and_check(m, busy=True)
for name, options in [("allow_other", MountOptions(allow_other=True)), ("dev", MountOptions(flags=("dev",)))]:
    try:
        open_session(m.encode(), options).close()
    except MountError as exc:
        out[name] = str(exc)
""", tmp_path)
    for how in ("plain", "busy"):
        seen = out[how]
        assert seen["via"] == "fusermount3" and seen["dir"] and seen["uid"] == 1000
        assert seen["type"] == "fuse.pyunionfs"
        assert {"nosuid", "nodev", "user_id=1000", "group_id=1000", "default_permissions"} <= set(seen["opts"])
        assert seen["ended"] == READ_UNMOUNTED and seen["gone"]
    assert out["busy"]["busy"] == f"cannot unmount {mine}: it is busy (a file in it is open, or a process's cwd)"
    assert out["busy"]["detached"]
    assert out["allow_other"] == (f"cannot mount {mine}: fusermount3: option allow_other only allowed "
                                  "if 'user_allow_other' is set in /etc/fuse.conf")
    assert out["dev"] == f"cannot mount {mine}: dev needs root (a user's mount is always nosuid,nodev)"


@needs_root
def test_root_of_a_user_namespace_mounts_itself(tmp_path: Path) -> None:
    """uid 1000 in ``unshare -Urm`` (rootless containers): mount(2) works, no helper needed."""
    with public_dir() as pub:
        mine = pub / "mine"
        mine.mkdir()
        os.chown(mine, 1000, 1000)
        out = _run_child(_MOUNT_AND_CHECK + _DROP_TO_1000 + f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: setuid() made /proc/self root's, and its maps must be written
if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
    out["skip"] = os.strerror(ctypes.get_errno())
else:
    for name, text in (("setgroups", "deny"), ("uid_map", "0 1000 1"), ("gid_map", "0 1000 1")):
        with open(f"/proc/self/{{name}}", "w") as f:
            f.write(text)
    out["ns"] = mount_and_check({str(mine)!r}, busy=False)
""", tmp_path)
    if "skip" in out:
        pytest.skip(f"no user namespace for uid 1000 here: {out['skip']}")
    seen = out["ns"]
    assert seen["via"] == "mount" and seen["dir"] and seen["uid"] == 0  # uid 1000 as the namespace sees it
    assert seen["type"] == "fuse.pyunionfs"
    assert {"nosuid", "nodev", "user_id=0", "group_id=0"} <= set(seen["opts"])
    assert seen["ended"] == READ_UNMOUNTED and seen["gone"]


@needs_root
def test_a_machine_without_dev_fuse_is_told_what_to_do(tmp_path: Path, mnt: Path) -> None:
    out = _run_child(f"""
try:
    open_session({str(mnt)!r}.encode())
except MountError as exc:
    out["error"] = str(exc)
""", tmp_path, dev_fuse_for_users=False)
    assert out["error"] == (f"cannot mount {mnt}: /dev/fuse is missing: load the fuse module (modprobe fuse) "
                            "or run with --device /dev/fuse")
