"""The layer stack: directory roots opened once, and safe access beneath them.

Layer 0 is the topmost.  When the mount has an upper directory it is layer 0
and the only writable one.  Every access goes through :class:`~.paths.DirFds`
(``*at`` calls relative to a directory fd, never following a symlink stored in
a layer), so nothing outside the layer roots can be reached.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import MountError
from .paths import DirFds, encode_names, proc_path
from .syscalls import (
    MOUNT_ATTR__ATIME,
    MOUNT_ATTR_NOATIME,
    MOUNT_ATTR_RDONLY,
    OPEN_TREE_CLONE,
    fs_type,
    mount_setattr,
    open_tree,
)


#: Filesystems whose directory entries record the inode number ``lstat``
#: shows, for every entry but a directory: ext2/3/4, XFS, tmpfs, btrfs
#: (whose subvolume roots are directories).  Not overlayfs (without xino a
#: merged directory's entries may not), nor network or FUSE filesystems.
SAME_D_INO = frozenset({0xEF53, 0x58465342, 0x01021994, 0x9123683E})

#: The kinds of entry :meth:`LayerStack.scan` tells apart: regular file,
#: symlink, and the rest (directories, devices and whiteouts among them),
#: which are resolved one by one.
_REG, _LNK, _OTHER = 1, 2, 0
KIND_MODES = {_REG: stat.S_IFREG, _LNK: stat.S_IFLNK}


@dataclass(frozen=True, slots=True)
class Scan:
    """A directory of one layer as read once: its names in ``listdir``'s
    order, and for each its inode number and kind (``_REG``... above)."""

    names: list[bytes]
    inos: array
    kinds: bytes


def _names_in(fd: int) -> list[bytes]:
    """The names in directory *fd*, read in chunks: a huge directory's names
    are never held twice (as str and as bytes), only a chunk of them."""
    out: list[bytes] = []
    chunk: list[str] = []
    with os.scandir(fd) as entries:
        for e in entries:
            chunk.append(e.name)
            if len(chunk) == 4096:
                out += encode_names(chunk)
                chunk.clear()
    out += encode_names(chunk)
    return out


def open_layer_root(path: bytes, lower: bool = False) -> int:
    """An fd of the layer directory *path* that does not see mounts inside it.

    overlayfs works on the layer's own filesystem and never crosses a mount
    point inside a layer (it shows the directory underneath).  A
    non-recursive clone of the layer's mount (``open_tree(OPEN_TREE_CLONE)``,
    root only) gives us the same view, and also keeps the daemon from ever
    walking into a mount stacked inside a layer, its own included.  Without the
    privilege, a plain directory fd is the fallback.

    A *lower*'s clone is made read-only and ``noatime`` (it is our private
    mount: the layer's own mount is untouched), so the kernel itself keeps
    the daemon from writing a lower, and reads leave no trace in it: not even
    the atime that readlink(2) and directory reads would set, which O_NOATIME
    cannot prevent (overlayfs reads its layers without touching atimes).
    """
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        clone = open_tree(fd, OPEN_TREE_CLONE | os.O_CLOEXEC)
    except OSError:
        return fd
    os.close(fd)
    if lower:  # Linux < 5.12 has no mount_setattr: O_NOATIME opens still spare file atimes
        with contextlib.suppress(OSError):
            mount_setattr(clone, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOATIME, MOUNT_ATTR__ATIME)
    return clone


def open_upper_and_work(upper: bytes, workdir: bytes) -> tuple[int, int]:
    """Fds of the upper and the work directory on one (cloned) mount.

    rename(2) works only within one mount, and copy-up renames from the work
    dir into the upper: so both are reached below a single clone of their
    closest common directory.  The work dir is created if missing.
    """
    try:
        os.makedirs(workdir, 0o700, exist_ok=True)
    except OSError as exc:
        raise MountError(
            f"cannot create work directory {os.fsdecode(workdir)}: {exc.strerror} (choose one with -o workdir=DIR)"
        ) from None
    up, work = os.path.realpath(upper), os.path.realpath(workdir)
    common = os.path.commonpath([up, work])
    base = open_layer_root(common)
    fds: list[int] = []
    try:
        for target in (up, work):
            fd = os.dup(base)
            for part in os.path.relpath(target, common).split(b"/"):
                if part in (b"", b"."):
                    continue
                nfd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nfd
            fds.append(fd)
            st, want = os.fstat(fd), os.stat(target)
            if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
                raise MountError(
                    f"work directory {os.fsdecode(workdir)} must be on the same mount as the upper "
                    f"{os.fsdecode(upper)} (copy-up renames from one into the other)"
                )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        os.close(base)
    return fds[0], fds[1]


@dataclass(frozen=True, slots=True)
class Layer:
    """One directory of the stack."""

    index: int
    path: bytes
    fd: int
    dev: int
    writable: bool


class LayerStack:
    """The opened layers plus the directory-fd cache shared by all of them."""

    def __init__(self, paths: tuple[bytes, ...], writable_top: bool, workdir: bytes | None = None) -> None:
        layers: list[Layer] = []
        #: The work directory's fd (writable stacks given a workdir only).
        self.workdir_fd: int | None = None
        try:
            for i, p in enumerate(paths):
                try:
                    if i == 0 and writable_top and workdir is not None:
                        fd, self.workdir_fd = open_upper_and_work(p, workdir)
                    else:
                        fd = open_layer_root(p, lower=True)
                except OSError as exc:
                    raise MountError(f"cannot open layer {os.fsdecode(p)}: {exc.strerror}") from None
                layers.append(Layer(i, p, fd, os.fstat(fd).st_dev, writable_top and i == 0))
        except BaseException:
            for layer in layers:
                os.close(layer.fd)
            if self.workdir_fd is not None:
                os.close(self.workdir_fd)
            raise
        self.layers: tuple[Layer, ...] = tuple(layers)
        self.fds = DirFds([layer.fd for layer in layers])
        #: Where merged directories reached through ``overlay.redirect``
        #: records really are in the layers below the record: merged path ->
        #: {layer: its path there}.  Everything under such a directory is
        #: found by the same move (the longest recorded ancestor wins).  Set by
        #: the resolver; empty unless a layer holds redirects.
        self.moved: dict[bytes, dict[int, bytes]] = {}

    @property
    def upper(self) -> Layer | None:
        """The writable layer, if the mount has one."""
        top = self.layers[0]
        return top if top.writable else None

    def close(self) -> None:
        self.fds.clear()
        for layer in self.layers:
            os.close(layer.fd)
        if self.workdir_fd is not None:
            os.close(self.workdir_fd)

    # -- primitives: each names a directory (layer, rel) and an entry in it --

    def real(self, layer: int, rel: bytes) -> bytes:
        """The path in *layer* of merged entry *rel* (see :attr:`moved`)."""
        moved = self.moved
        if not moved or not layer:
            return rel
        at = rel
        while at:
            where = moved.get(at)
            if where is not None:
                there = where.get(layer)
                if there is not None:
                    return there + rel[len(at) :]
            at = at.rpartition(b"/")[0]
        return rel

    def at(self, layer: int, rel: bytes) -> tuple[int, bytes]:
        """(directory fd, name) of merged entry *rel* (not the root) in *layer*."""
        parent, _, name = self.real(layer, rel).rpartition(b"/")
        return self.fds.get(layer, parent), name

    def renamed(self, paths: dict[bytes, bytes]) -> None:
        """Merged directories moved (old path -> new): so do the moves
        recorded at or below them."""
        if not self.moved:
            return
        moved = {}
        for key, where in self.moved.items():
            for old, new in paths.items():
                if key == old or key.startswith(old + b"/"):
                    key = new + key[len(old) :]
                    break
            moved[key] = where
        self.moved = moved

    def dirfd(self, layer: int, rel: bytes) -> int:
        return self.fds.get(layer, self.real(layer, rel) if self.moved else rel)

    def lstat(self, layer: int, rel: bytes, name: bytes) -> os.stat_result | None:
        """lstat of *name* in merged directory *rel* of *layer*; None if absent.

        The name itself is taken literally where the directory really is (a
        name looked up in a lower, as ``ovl_lookup`` and ``ovl_lower_positive``
        do).  A directory missing from the layer (or turned into a
        non-directory since we looked) also reads as absent: overlayfs treats
        layers as fixed while mounted, and absent is the harmless answer.
        """
        return self.lstat_real(layer, self.real(layer, rel) if self.moved else rel, name)

    def lstat_real(self, layer: int, rel: bytes, name: bytes) -> os.stat_result | None:
        """:meth:`lstat` at a path of the layer itself, not a merged one."""
        try:
            return os.stat(name, dir_fd=self.fds.get(layer, rel), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a parent became a symlink
                return None
            raise

    def stat_self(self, layer: int, rel: bytes) -> os.stat_result:
        """lstat of the directory or entry *rel* itself."""
        if not rel:
            return os.fstat(self.layers[layer].fd)
        dfd, name = self.at(layer, rel)
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)

    def listdir(self, layer: int, rel: bytes) -> list[bytes]:
        """Names in directory *rel* of *layer*, in on-disk order.

        Read with O_NOATIME where allowed: the daemon lists directories for
        its own needs (lookups, emptiness checks) at moments the kernel's
        overlayfs would not read them, and the kernel keeps a merged
        directory's attributes cached, so an atime bumped by us would show up
        late, at some unrelated request.  Deliberate difference: listing a
        directory through the mount leaves its atime alone.
        """
        fd = self._open_dir(layer, rel)
        try:
            return _names_in(fd)
        finally:
            os.close(fd)

    def _open_dir(self, layer: int, rel: bytes) -> int:
        """A new fd to read directory *rel* of *layer* with (see :meth:`listdir`)."""
        dfd = self.dirfd(layer, rel)
        try:
            return os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOATIME, dir_fd=dfd)
        except PermissionError:
            return os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)

    def scan(self, layer: int, rel: bytes, names: list[bytes], unlisted: Callable[[bytes], bool]) -> Scan | None:
        """*names*, directory *rel* of *layer* as :meth:`listdir` read it
        before (less the names *unlisted* says it leaves out), with each
        one's inode number and type as the directory itself records them
        (``getdents``), where that inode number is the one ``lstat`` shows:
        on filesystems known to keep the two the same (:data:`SAME_D_INO`),
        for every entry but a directory (which may be a subvolume's root,
        whose number differs).  None elsewhere, and where the directory
        reads otherwise now.  Each name is checked as it is read, never
        kept a second time: a huge directory's names are most of its cost."""
        fd = self._open_dir(layer, rel)
        try:
            if fs_type(fd) not in SAME_D_INO:
                return None
            count = len(names)
            inos = array("Q", bytes(8 * count))
            kinds = bytearray(count)
            i = 0
            fsencode = os.fsencode
            with os.scandir(fd) as entries:
                for e in entries:  # (a d_type the filesystem does not record costs an lstat here)
                    name = fsencode(e.name)
                    if unlisted(name):
                        continue
                    if i == count or name != names[i]:
                        return None  # (changed since it was listed)
                    inos[i] = e.inode()
                    kinds[i] = _REG if e.is_file(follow_symlinks=False) else _LNK if e.is_symlink() else _OTHER
                    i += 1
            return Scan(names, inos, bytes(kinds)) if i == count else None
        finally:
            os.close(fd)

    def open_file(self, layer: int, rel: bytes, flags: int) -> int:
        """Open the entry *rel* for I/O without following a final symlink.

        Lower files are opened with O_NOATIME where allowed, so reading through
        the mount does not even change a lower file's atime.
        """
        dfd, name = self.at(layer, rel)
        return self._open(layer, dfd, name, flags)

    def open_real(self, layer: int, path: bytes, flags: int = os.O_RDONLY) -> int:
        """:meth:`open_file` of *path*, the layer's own path (not a merged
        one): where a metadata-only copy's data is."""
        where, _, name = path.rpartition(b"/")
        return self._open(layer, self.fds.get(layer, where), name, flags)

    def readlink_real(self, layer: int, path: bytes) -> bytes:
        """The target of symlink *path*, the layer's own path (not a merged one)."""
        where, _, name = path.rpartition(b"/")
        return os.readlink(name, dir_fd=self.fds.get(layer, where))

    def _open(self, layer: int, dfd: int, name: bytes, flags: int) -> int:
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if not self.layers[layer].writable and not flags & (os.O_WRONLY | os.O_RDWR):
            try:
                return os.open(name, flags | os.O_NOATIME, dir_fd=dfd)
            except PermissionError:
                pass
        return os.open(name, flags, dir_fd=dfd)

    def readlink(self, layer: int, rel: bytes) -> bytes:
        dfd, name = self.at(layer, rel)
        return os.readlink(name, dir_fd=dfd)

    def entry_path(self, layer: int, rel: bytes, real: bool = False) -> tuple[bytes, bool]:
        """A path reaching entry *rel* (a merged path, or the layer's own if
        *real*), and whether to follow its last step.

        The layer root is reached through its own magic link, which must be
        followed; anything else is a name inside a directory fd, never followed.
        """
        if not rel:
            return proc_path(self.layers[layer].fd), True
        parent, _, name = (rel if real else self.real(layer, rel)).rpartition(b"/")
        return proc_path(self.fds.get(layer, parent), name), False

    def listxattr(self, layer: int, rel: bytes, strict: bool = False, real: bool = False) -> list[bytes]:
        """Stored xattr names of entry *rel* (the entry itself, never a link target).

        Where xattrs are not supported the list is empty, unless *strict*.
        """
        try:
            path, follow = self.entry_path(layer, rel, real)
            names = os.listxattr(path, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM) and not strict:
                return []
            raise
        return encode_names(names)

    def getxattr(self, layer: int, rel: bytes, name: bytes, real: bool = False) -> bytes:
        path, follow = self.entry_path(layer, rel, real)
        return os.getxattr(path, name, follow_symlinks=follow)

    def statvfs(self, layer: int) -> os.statvfs_result:
        return os.statvfs(self.layers[layer].fd)


class RealPaths:
    """The layers read at their own paths, not merged ones: what the resolver
    reads while it follows a redirect to another place in a lower layer."""

    def __init__(self, stack: LayerStack) -> None:
        self.stack = stack

    def lstat(self, layer: int, rel: bytes, name: bytes) -> os.stat_result | None:
        return self.stack.lstat_real(layer, rel, name)

    def listxattr(self, layer: int, rel: bytes, strict: bool = False) -> list[bytes]:
        return self.stack.listxattr(layer, rel, strict, real=True)

    def getxattr(self, layer: int, rel: bytes, name: bytes) -> bytes:
        return self.stack.getxattr(layer, rel, name, real=True)
