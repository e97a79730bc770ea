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
parent is a symlink or a non-directory, in the archive or in DIR.  Writing
then goes through directory fds opened one component at a time with
``O_NOFOLLOW`` and ``*at`` calls: nothing is ever created or changed through
a symlink, and an existing entry that a member replaces is removed first
(a directory merges with a directory member, as OCI asks).  An I/O error
while writing can still leave a partly applied layer.

Metadata is restored after the data and in this order: owner (root only,
as tar does), then mode (chown clears set-user-ID), then xattrs (chown
clears ``security.capability``), then times; directories last, deepest
first, once nothing more is written in them.  In ``device`` and ``oci``
modes an ``overlay.*`` xattr of the archive is stored escaped
(``trusted.overlay.overlay.X``), so a layer can never plant overlay records
in a lower; ``flatten`` writes the names as they are, the merged view's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from .config import trusted_xattrs_usable
from .changes import LayerError, display, path_key
from .layertar import TAR_ENCODING, TAR_ERRORS, from_tar_text, member_mtime_ns, member_xattrs, open_layer_stream
from .paths import DirFds, join, proc_path, split
from .whiteout import Markers, classify_oci_name

__all__ = ["MODES", "apply_layer"]

MODES = ("device", "oci", "flatten")

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME_MAX = 255


@dataclass(slots=True)
class _Member:
    """One checked archive member and what it becomes."""

    index: int
    path: bytes  # normalised, relative to DIR; b"" is DIR itself
    info: tarfile.TarInfo
    kind: str  # dir reg sym lnk chr blk fifo | whiteout opaque (device and flatten modes)
    #: lnk: the path of the member it links to (never itself a link);
    #: whiteout: the path it deletes.
    target: bytes = b""


@dataclass(slots=True)
class _Plan:
    members: list[_Member] = field(default_factory=list)
    entries: dict[bytes, _Member] = field(default_factory=dict)  # non-marker members by path
    whiteouts: list[bytes] = field(default_factory=list)
    opaques: list[bytes] = field(default_factory=list)


def _kind(info: tarfile.TarInfo) -> str | None:
    if info.isreg():
        return "reg"
    for kind, test in (
        ("dir", info.isdir),
        ("sym", info.issym),
        ("lnk", info.islnk),
        ("chr", info.ischr),
        ("blk", info.isblk),
        ("fifo", info.isfifo),
    ):
        if test():
            return kind
    return None


class _Checker:
    """Builds the plan, refusing the whole layer at its first unsafe member."""

    def __init__(self, layer: str, mode: str, root_fd: int | None) -> None:
        self.layer = layer
        self.mode = mode
        self.root_fd = root_fd  # None: DIR does not exist yet, so holds nothing
        self.plan = _Plan()
        self.seen: dict[bytes, _Member] = {}  # every member path, markers included
        self._dir_state: dict[bytes, str] = {}

    def fail(self, info: tarfile.TarInfo | None, why: str) -> LayerError:
        where = f"{self.layer}: member {info.name!r}" if info is not None else self.layer
        return LayerError(f"{where}: {why}")

    def normalise(self, info: tarfile.TarInfo, name: str, what: str) -> bytes:
        raw = from_tar_text(name)
        if raw.startswith(b"/") or (what == "name" and not raw):
            raise self.fail(info, f"absolute {what}" if raw else f"empty {what} (absolute '/')")
        parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
        if b".." in parts:
            raise self.fail(info, f"{what} has a '..' component")
        if any(len(p) > _NAME_MAX for p in parts):
            raise self.fail(info, f"{what} has a component longer than {_NAME_MAX} bytes")
        return b"/".join(parts)

    def add(self, index: int, info: tarfile.TarInfo) -> None:
        path = self.normalise(info, info.name, "name")
        kind = _kind(info)
        if kind is None:
            raise self.fail(info, f"unsupported member type {info.type!r}")
        if path in self.seen:
            raise self.fail(info, f"duplicate entry for {display(path)!r}")
        member = _Member(index, path, info, kind)
        parent, name = split(path)
        marker, target = classify_oci_name(name) if path else ("entry", b"")
        if marker == "invalid":
            raise self.fail(info, "reserved whiteout name: it would hide its own directory or is unknown")
        if self.mode != "oci" and marker != "entry":
            if kind != "reg":
                raise self.fail(info, "a whiteout must be a regular file")
            member.kind = marker
            if marker == "whiteout":
                member.target = join(parent, target)
                self.plan.whiteouts.append(member.target)
            else:
                self.plan.opaques.append(parent)
        elif not path and kind != "dir":
            raise self.fail(info, "the layer's root must be a directory")
        elif kind == "chr" and info.devmajor == 0 and info.devminor == 0:
            raise self.fail(info, "character device 0/0 is an overlay whiteout; a layer says .wh.NAME")
        elif kind == "sym" and not info.linkname:
            raise self.fail(info, "symlink with an empty target")
        elif kind == "lnk":
            link = self.normalise(info, info.linkname, "hard link target")
            first = self.plan.entries.get(link)
            if first is None:
                raise self.fail(info, f"hard link to {display(link)!r}, which is not an earlier member")
            if first.kind == "dir":
                raise self.fail(info, f"hard link to directory {display(link)!r}")
            member.target = first.target if first.kind == "lnk" else first.path
        self.seen[path] = member
        self.plan.members.append(member)
        if member.kind not in ("whiteout", "opaque"):
            self.plan.entries[path] = member

    # -- parents ----------------------------------------------------------

    def check_parents(self) -> None:
        """Every member's parents must be directories, or become them: a
        directory member of the archive, something this layer deletes first,
        a missing name (made as a plain directory), or a directory in DIR."""
        deleted = set(self.plan.whiteouts)
        emptied = set(self.plan.opaques)
        for m in self.plan.members:
            parts = m.path.split(b"/") if m.path else []
            gone = False  # an ancestor is deleted by this layer: nothing of DIR's below it counts
            for i in range(1, len(parts)):
                pre = b"/".join(parts[:i])
                if b"/".join(parts[: i - 1]) in emptied or pre in deleted:
                    gone = True
                ent = self.plan.entries.get(pre)
                if ent is not None and ent.kind != "dir":
                    what = "a symlink" if ent.kind == "sym" else "not a directory"
                    raise self.fail(m.info, f"parent {display(pre)!r} is {what} in the archive")
                if gone:
                    continue
                state = self._state_in_dir(pre)
                if ent is not None:
                    # a directory of the archive: merges with DIR's, or replaces whatever else is there
                    gone = state != "dir"
                elif state == "missing":
                    gone = True
                elif state != "dir":
                    what = "a symlink" if state == "symlink" else "not a directory"
                    raise self.fail(m.info, f"parent {display(pre)!r} is {what} in the target directory")

    def _state_in_dir(self, rel: bytes) -> str:
        """dir, missing, symlink or other: what DIR has at *rel*, looked at
        one component at a time without following anything (its ancestors
        were found to be directories; anything else now is a change made
        meanwhile, reported as other)."""
        if self.root_fd is None:
            return "missing"
        known = self._dir_state.get(rel)
        if known is not None:
            return known
        *ancestors, name = rel.split(b"/")
        opened: list[int] = []
        try:
            fd = self.root_fd
            for a in ancestors:
                fd = os.open(a, _DIR_FLAGS, dir_fd=fd)
                opened.append(fd)
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            state = "missing"
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            state = "other"
        else:
            if stat.S_ISDIR(st.st_mode):
                state = "dir"
            elif stat.S_ISLNK(st.st_mode):
                state = "symlink"
            else:
                state = "other"
        finally:
            for fd in opened:
                os.close(fd)
        self._dir_state[rel] = state
        return state


