"""The FUSE transport: ``/dev/fuse``, the mount, and moving requests and replies.

What libfuse's ``fuse_session_mount``/``fuse_session_receive_buf``/
``fuse_send_msg`` did for pyfuse3, from the standard library only:

- :func:`open_session` opens ``/dev/fuse`` and mounts it.  A process with
  CAP_SYS_ADMIN in its user namespace (root, or root of ``unshare -Urm``) calls
  mount(2) itself with ``fd=N,rootmode=40000,user_id=..,group_id=..``; anyone
  else goes through the setuid helper ``fusermount3``, which mounts and hands
  the device fd back over a socket (``_FUSE_COMMFD``, SCM_RIGHTS).  Root falls
  back to the helper when mount(2) says EPERM, as libfuse does.
- :class:`Session` holds the fd, clones it for more reader threads, unmounts.
- :func:`read_request` and :func:`write_reply` are the two system calls of the
  request loop, with the kernel's errnos turned into what the loop must do.

Failures to mount are :class:`~pyunionfs.errors.MountError` with one line,
``cannot mount X: why``, naming the fix where there is one.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import shutil
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import MountError
from ..fs.syscalls import has_cap_sys_admin
from .abi import DEV_IOC_CLONE, MIN_READ_BUFFER, XATTR_SIZE_MAX

if TYPE_CHECKING:
    from ..config import MountConfig

DEVICE = "/dev/fuse"
FSNAME = "pyunionfs"
FUSERMOUNT = "fusermount3"

# mount(2) flags (include/uapi/linux/mount.h) and umount2(2) flags.
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MNT_DETACH = 0x2

#: Option word -> (MS_ flag, set it?).  The words of ``-o`` that are mount
#: flags, as mount(8) and fusermount3 know them; of a pair the last one wins.
FLAG_WORDS: dict[str, tuple[int, bool]] = {
    "rw": (MS_RDONLY, False),
    "ro": (MS_RDONLY, True),
    "suid": (MS_NOSUID, False),
    "nosuid": (MS_NOSUID, True),
    "dev": (MS_NODEV, False),
    "nodev": (MS_NODEV, True),
    "exec": (MS_NOEXEC, False),
    "noexec": (MS_NOEXEC, True),
    "async": (MS_SYNCHRONOUS, False),
    "sync": (MS_SYNCHRONOUS, True),
    "atime": (MS_NOATIME, False),
    "noatime": (MS_NOATIME, True),
    "diratime": (MS_NODIRATIME, False),
    "nodiratime": (MS_NODIRATIME, True),
    "dirsync": (MS_DIRSYNC, True),
    "symfollow": (MS_NOSYMFOLLOW, False),
    "nosymfollow": (MS_NOSYMFOLLOW, True),
}

#: The flags fusermount3 takes, in the words it knows ("atime", "async"... are
#: the absence of a flag and are not words it accepts).
_FUSERMOUNT_WORDS: tuple[tuple[int, str, str], ...] = (
    (MS_RDONLY, "ro", "rw"),
    (MS_NOSUID, "nosuid", ""),
    (MS_NODEV, "nodev", ""),
    (MS_NOEXEC, "noexec", "exec"),
    (MS_SYNCHRONOUS, "sync", ""),
    (MS_DIRSYNC, "dirsync", ""),
    (MS_NOATIME, "noatime", ""),
    (MS_NODIRATIME, "nodiratime", ""),
    (MS_NOSYMFOLLOW, "nosymfollow", ""),
)

#: Headroom of the read buffer for everything before a request's payload.  A
#: WRITE needs 80 bytes (fuse_in_header 40 + fuse_write_in 40) before its data,
#: a SETXATTR 40 + 24 + a name of up to 256 before its value; 4096 is what
#: libfuse reserves and leaves room for request extensions (security contexts,
#: supplementary groups).
HEADER_ROOM = 4096

# What read_request returns instead of a length.
READ_UNMOUNTED = 0  # ENODEV: the filesystem was unmounted; end the loop
READ_AGAIN = -1  # EAGAIN: non-blocking fd and nothing queued; poll and come back
READ_ABORTED = -2  # ECONNABORTED: the connection was aborted (fusectl abort); the mount is dead

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def request_buffer_size(max_write: int) -> int:
    """Bytes a read buffer needs for *max_write* (the value our INIT reply gives).

    The kernel refuses a read(2) of /dev/fuse (EINVAL) with a buffer smaller
    than ``max(8192, 80 + max_write)``, and fails a request that does not fit
    (E2BIG for SETXATTR, EIO otherwise) instead of splitting it.  The largest
    requests are a WRITE of max_write bytes and a SETXATTR of a 64 KiB value,
    so: ``max(max_write, XATTR_SIZE_MAX) + HEADER_ROOM``; 135168 bytes for
    the 128 KiB max_write pyunionfs asks for.  A SYMLINK or RENAME (names of
    at most 1 KiB, a target of at most 4 KiB) fits the 64 KiB floor.
    """
    return max(MIN_READ_BUFFER, max(max_write, XATTR_SIZE_MAX) + HEADER_ROOM)


def request_buffer(max_write: int) -> mmap.mmap:
    """A read buffer of :func:`request_buffer_size` bytes whose pages stay
    untouched until a request fills them.  ``bytearray(n)`` writes zeros to
    every page: a mebibyte resident per worker for the 1 MiB WRITE a request
    may carry, where most requests are a few hundred bytes."""
    return mmap.mmap(-1, request_buffer_size(max_write))


@dataclass(frozen=True)
class MountOptions:
    """What the mount asks of the kernel.

    Defaults are what FUSE and pyunionfs do today: ``nosuid,nodev`` unless
    ``dev``/``suid`` are among *flags* (libfuse and fusermount3 both start
    from there, even for root), and ``default_permissions``, so that the
    kernel checks permissions against the attributes we return (the union
    core relies on it).  *flags* are mount(8) words (:data:`FLAG_WORDS`), as
    :func:`pyunionfs.config.mount_flags` collects them.  *max_read* caps the
    size of a READ request (None: the kernel's choice).  *timeout* bounds the
    wait for fusermount3, which blocks if the mountpoint's filesystem hangs.
    """

    fsname: str = FSNAME
    subtype: str = FSNAME
    allow_other: bool = False
    default_permissions: bool = True
    readonly: bool = False
    flags: tuple[str, ...] = ()
    max_read: int | None = None
    timeout: float = 60.0

    def __post_init__(self) -> None:
        # The subtype is part of the type (fuse.TYPE) and travels unescaped.
        if not self.subtype or any(c in self.subtype for c in ",\\\0 \t\n"):
            raise ValueError(f"subtype {self.subtype!r} must be non-empty, without commas, backslashes or blanks")
        # The source is mount(2)'s own argument, escaped by the kernel in the mount
        # table; only fusermount3's -o needs its commas escaped (fusermount_options).
        if not self.fsname or any(ord(c) < 0x20 for c in self.fsname):
            raise ValueError(f"fsname {self.fsname!r} must be non-empty, without control characters")
        unknown = [w for w in self.flags if w not in FLAG_WORDS]
        if unknown:
            raise ValueError(f"unknown mount flag {unknown[0]!r} (known: {', '.join(FLAG_WORDS)})")
        if self.max_read is not None and self.max_read <= 0:
            raise ValueError(f"max_read must be positive, not {self.max_read}")

    @classmethod
    def from_config(cls, cfg: MountConfig) -> MountOptions:
        """The options :func:`pyunionfs.mount.mount_options` gives libfuse, for *cfg*."""
        return cls(fsname=cfg.fsname, allow_other=cfg.allow_other, readonly=cfg.readonly,
                   flags=tuple(cfg.mount_flags))

    def ms_flags(self) -> int:
        """The mountflags argument of mount(2)."""
        flags = MS_NOSUID | MS_NODEV
        for word in ("ro",) * self.readonly + self.flags:
            bit, on = FLAG_WORDS[word]
            flags = flags | bit if on else flags & ~bit
        return flags

    def kernel_data(self, fd: int, uid: int, gid: int) -> bytes:
        """The data argument of mount(2): the options fs/fuse/inode.c parses.

        fd, rootmode, user_id and group_id are mandatory.  The root is always
        a directory (rootmode 40000 octal), whatever the union holds.
        """
        opts = [f"fd={fd}", "rootmode=40000", f"user_id={uid}", f"group_id={gid}"]
        opts += self._fuse_words()
        return ",".join(opts).encode()

    def fusermount_options(self) -> str:
        """The ``-o`` string for fusermount3, which adds fd/rootmode/ids itself."""
        flags = self.ms_flags()
        # fusermount3 splits at commas not escaped with a backslash and unescapes the value (as
        # libfuse's fuse_opt_add_opt_escaped writes it).
        fsname = self.fsname.replace("\\", "\\\\").replace(",", "\\,")
        words = [f"fsname={fsname}", f"subtype={self.subtype}"]
        words += [set_word if flags & bit else clear_word for bit, set_word, clear_word in _FUSERMOUNT_WORDS]
        return ",".join([w for w in words if w] + self._fuse_words())

    def _fuse_words(self) -> list[str]:
        words = ["default_permissions"] * self.default_permissions + ["allow_other"] * self.allow_other
        if self.max_read is not None:
            words.append(f"max_read={self.max_read}")
        return words


class Session:
    """A mounted FUSE connection: the /dev/fuse fd requests are read from.

    *via* says how the mount was made (``"mount"`` or ``"fusermount3"``), and
    so how :meth:`unmount` undoes it.  Closing the fd does not unmount: the
    kernel then aborts the connection and leaves a mount whose every access
    fails with ENOTCONN, which only an unmount clears.
    """

    def __init__(self, fd: int, mountpoint: bytes, via: str, fusermount: str | None = None) -> None:
        self.fd = fd
        self.mountpoint = mountpoint
        self.via = via
        self._fusermount = fusermount
        self._clones: list[int] = []

    def __repr__(self) -> str:
        return f"Session(fd={self.fd}, mountpoint={self.mountpoint!r}, via={self.via!r})"

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def clone(self) -> int:
        """A new fd on the same connection, for one more reader thread.

        All fds of a connection read from one queue of pending requests, but
        each keeps its own table of requests being processed, which a reply
        written to it searches and locks: threads with an fd each do not
        contend there.  A reply must go to the fd its request was read from.
        Needs /dev/fuse to be openable by this process (not so for a user when
        /dev/fuse is 0600): OSError then, and the caller serves with the one
        fd it has.  The clone is closed by :meth:`close`.
        """
        try:
            new = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot clone the FUSE connection: {DEVICE}: {exc.strerror}") from None
        try:
            fcntl.ioctl(new, DEV_IOC_CLONE, struct.pack("=I", self.fd))
        except OSError as exc:
            os.close(new)
            raise OSError(exc.errno, f"cannot clone the FUSE connection: {exc.strerror}") from None
        self._clones.append(new)
        return new

    def unmount(self, lazy: bool = False) -> None:
        """Unmount, as the mount was made; an absent mount is no error.

        Call it from a thread other than the ones serving requests: an unmount
        may need answers (writeback of dirty pages), and the readers see the
        end as :data:`READ_UNMOUNTED`.  Without *lazy* a busy mount (open
        files, a process's cwd) is refused; *lazy* detaches it at once and the
        connection ends when the last user lets go.
        """
        name = os.fsdecode(self.mountpoint)
        if self._fusermount is None:
            # Following symlinks, as mount(2) did: the mountpoint may be given through one.
            if _libc.umount2(self.mountpoint, MNT_DETACH if lazy else 0) == 0:
                return
            code = ctypes.get_errno()
            if code == errno.EINVAL:  # not a mount point (any more)
                return
            if code == errno.EBUSY:
                raise MountError(f"cannot unmount {name}: it is busy (a file in it is open, or a process's cwd)")
            raise MountError(f"cannot unmount {name}: {os.strerror(code)}")
        import subprocess  # a user's mount only: root's mount pays no import for it

        cmd = [FUSERMOUNT.encode(), b"-u", *([b"-z"] if lazy else []), b"--", self.mountpoint]
        res = subprocess.run(
            cmd, executable=self._fusermount, stdin=subprocess.DEVNULL, capture_output=True, timeout=60
        )
        if res.returncode != 0:
            line = _last_line(res.stderr, f"{FUSERMOUNT} -u failed with status {res.returncode}")
            if "not found in" in line:  # "entry for X not found in /etc/mtab": gone already
                return
            if "busy" in line:
                raise MountError(f"cannot unmount {name}: it is busy (a file in it is open, or a process's cwd)")
            raise MountError(f"cannot unmount {name}: {line}")

    def close(self) -> None:
        """Close the fd and its clones (idempotent).  Does not unmount."""
        fds, self._clones = [*self._clones, self.fd], []
        self.fd = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


def open_session(mountpoint: bytes, options: MountOptions | None = None) -> Session:
    """Open /dev/fuse and mount it on *mountpoint*; raise MountError (one line) if not.

    The kernel sends INIT as soon as the mount exists; until it is answered
    every access to the mount waits, so start reading at once.
    """
    opts = options or MountOptions()
    name = os.fsdecode(mountpoint)
    _check_mountpoint(mountpoint, name)
    fusermount = shutil.which(FUSERMOUNT)
    if _may_mount():
        session = _mount_directly(mountpoint, name, opts, fallback=fusermount is not None)
        if session is not None:
            return session
    if fusermount is None:
        raise MountError(
            f"cannot mount {name}: {FUSERMOUNT} is missing; a mount by a user other than root needs it: "
            "apt-get install fuse3"
        )
    return _mount_with_fusermount(mountpoint, name, opts, fusermount)


def _check_mountpoint(mountpoint: bytes, name: str) -> None:
    """Refuse what mount(2) or fusermount3 would refuse, with a better message."""
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"cannot mount {name}: the mountpoint does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(
                f"cannot mount {name}: a FUSE mount whose daemon is gone is there: unmount it first "
                f"(umount -l {name}, or {FUSERMOUNT} -uz {name})"
            ) from None
        raise MountError(f"cannot mount {name}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"cannot mount {name}: the mountpoint is not a directory")


def _may_mount() -> bool:
    """Whether this process has CAP_SYS_ADMIN in its user namespace (mount(2) may work).

    Root of the initial namespace has it, and so has root of ``unshare -Urm``
    (FUSE may be mounted in a user namespace that owns its mount namespace); a
    root whose capabilities were dropped (a container) has not.
    """
    return has_cap_sys_admin()


def _open_device(name: str) -> int:
    try:
        return os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(f"cannot mount {name}: {_device_problem(exc.errno)}") from None


def _device_problem(code: int | None) -> str:
    if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return f"{DEVICE} is missing: load the fuse module (modprobe fuse) or run with --device {DEVICE}"
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"{DEVICE} is not readable and writable for this user: mount as root, or let users mount "
            f"(chmod 0666 {DEVICE}, as Debian's default is)"
        )
    return f"{DEVICE}: {os.strerror(code or errno.EIO)}"


def _mount_directly(mountpoint: bytes, name: str, opts: MountOptions, fallback: bool) -> Session | None:
    """mount(2) with our own /dev/fuse fd; None when EPERM says to try fusermount3."""
    fd = _open_device(name)
    data = opts.kernel_data(fd, os.getuid(), os.getgid())
    source = opts.fsname.encode()
    fstype = f"fuse.{opts.subtype}".encode()
    if _libc.mount(source, mountpoint, fstype, opts.ms_flags(), data) == 0:
        return Session(fd, mountpoint, "mount")
    code = ctypes.get_errno()
    os.close(fd)
    if code == errno.EPERM and fallback:
        return None  # e.g. root of a user namespace that does not own its mount namespace
    if code == errno.ENODEV:
        why = "the kernel has no FUSE filesystem: load the fuse module (modprobe fuse)"
    elif code == errno.EPERM:
        why = f"{os.strerror(code)} (and {FUSERMOUNT} is missing: apt-get install fuse3)"
    elif code == errno.EINVAL:
        why = f"the kernel refused the options {data.decode()!r} (EINVAL)"
    else:
        why = os.strerror(code)
    raise MountError(f"cannot mount {name}: {why}")


def _mount_with_fusermount(mountpoint: bytes, name: str, opts: MountOptions, fusermount: str) -> Session:
    """Let the setuid helper mount, and receive the /dev/fuse fd it opened.

    The protocol (libfuse lib/mount.c, util/fusermount.c): the helper finds
    one end of a socketpair in ``_FUSE_COMMFD``, mounts, sends the fd with
    SCM_RIGHTS and a one-byte message, and exits; on failure it prints why
    on stderr, exits 1 and the socket just closes.
    """
    if os.getuid() != 0:
        asked = [w for w in ("suid", "dev") if not opts.ms_flags() & FLAG_WORDS[w][0]]
        if asked:
            # fusermount3 would ignore them with a warning; better to say so.
            raise MountError(
                f"cannot mount {name}: {' and '.join(asked)} {'needs' if len(asked) == 1 else 'need'} root "
                "(a user's mount is always nosuid,nodev)"
            )
        # fusermount3 opens the device with the user's rights (since 3.x).
        if not os.access(DEVICE, os.R_OK | os.W_OK):
            code = errno.ENOENT if not os.path.exists(DEVICE) else errno.EACCES
            raise MountError(f"cannot mount {name}: {_device_problem(code)}")
    import socket  # here only: root mounts by mount(2) and pays no import for these
    import subprocess

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds: list[int] = []
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        env.pop("_FUSE_COMMFD2", None)
        try:
            proc = subprocess.Popen(
                [FUSERMOUNT.encode(), b"-o", opts.fusermount_options().encode(), b"--", mountpoint],
                executable=fusermount,  # argv[0] stays short: it starts each line it prints
                env=env,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise MountError(f"cannot mount {name}: cannot run {fusermount}: {exc.strerror}") from None
        theirs.close()  # so the socket reads EOF when the helper exits without an fd
        ours.settimeout(opts.timeout)
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1, socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            proc.kill()
        except OSError:
            pass
        _, err = proc.communicate()
    finally:
        ours.close()
        theirs.close()
    if fds:  # sent only once mounted, whatever the exit status says next (libfuse ignores it too)
        return Session(fds[0], mountpoint, FUSERMOUNT, fusermount)
    default = f"{FUSERMOUNT} gave no fd (status {proc.returncode})"
    if proc.returncode == -9:
        default = f"{FUSERMOUNT} did not answer within {opts.timeout:g} s"
    raise MountError(f"cannot mount {name}: {_last_line(err, default)}")


def _last_line(text: bytes | None, default: str) -> str:
    """The line that says why (the last one: warnings come before the error)."""
    lines = [ln.strip() for ln in (text or b"").decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else default


def read_request(fd: int, buf: bytearray | memoryview | mmap.mmap) -> int:
    """Read one request into *buf*; its length, or READ_UNMOUNTED/READ_AGAIN/READ_ABORTED.

    One read(2) returns exactly one whole request.  *buf* must hold
    :func:`request_buffer_size` bytes for the max_write the INIT reply gave.
    Retried: EINTR (a signal), ENOENT (the request was interrupted and
    dropped between being queued and being copied to us).  EINVAL here
    means the buffer is too small, a bug: it is raised, saying so.
    """
    while True:
        try:
            return os.readv(fd, (buf,))
        except OSError as exc:
            code = exc.errno
            if code == errno.ENOENT or code == errno.EINTR:
                continue
            if code == errno.ENODEV:
                return READ_UNMOUNTED
            if code == errno.EAGAIN:
                return READ_AGAIN
            if code == errno.ECONNABORTED:
                return READ_ABORTED
            if code == errno.EINVAL:
                raise OSError(
                    code,
                    f"the kernel refused a {len(buf)}-byte read buffer as too small "
                    "for max_write (see request_buffer_size)",
                ) from None
            raise


def write_reply(fd: int, iov: Sequence[bytes | bytearray | memoryview]) -> bool:
    """Write one reply (header first, then its parts) with one writev(2).

    False when the kernel no longer wants it: ENOENT (the request was
    interrupted and answered meanwhile, or a notification found nothing to
    act on) and ENODEV/ECONNABORTED (the connection ended: the reader will
    see it).  EINVAL means a malformed reply (length, unique or errno out of
    range): raised, since it is a bug and the request is left unanswered.
    """
    try:
        os.writev(fd, iov)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ECONNABORTED):
            return False
        if exc.errno == errno.EINVAL:
            raise OSError(errno.EINVAL, "the kernel refused a malformed reply (EINVAL)") from None
        raise
