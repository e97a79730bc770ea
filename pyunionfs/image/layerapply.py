"""``apply``: unpack an OCI image layer into a directory, checked first, never through a symlink.

Three ways to use the result, hence three modes:

* ``device`` (default): DIR becomes a layer in the kernel's format, to be
  stacked as a lower by pyunionfs or ``mount -t overlay``: ``.wh.NAME``
  becomes a 0/0 character device NAME, ``.wh..wh..opq`` the directory's
  ``overlay.opaque=y`` xattr (a ``.wh.NAME`` beside a directory NAME of the
  same layer makes that directory opaque: it replaces the lower one);
* ``oci``: the ``.wh.`` files are written as they are (pyunionfs reads them);
* ``flatten``: DIR holds the layers below and this one is applied on top
  (``docker export`` of the stack): a whiteout deletes, no marker is left.

In every mode a deletion also removes what DIR already had under that name
(with an opaque marker: everything DIR had in that directory) before the
layer's own entries are written: OCI says a whiteout applies only to the
layers below, whatever its place in the archive.

Safety, and why it is checked up front: a layer is untrusted input that is
about to be written as root.  Every member is checked before anything is
written, so a refused layer leaves DIR untouched: absolute names, ``..``
components, duplicate entries, hard links to anything but an earlier member,
unsupported member types, marker names that would hide the directory itself,
0/0 character devices (they would read as whiteouts), and any member whose
parent is a symlink or a non-directory, in the archive or in DIR; and every
owner, mode, time, device number, link target, xattr and size the kernel
would refuse half way (:mod:`.layercheck`, which makes this first pass).
Writing then goes through directory fds opened one component at a time with
``O_NOFOLLOW`` and ``*at`` calls: nothing is ever created or changed through
a symlink, and an existing entry that a member replaces is removed first
(a directory merges with a directory member, as OCI asks).  A DIR that did
not exist is built under a temporary name beside it and renamed into place
when complete, so it never exists half applied; an I/O error while writing
into an existing DIR (a full disk) can still leave a partly applied layer.

Metadata is restored after the data and in this order: owner (root only,
as tar does), then mode (chown clears set-user-ID), then xattrs (chown
clears ``security.capability``), then times; directories last, deepest
first, once nothing more is written in them.  In ``device`` and ``oci``
modes an ``overlay.*`` xattr of the archive is stored escaped
(``trusted.overlay.overlay.X``), so a layer can never plant overlay records
in a lower; ``flatten`` writes the names as they are, the merged view's.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile

from ..config import trusted_xattrs_usable
from ..errors import MALFORMED_INPUT, LayerError, malformed
from ..fs.markers import Markers
from ..fs.paths import DirFds, join, proc_path, split
from ..fs.syscalls import RENAME_NOREPLACE, renameat2
from .changes import display, path_key
from .layercheck import Member, Plan, check_layer, header, reading, stored_xattrs
from .layertar import from_tar_text, member_mtime_ns

__all__ = ["MODES", "apply_layer"]

MODES = ("device", "oci", "flatten")

# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


class _Writer:
    def __init__(self, root_fd: int, mode: str, markers: Markers, dir_members: set[bytes]) -> None:
        self.root_fd = root_fd
        #: Paths the archive has directory members for.
        self.dir_members = dir_members
        self.mode = mode
        self.markers = markers
        self.fds = DirFds([root_fd])
        self.as_root = os.geteuid() == 0
        self.dirs: list[Member] = []

    def close(self) -> None:
        self.fds.clear()

    # -- directories ------------------------------------------------------

    def dirfd(self, rel: bytes, create: bool = False) -> int | None:
        """The fd of directory *rel*; without *create*, None if it does not exist.

        With *create*, missing directories are made: plain ones (0755, the
        caller's) unless the archive has them (their metadata comes last).
        A non-directory in the way is replaced only where the archive has a
        directory of that name (the checks allowed nothing else; anything
        else is a change made meanwhile, and refused).
        """
        try:
            return self.fds.get(0, rel)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            if not create:
                return None  # not a directory (yet): nothing in it to see or remove
        done = b""
        for name in rel.split(b"/"):
            path = join(done, name)
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=self.fds.get(0, done), follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISDIR(st.st_mode):
                if path not in self.dir_members:
                    raise LayerError(f"{display(path)}: became a non-directory while the layer was applied")
                self.remove(done, name)
                st = None
            if st is None:
                os.mkdir(name, 0o700, dir_fd=self.fds.get(0, done))
                if path not in self.dir_members:
                    os.chmod(proc_path(self.fds.get(0, path)), 0o755)  # not the umask's
            done = path
        return self.fds.get(0, rel)

    def remove(self, parent: bytes, name: bytes) -> None:
        """Remove *name* (a whole tree if a directory) from DIR, if there."""
        pfd = self.dirfd(parent)
        if pfd is None:
            return
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        self.fds.forget_tree(0, join(parent, name))
        if stat.S_ISDIR(st.st_mode):
            own = self.fds.dup(0, parent)
            try:
                shutil.rmtree(name, dir_fd=own)  # fd-based: never follows a symlink inside
            finally:
                os.close(own)
        else:
            os.unlink(name, dir_fd=pfd)

    def empty(self, rel: bytes) -> None:
        """Remove everything DIR has in directory *rel*."""
        fd = self.dirfd(rel)
        if fd is None:
            return
        listing = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        try:
            names = sorted(os.fsencode(n) for n in os.listdir(listing))
        finally:
            os.close(listing)
        for n in names:
            self.remove(rel, n)

    # -- entries ------------------------------------------------------------

    def entry(self, m: Member, tf: tarfile.TarFile) -> None:
        parent, name = split(m.path)
        if m.kind == "dir":
            pfd = self.dirfd(parent, create=True) if parent else self.root_fd
            assert pfd is not None
            try:
                merged = stat.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode)
            except FileNotFoundError:
                merged = False
            fd = self.dirfd(m.path, create=True)  # made 0700 (or DIR's kept); its mode comes last
            assert fd is not None
            if merged:
                self.drop_xattrs(fd)  # "the existing path's attributes MUST be replaced" (OCI)
            self.dirs.append(m)
            return
        self.remove(parent, name)
        pfd = self.dirfd(parent, create=True)
        assert pfd is not None
        info = m.info
        if m.kind == "lnk":
            src_parent, src_name = split(m.target)
            src = self.fds.dup(0, src_parent)
            try:
                pfd = self.dirfd(parent, create=True)
                os.link(src_name, name, src_dir_fd=src, dst_dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(src)
            return  # one inode: its metadata came with the first name
        if m.kind == "reg":
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            with os.fdopen(fd, "wb") as out:
                data = tf.extractfile(info)
                if data is not None:
                    shutil.copyfileobj(data, out, 1 << 20)
        elif m.kind == "sym":
            os.symlink(from_tar_text(info.linkname), name, dir_fd=pfd)
        elif m.kind == "fifo":
            os.mkfifo(name, 0o600, dir_fd=pfd)
        else:
            kind = stat.S_IFCHR if m.kind == "chr" else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(info.devmajor, info.devminor), dir_fd=pfd)
        self.metadata(parent, name, m)

    def metadata(self, parent: bytes, name: bytes, m: Member) -> None:
        """Owner, mode, xattrs, times of the entry just made (see the module doc for the order)."""
        info = m.info
        mtime = member_mtime_ns(info)
        pfd = self.dirfd(parent)
        assert pfd is not None
        if m.kind == "sym":
            if self.as_root:
                os.chown(name, info.uid, info.gid, dir_fd=pfd, follow_symlinks=False)
            for xname, value in self.xattrs(info):
                os.setxattr(proc_path(pfd, name), xname, value, follow_symlinks=False)
            os.utime(name, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)
            return
        # An O_PATH handle of the object itself: its /proc link reaches that
        # inode and no other, whatever happens to the name meanwhile.
        obj = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd) if name else os.dup(pfd)
        try:
            where = proc_path(obj)
            if self.as_root:
                os.chown(where, info.uid, info.gid)
            os.chmod(where, info.mode & 0o7777)
            for xname, value in self.xattrs(info):
                os.setxattr(where, xname, value)
            os.utime(where, ns=(mtime, mtime))
        finally:
            os.close(obj)

    @staticmethod
    def drop_xattrs(fd: int) -> None:
        """Remove every xattr of the directory behind *fd* (a directory the
        archive merges with: only the member's own xattrs may remain)."""
        where = proc_path(fd)
        for name in os.listxattr(where):
            if name == "security.selinux":
                continue  # the host's label, not the directory's content
            try:
                os.removexattr(where, name)
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                    raise

    def xattrs(self, info: tarfile.TarInfo) -> list[tuple[bytes, bytes]]:
        return stored_xattrs(info, self.mode, self.markers)

    # -- markers ----------------------------------------------------------

    def whiteout(self, rel: bytes) -> None:
        """A 0/0 device at *rel*; or, where this layer made a directory there
        (as the parent of its members), that directory's opaque marker."""
        parent, name = split(rel)
        pfd = self.dirfd(parent, create=True)
        assert pfd is not None
        try:
            self.markers.make_whiteout(pfd, name)
        except FileExistsError:
            self.opaque(rel)
        except PermissionError:
            raise LayerError(
                f"{display(rel)}: cannot make a whiteout device (needs CAP_MKNOD); --whiteouts=oci keeps .wh. files"
            ) from None

    def opaque(self, rel: bytes) -> None:
        if not rel:
            self.markers.set_opaque(proc_path(self.root_fd), follow=True)
            return
        parent, name = split(rel)
        self.dirfd(rel, create=True)
        pfd = self.dirfd(parent)
        assert pfd is not None
        self.markers.set_opaque(proc_path(pfd, name))


def apply_layer(layer: str, target: str, *, mode: str = "device", userxattr: bool = False) -> int:
    """Apply the layer file *layer* to directory *target* (made if missing,
    its parent must exist); returns the number of members applied.

    Raises :class:`LayerError` (nothing written) for an unsafe or unreadable
    layer, and for an I/O error while writing.  A missing *target* is built
    under a temporary name beside it and renamed into place when complete,
    so it exists afterwards only if the whole layer was applied.
    """
    if mode not in MODES:
        raise ValueError(mode)
    probe = os.path.abspath(target)
    while not os.path.isdir(probe) and probe != "/":
        probe = os.path.dirname(probe)
    # trusted.* needs privilege in the initial user namespace, which uid 0 in
    # a user namespace lacks: ask the kernel, as the mount does.
    markers = Markers(userxattr=userxattr, trusted_ok=trusted_xattrs_usable(os.fsencode(probe)))
    try:
        root_fd: int | None = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        root_fd = None
    except OSError as exc:
        raise LayerError(f"{target}: {exc.strerror}") from None
    try:
        plan = check_layer(layer, mode, root_fd, markers, probe)
        if root_fd is not None:
            _write(layer, target, root_fd, plan, mode, markers)
        else:
            _write_new(layer, target, plan, mode, markers)
        return len(plan.members)
    finally:
        if root_fd is not None:
            os.close(root_fd)


def _write_new(layer: str, target: str, plan: Plan, mode: str, markers: Markers) -> None:
    """Apply into a new directory *target*: built as ``.NAME.apply-PID`` beside it, renamed in
    (never over anything that appeared meanwhile) only when complete, removed otherwise."""
    parent, name = os.path.split(os.path.abspath(target))
    temp = os.path.join(parent, f".{name}.apply-{os.getpid()}")
    if os.path.isdir(temp) and not os.path.islink(temp):
        shutil.rmtree(temp, ignore_errors=True)  # our pid's: left by a process of that pid killed earlier
    try:
        os.mkdir(temp, 0o755)
        fd = os.open(temp, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise LayerError(f"{target}: {exc.strerror}") from None
    done = False
    try:
        _write(layer, target, fd, plan, mode, markers)
        try:
            renameat2(-100, os.fsencode(temp), -100, os.fsencode(os.path.abspath(target)), RENAME_NOREPLACE)
        except OSError as exc:
            raise LayerError(f"{target}: {exc.strerror} (made while the layer was applied?)") from None
        done = True
    finally:
        os.close(fd)
        if not done:
            shutil.rmtree(temp, ignore_errors=True)


def _write(layer: str, target: str, root_fd: int, plan: Plan, mode: str, markers: Markers) -> None:
    w = _Writer(root_fd, mode, markers, {p for p, m in plan.entries.items() if m.kind == "dir"})
    current: Member | None = None
    try:
        if mode != "oci":
            for rel in sorted(plan.whiteouts, key=path_key):
                w.remove(*split(rel))
            for rel in sorted(plan.opaques, key=path_key):
                w.empty(rel)
        root: Member | None = None
        with reading(layer) as tf:
            members = iter(plan.members)
            for info in tf:
                current = next(members, None)
                if current is None or header(current.info) != header(info):
                    raise LayerError(f"{layer}: changed while being applied")
                current.info = info  # this pass's header: its data can be read now
                if current.kind in ("whiteout", "opaque"):
                    continue
                if not current.path:
                    root = current
                    continue
                w.entry(current, tf)
            current = None
        if mode == "device":
            for rel in sorted(plan.whiteouts, key=path_key):
                made = plan.entries.get(rel)
                if made is None:
                    w.whiteout(rel)
                elif made.kind == "dir":
                    w.opaque(rel)  # a new directory where a lower one was deleted replaces it
            for rel in sorted(plan.opaques, key=path_key):
                w.opaque(rel)
        for m in sorted(w.dirs, key=lambda d: path_key(d.path), reverse=True):
            w.metadata(*split(m.path), m)
        if root is not None:
            w.metadata(b"", b"", root)
    except OSError as exc:
        what = display(current.path) if current is not None else ""
        where = os.path.join(target, what) if what else target
        hint = " (not root?)" if exc.errno == errno.EPERM and os.geteuid() != 0 else ""
        raise LayerError(f"{where}: {exc.strerror or exc}{hint}") from None
    except MALFORMED_INPUT as exc:  # the checks let through what the kernel or tarfile did not take
        what = display(current.path) if current is not None else ""
        raise LayerError(f"{os.path.join(target, what) if what else target}: {malformed(exc)}") from None
    finally:
        w.close()