@contextlib.contextmanager
def _reading(layer: str) -> Iterator[tarfile.TarFile]:
    """The archive, read as a stream: a gzip layer is decompressed once per
    pass (one to check, one to write), never seeked in.  Whatever cannot be
    read becomes a :class:`LayerError`."""
    try:
        with open_layer_stream(layer) as raw, tarfile.open(
            fileobj=raw, mode="r|", encoding=TAR_ENCODING, errors=TAR_ERRORS
        ) as tf:
            yield tf
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise LayerError(f"{layer}: not a readable tar archive ({exc})") from None
    except OSError as exc:
        if exc.errno is None:  # gzip.BadGzipFile and the like
            raise LayerError(f"{layer}: not a readable tar archive ({exc})") from None
        raise


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
        self.dirs: list[_Member] = []

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

    def entry(self, m: _Member, tf: tarfile.TarFile) -> None:
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

    def metadata(self, parent: bytes, name: bytes, m: _Member) -> None:
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
        pairs = member_xattrs(info)
        if self.mode == "flatten":
            return pairs
        return [(self.markers.stored_xattr(n), v) for n, v in pairs]

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
    layer, and for an I/O error while writing.
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
        checker = _Checker(layer, mode, root_fd)
        try:
            with _reading(layer) as tf:
                for index, info in enumerate(tf):
                    checker.add(index, info)
            checker.check_parents()
        except OSError as exc:
            raise LayerError(f"{exc.filename or layer}: {exc.strerror}") from None
        plan = checker.plan
        if root_fd is None:
            try:
                os.mkdir(target, 0o755)
                root_fd = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise LayerError(f"{target}: {exc.strerror}") from None
        _write(layer, target, root_fd, plan, mode, markers)
        return len(plan.members)
    finally:
        if root_fd is not None:
            os.close(root_fd)


def _write(layer: str, target: str, root_fd: int, plan: _Plan, mode: str, markers: Markers) -> None:
    w = _Writer(root_fd, mode, markers, {p for p, m in plan.entries.items() if m.kind == "dir"})
    current: _Member | None = None
    try:
        if mode != "oci":
            for rel in sorted(plan.whiteouts, key=path_key):
                w.remove(*split(rel))
            for rel in sorted(plan.opaques, key=path_key):
                w.empty(rel)
        root: _Member | None = None
        with _reading(layer) as tf:
            members = iter(plan.members)
            for info in tf:
                current = next(members, None)
                if current is None or current.info.name != info.name or current.info.type != info.type:
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
    finally:
        w.close()
