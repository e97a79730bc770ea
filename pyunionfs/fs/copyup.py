"""Atomic copy-up: a lower object rebuilt in the work directory, renamed into the upper.

The copy is built under a temporary name in the work directory (on the
upper's filesystem) with everything it needs -- data with its holes, xattrs,
owner, mode, times -- synced, and only then renamed to its place in the upper.
So a crash, a full disk or a kill -9 at any moment leaves either no copy or a
complete one, and the lower object is only ever read.  Leftovers in the work
directory are temporary names nobody refers to; :func:`clean_workdir` removes
them at the next mount.

Everything here is blocking and takes owned fds, so the write path can run a
long copy in a worker thread (``trio.to_thread``) without stalling other
requests.  All names are relative to directory fds: no path is followed.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from itertools import count

TMP_PREFIX = b"#pyunionfs-"
_serial = count()
_CHUNK = 1 << 24


def tmp_name() -> bytes:
    """A fresh temporary name for the work directory (cleaned at the next mount)."""
    return b"%s%d-%d" % (TMP_PREFIX, os.getpid(), next(_serial))


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy *size* bytes from fd *src* to fd *dst*, keeping holes.

    Walks the data extents with SEEK_DATA/SEEK_HOLE and copies only those
    (copy_file_range lets the filesystem share or offload blocks where it
    can); the final ftruncate restores a trailing hole.
    """
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        pos = start
        while pos < end:
            try:
                n = os.copy_file_range(src, dst, min(end - pos, _CHUNK), pos, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                n = os.pwrite(dst, os.pread(src, min(end - pos, 1 << 20), pos), pos)
            if n == 0:  # the source shrank under us
                break
            pos += n
        offset = end
    os.ftruncate(dst, size)


def copy_xattrs(
    list_src: Callable[[], list[bytes]],
    get_src: Callable[[bytes], bytes],
    set_dst: Callable[[bytes, bytes], None],
    keep: Callable[[bytes], bool],
) -> None:
    """Copy every xattr for which *keep* is true (security.capability included)."""
    for name in list_src():
        if keep(name):
            try:
                set_dst(name, get_src(name))
            except OSError as exc:
                # An xattr the upper cannot hold (e.g. a trusted.* one when
                # unprivileged) is dropped, as overlayfs does for ENOTSUP/EPERM
                # on non-essential names; anything else fails the copy-up.
                if exc.errno not in (errno.ENOTSUP, errno.EPERM) or name.startswith(b"security.capability"):
                    raise


def copy_up(
    src_dir: int,
    name: bytes,
    work: int,
    dst_dir: int,
    keep_xattr: Callable[[bytes], bool],
    fsync: bool = True,
    extra_xattrs: dict[bytes, bytes] | None = None,
    dst_name: bytes | None = None,
    data: bool = True,
    sparse: bool = False,
    data_from: tuple[int, bytes] | None = None,
    record: tuple[bytes, bytes] | None = None,
    owned: bool = True,
    shown: tuple[int, int, int] | None = None,
) -> os.stat_result:
    """Copy entry *name* of directory fd *src_dir* to *dst_name* (default: the
    same name) in *dst_dir*.

    Directories are created empty (their contents stay below, merged).  The
    target name must not exist in *dst_dir* except as a whiteout, which the
    rename replaces.  *extra_xattrs* (the overlay records, e.g. origin) are
    set on the copy before it appears.  ``data=False`` copies a regular file
    empty (for an open with O_TRUNC); ``sparse=True`` gives it its size but
    no data (a metadata-only copy: the caller's records say where the data
    is).  *data_from* (directory fd, name) is the file whose content to copy
    where that is not *name* itself (a metadata-only copy's data).  Returns
    the lstat of the new object.

    ``owned=False`` (``xattr_permissions=``, see :mod:`.override`) leaves the
    copy the daemon's, with 0755 added to its mode, and sets *record* (name,
    value) before the lower's xattrs are copied (so a lower's record of the
    same name wins, as in fuse-overlayfs).  *shown* (uid, gid, mode) is
    given to the copy instead of the source's: a lower's record made real.
    *fsync*: a regular file's data and metadata are synced before it takes
    the name (not the directory after: the kernel does not either).
    """
    target = name if dst_name is None else dst_name
    st = os.stat(name, dir_fd=src_dir, follow_symlinks=False)
    tmp = tmp_name()
    mode = st.st_mode
    uid, gid = st.st_uid, st.st_gid
    if shown is not None:
        uid, gid, mode = shown[0], shown[1], stat.S_IFMT(mode) | stat.S_IMODE(shown[2])
    built = -1  # the new file, held open until it is synced
    try:
        if stat.S_ISREG(mode):
            source = data_from or (src_dir, name)
            built = _build_file(*source, work, tmp, st.st_size if data else 0, sparse)
        elif stat.S_ISDIR(mode):
            os.mkdir(tmp, 0o700, dir_fd=work)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=src_dir), tmp, dir_fd=work)
        else:  # fifo, socket, device
            os.mknod(tmp, mode, st.st_rdev, dir_fd=work)
        # Owner first: chown clears set-user-ID bits and security.capability.
        if owned:
            os.chown(tmp, uid, gid, dir_fd=work, follow_symlinks=False)
        src_path = b"/proc/self/fd/%d/%s" % (src_dir, name)
        tmp_path = b"/proc/self/fd/%d/%s" % (work, tmp)
        if record is not None:
            os.setxattr(tmp_path, record[0], record[1], follow_symlinks=False)
        copy_xattrs(
            lambda: [os.fsencode(n) for n in os.listxattr(src_path, follow_symlinks=False)],
            lambda n: os.getxattr(src_path, n, follow_symlinks=False),
            lambda n, v: os.setxattr(tmp_path, n, v, follow_symlinks=False),
            keep_xattr,
        )
        for xname, value in (extra_xattrs or {}).items():
            # The records help (stable st_ino) but are not essential: a
            # symlink cannot hold user.* xattrs, for instance.
            _set_record(tmp_path, xname, value)
        if not stat.S_ISLNK(mode):
            os.chmod(tmp, stat.S_IMODE(mode) | (0 if owned else 0o755), dir_fd=work)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=work, follow_symlinks=False)
        if fsync and built >= 0:
            # One fsync, of the data and the metadata together, before the
            # copy takes the name, as the kernel orders it (copy_up.c: "fsync
            # metadata before moving it into upper dir"); the rename itself
            # is not synced, there or here: after a crash the name shows the
            # lower file or the whole copy.
            os.fsync(built)
        os.rename(tmp, target, src_dir_fd=work, dst_dir_fd=dst_dir)
    except BaseException:
        _remove(work, tmp)
        raise
    finally:
        if built >= 0:
            os.close(built)
    return os.stat(target, dir_fd=dst_dir, follow_symlinks=False)


def _set_record(path: bytes, name: bytes, value: bytes) -> None:
    try:
        os.setxattr(path, name, value, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP):
            raise


def fsync_dir(dir_fd: int) -> None:
    """fsync a directory known by an O_PATH fd (which fsync itself refuses)."""
    fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _build_file(src_dir: int, name: bytes, work: int, tmp: bytes, size: int, sparse: bool) -> int:
    """Make *tmp* in *work* with the data of *name* (or only its *size*,
    *sparse*); the new file's fd, for the caller to sync and close."""
    if sparse:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=work)
        try:
            os.ftruncate(dst, size)
        except BaseException:
            os.close(dst)
            raise
        return dst
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:  # reading a lower file never changes it, not even its atime
        src = os.open(name, flags | os.O_NOATIME, dir_fd=src_dir)
    except PermissionError:
        src = os.open(name, flags, dir_fd=src_dir)
    try:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=work)
        try:
            copy_data(src, dst, size)
        except BaseException:
            os.close(dst)
            raise
        return dst
    finally:
        os.close(src)


def _remove(work: int, tmp: bytes) -> None:
    try:
        st = os.stat(tmp, dir_fd=work, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        os.rmdir(tmp, dir_fd=work)
    else:
        os.unlink(tmp, dir_fd=work)


def clean_workdir(work_path: bytes) -> int:
    """Remove copy-up leftovers (a killed daemon's temporary names); return how many."""
    removed = 0
    with os.scandir(work_path) as it:
        for entry in it:
            if entry.name.startswith(TMP_PREFIX):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed += 1
    return removed
