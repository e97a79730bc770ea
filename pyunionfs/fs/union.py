"""The union filesystem without FUSE: requests by inode number, answers as values.

:class:`UnionFS` is what the FUSE adapter calls and what unit tests drive
directly.  It raises :class:`OSError` with the errno the caller must see; it
knows nothing of pyfuse3.

One rule holds for every request that names an inode (open, getattr,
readlink, the xattr calls, setattr, link's source, opendir): it is answered
for *that* object, never for whatever holds its last known name now.  The
kernel names objects by node id; we find them by path only because layers
are directories.  So the node's object is reached in one of three ways, all
in :meth:`UnionFS.stat_object` / :meth:`UnionFS.open_object` /
:meth:`UnionFS.object_path`:

* its pin, an O_PATH fd taken just before a name it was found by went away
  (see :attr:`.inodes.Node.pin`), while that is the object the node shows:
  exact by construction;
* its name in a lower layer: lowers never change under a mount, so the name
  still holds the object;
* its name in the upper (or its ``index/`` entry), checked against the
  object's own (st_dev, st_ino) after the lookup: a name that now holds
  another object answers ENOENT, as a name that holds nothing does.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from ..config import MountConfig, default_workdir
from ..errors import fs_error
from .answers import Attr, KernelForget
from .callers import DAEMON, Caller
from .directories import Directories
from .entry import Entry
from .handles import BACKING_FLAGS, FairShare, HandleTable
from .idmap import id_map
from .inodes import NO_XATTRS, ROOT_INO, InodeTable, Node
from .layers import LayerStack
from .locking import BigLock
from .markers import Markers
from .override import HIDDEN_PREFIX, Overrides, Record, apply, overrides
from .paths import proc_path, split
from .residents import Table
from .resolve import Resolver
from .syscalls import birth_time_ns

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
#: The xattr namespace only callers with CAP_SYS_ADMIN see (:mod:`.callers`).
TRUSTED = b"trusted."


class UnionFS:
    """One mounted union: layers, resolution rules, inode table, open handles."""

    def __init__(self, cfg: MountConfig) -> None:
        self.cfg = cfg
        self.readonly = cfg.readonly
        writable = cfg.upper is not None and not cfg.readonly
        workdir = cfg.workdir or (default_workdir(cfg.upper) if cfg.upper is not None and writable else None)
        self.stack = LayerStack(cfg.layers, writable_top=writable, workdir=workdir)
        # Whether trusted.* can be written was decided once, by asking the kernel (config.build_config).
        self.markers = Markers(userxattr=cfg.userxattr, oci=cfg.oci_whiteouts)
        #: Owners and modes kept in records (fuse-overlayfs's ``xattr_permissions=``), if any layer has them.
        self.overrides: Overrides | None = overrides(
            cfg.xattr_permissions, [layer.fd for layer in self.stack.layers], writable
        )
        if self.overrides is not None:
            self.markers.hidden = HIDDEN_PREFIX
        self.resolver = Resolver(self.stack, self.markers)
        self.resolver.follow = cfg.redirect_dir != "nofollow"
        self.resolver.metacopy = cfg.metacopy
        #: Owners shown other than stored (fuse-overlayfs's ID options), if any.
        self.ids = id_map(cfg)
        # Bottom layer first: the image layers' filesystem gets index 0.
        devices = [layer.dev for layer in reversed(self.stack.layers)]
        self.inodes = InodeTable(self.resolver.root(), devices)
        self.inodes.lower_entry = self._lower_entry
        self.handles = HandleTable(FairShare(per_uid=cfg.max_files_per_uid))
        #: Held by the engine around every call into the core (see :mod:`.locking`).
        self.lock = BigLock()
        #: Open directories and the reading of listings.
        self.dirs = Directories(self)
        self._closed = False

    def close(self) -> None:
        """Release every fd (at unmount, after the kernel let go); idempotent."""
        if self._closed:
            return
        self._closed = True
        self.handles.close()
        self.dirs.close()
        self.inodes.close()
        self.stack.close()

    def drop_caches(self) -> KernelForget:
        """Forget what was learnt about the layers, for when a lower changed
        under the mount anyway (overlayfs calls that undefined too).

        Returns what the kernel must forget as well, since it caches names,
        attributes, data and listings for as long as we let it: every inode it
        holds, and every name it holds each by (a hard link's too).  A name the kernel knows to be
        missing is dropped with its directory's name (the kernel prunes what
        lies below an invalidated name), except in the root, whose own missing
        names are listed from our cache.
        """
        root = self.inodes[ROOT_INO]
        entries = [(ROOT_INO, name) for name in self.resolver.cache.negatives(root.entry.ident)]
        # The other names of a hard link, by their directories' numbers: the
        # kernel may hold the file under each name it looked up.
        dirs = {node.path: node.ino for node in self.inodes.nodes.values() if node.entry.is_dir and not node.gone}
        for node in self.inodes.nodes.values():
            node.xattrs = None
            if node.ino != ROOT_INO and not node.gone and node.path:
                entries.append((node.parent, node.path.rpartition(b"/")[2]))
                for alias in node.aliases or ():
                    where, _, name = alias.rpartition(b"/")
                    if where in dirs:
                        entries.append((dirs[where], name))
        inodes = list(self.inodes.nodes)
        for ino, parent, name in self.inodes.resident_names():
            inodes.append(ino)
            entries.append((parent, name))
        self.inodes.residents.forget_xattrs()
        self.resolver.cache.clear()
        self.resolver.presence.clear()
        self.stack.fds.clear()
        return KernelForget(inodes=sorted(inodes), entries=entries)

    # -- names -------------------------------------------------------------

    def node(self, ino: int) -> Node:
        node = self.inodes.get(ino)
        if node is None:
            # The kernel only names inodes we gave it and has not forgotten.
            raise fs_error(errno.ESTALE)
        return node

    def lookup(self, parent_ino: int, name: bytes) -> tuple[Node, Attr]:
        """Resolve *name* in a directory and take a kernel reference on it."""
        parent = self.node(parent_ino)
        if not parent.entry.is_dir:
            raise fs_error(errno.ENOTDIR)
        if parent.gone:
            raise fs_error(errno.ENOENT, name)  # a removed directory holds nothing (its path may hold another)
        grandparent = ROOT_INO
        if name == b".":
            path, entry, grandparent = parent.path, parent.entry, parent.parent
        elif name == b"..":
            path = split(parent.path)[0]
            entry = self.resolve_path(path)
            above = self.inodes.get(parent.parent)
            grandparent = above.parent if above is not None else ROOT_INO
        else:
            path = parent.path + b"/" + name if parent.path else name
            found = self.resolver.child(parent.entry, parent.path, name)
            if found is None:
                raise fs_error(errno.ENOENT, name)
            entry = found
        if self.overrides is not None:  # a record that does not parse fails the lookup, with no reference taken
            attr = self.attr_of(self.inodes.number(entry.ident, path), entry, path)
            return self.inodes.remember(path, entry, grandparent if name in (b".", b"..") else parent_ino), attr
        node = self.inodes.remember(path, entry, grandparent if name in (b".", b"..") else parent_ino)
        return node, self.attr_of(node.ino, entry, path)

    def _lower_entry(self, layer: int, path: bytes) -> Entry | None:
        """The entry of the object at merged *path* of lower *layer*, as a
        directory of that one layer resolves a file (for a resident node
        made full, see :mod:`.residents`)."""
        where, _, name = path.rpartition(b"/")
        st = self.stack.lstat(layer, where, name)
        return Entry.lean(layer, st) if st is not None else None

    def _resident(self, ino: int) -> tuple[int, bytes, Table, int]:
        """(lower layer, merged path, table, position) of resident node *ino*
        (see :mod:`.residents`), or ESTALE: the kernel names no such node."""
        found = self.inodes.resident(ino)
        if found is None:
            raise fs_error(errno.ESTALE)
        return found

    def _peek(self, ino: int) -> Node:
        """:meth:`node` to read from: a resident node stays one (see
        :meth:`.InodeTable.peek`)."""
        node = self.inodes.peek(ino)
        if node is None:
            raise fs_error(errno.ESTALE)
        return node

    def resolve_path(self, path: bytes) -> Entry:
        """Resolve a whole relative path from the root (rare: only for ``..``)."""
        entry = self.resolver.walk(self.inodes[ROOT_INO].entry, path)
        if entry is None:
            raise fs_error(errno.ENOENT, path)
        return entry

    def forget(self, ino: int, count: int) -> int | None:
        """The kernel forgot *count* lookups of *ino*; an fd for the caller to
        close after letting go of the lock (see :meth:`.InodeTable.forget`)."""
        return self.inodes.forget(ino, count)

    # -- attributes ----------------------------------------------------------

    def attr_of(self, ino: int, entry: Entry, path: bytes) -> Attr:
        """What stat shows for *entry*, found at merged *path* (which only
        records, see :mod:`.override`, need)."""
        # One unpack of the whole compact stat, not a field at a time.
        mode, uid, gid, _, _, nlink, rdev, size, blksize, blocks, atime, mtime, ctime = entry.st.fields()
        # Counting subdirectories of every merged layer is not worth it; 1 is
        # what overlayfs reports and what find(1) understands.
        if entry.merged:
            nlink = 1
        elif entry.nlink is not None:
            nlink = entry.nlink
        if self.overrides is not None:
            record = self.record(ino, entry, path)
            if record is not None:
                uid, gid, mode = record.uid, record.gid, apply(mode, record)
        if self.ids is not None:
            uid, gid = self.ids.shown_uid(uid), self.ids.shown_gid(gid)
        # A metadata-only copy shows its data's blocks, as the kernel does.
        if entry.data is not None:
            blocks = entry.data.blocks
        # Positional: the fields in Attr's order (keywords cost a third more, on every entry of every listing).
        return Attr(ino, mode, nlink, uid, gid, rdev, size, blksize, blocks, atime, mtime, ctime)

    def record(self, ino: int, entry: Entry, path: bytes) -> Record | None:
        """The owner/mode record of node *ino*'s *entry* at merged *path*,
        where its layer keeps them (a pinned object is read through its pin)."""
        assert self.overrides is not None
        layer = entry.layers[0]
        node = self.inodes.get(ino)
        pin = _pin(node) if node is not None and node.entry is entry else None
        if pin is not None:
            where, follow = proc_path(pin), True
        elif entry.index is not None:
            assert self.resolver.index is not None
            where, follow = proc_path(self.resolver.index.index, entry.index), False
        elif path:
            where, follow = proc_path(*self.stack.at(layer, path)), False
        else:
            where, follow = proc_path(self.stack.layers[layer].fd), True
        return self.overrides.read(layer, where, follow, entry.st)

    def stored_uid(self, uid: int) -> int:
        """The owner to store for *uid* as seen through the mount."""
        return uid if self.ids is None else self.ids.stored_uid(uid)

    def stored_gid(self, gid: int) -> int:
        """The group to store for *gid* as seen through the mount."""
        return gid if self.ids is None else self.ids.stored_gid(gid)

    def getattr(self, ino: int) -> Attr:
        """Fresh attributes of the node's own object (see :meth:`stat_object`)."""
        node = self.inodes.nodes.get(ino)
        if node is None:  # a resident node (see .residents): made from its lower file's fresh lstat
            node = self._peek(ino)
            return self.attr_of(ino, node.entry, node.path)
        st = self.stat_object(node)
        nlink = None
        # An indexed copy of a lower hard link counts the names still only
        # below ("overlay.nlink"); with no merged name left it shows 0, as
        # the kernel's in-memory count does.
        if (
            self.stack.layers[node.entry.layers[0]].writable
            and not stat.S_ISDIR(st.st_mode)
            and (st.st_nlink > 1 or (node.gone and st.st_nlink > 0))
        ):
            path, follow = self._path(node)
            nlink = self.resolver.nlink_of(path, follow, st, unlinked=node.gone)
        node.entry = node.entry.restat(st, nlink, node.entry.data)
        return self.attr_of(ino, node.entry, node.path)

    def birth_time(self, ino: int) -> int | None:
        """The birth time (ns) of the node's own object, as statx shows it on
        the kernel's overlayfs; None where its filesystem keeps none."""
        return birth_time_ns(*self.object_path(self.node(ino)))

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if not stat.S_ISLNK(node.entry.st.st_mode):
            raise fs_error(errno.EINVAL)
        pin = _pin(node)
        if pin is not None:
            return os.readlink(b"", dir_fd=pin)  # readlinkat(2) on the O_PATH fd of the link
        self.stat_object(node)
        dfd, name = self._place(node)
        return os.readlink(name, dir_fd=dfd)

    # -- the node's own object ---------------------------------------------------

    def _place(self, node: Node) -> tuple[int, bytes]:
        """(directory fd, name) where *node*'s object should be: its index
        copy, or its name in its layer (b"" for the layer root itself).
        Unchecked: callers use :meth:`stat_object` or :meth:`open_object`."""
        entry = node.entry
        if entry.index is not None:
            assert self.resolver.index is not None
            return self.resolver.index.index, entry.index
        if not node.path:
            return self.stack.layers[entry.layers[0]].fd, b""
        return self.stack.at(entry.layers[0], node.path)

    def _path(self, node: Node) -> tuple[bytes, bool]:
        """A path to *node*'s object for calls without an ``*at`` form, and
        whether to follow its last step (only a magic link of an fd we hold)."""
        pin = _pin(node)
        if pin is not None:
            return proc_path(pin), True
        dfd, name = self._place(node)
        return (proc_path(dfd, name), False) if name else (proc_path(dfd), True)

    def _check(self, node: Node, st: os.stat_result) -> os.stat_result:
        """*st*, if it is of *node*'s object; ENOENT if its name now holds
        another one (a lower name cannot: lowers do not change)."""
        if self.stack.layers[node.entry.layers[0]].writable and (st.st_dev, st.st_ino) != node.entry.real:
            raise fs_error(errno.ENOENT, node.path)
        return st

    def stat_object(self, node: Node) -> os.stat_result:
        """lstat of *node*'s own object, or ENOENT: never of another object."""
        pin = _pin(node)
        if pin is not None:
            return os.fstat(pin)
        dfd, name = self._place(node)
        if not name:
            return os.fstat(dfd)
        return self._check(node, os.stat(name, dir_fd=dfd, follow_symlinks=False))

    def object_path(self, node: Node) -> tuple[bytes, bool]:
        """:meth:`_path` of *node*'s object, checked to be that object now
        (nothing runs between the check and the caller's use of the path).
        An object in a lower layer needs no check: lowers do not change,
        and a lower name the union lost is reached by its pin."""
        self.check_current(node)
        return self._path(node)

    def check_current(self, node: Node) -> None:
        """ENOENT unless *node*'s object is still where the node finds it.
        Only an upper one, an index copy or a pinned one can have changed:
        lowers do not change, and a lower name the union lost is reached
        by its pin."""
        entry = node.entry
        if entry.index is not None or node.pin is not None or self.stack.layers[entry.layers[0]].writable:
            self.stat_object(node)

    def open_object(self, node: Node, flags: int) -> int:
        """An fd on *node*'s own object opened with *flags* (a final symlink
        is never followed), or ENOENT.  Lower files are opened O_NOATIME.
        A metadata-only copy opened to read is its data's file (the kernel's
        ``ovl_path_realdata``): its own content is a hole until written."""
        flags |= os.O_CLOEXEC
        data = node.entry.data
        if data is not None and not flags & (os.O_WRONLY | os.O_RDWR | os.O_PATH):
            return self.stack.open_real(data.layer, data.path, flags)
        pin = _pin(node)
        if pin is not None:
            # Reopening the pin's magic link opens the pinned object itself.
            return os.dup(pin) if flags & os.O_PATH else os.open(proc_path(pin), flags)
        dfd, name = self._place(node)
        if not name:
            return os.open(proc_path(dfd), flags)
        flags |= os.O_NOFOLLOW
        if not self.stack.layers[node.entry.layers[0]].writable:
            # A lower name holds the same object for as long as the mount
            # lasts: nothing to check after the open.
            if not flags & (os.O_WRONLY | os.O_RDWR):
                try:
                    return os.open(name, flags | os.O_NOATIME, dir_fd=dfd)
                except PermissionError:
                    pass  # not the owner: O_NOATIME is refused
            return os.open(name, flags, dir_fd=dfd)
        fd = os.open(name, flags, dir_fd=dfd)
        try:
            self._check(node, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- directories (read by .directories.Directories) ---------------------------

    def opendir(self, ino: int, caller: Caller = DAEMON) -> int:
        """Open a directory for *caller* (counted in its fair share, see
        :mod:`.handles`); its listing is made now, or shared."""
        return self.dirs.open(ino, caller)

    def readdir(
        self, handle: int, start: int, plain: bool = False, lean: bool = False
    ) -> Iterator[tuple[int, bytes, Node | None, Attr]]:
        """Entries of open directory *handle* from offset *start*: (next
        offset, name, node-to-be, attributes); see :meth:`.Directories.read`."""
        return self.dirs.read(handle, start, plain, lean)

    def readdir_at(
        self, ino: int, cookie: int, plain: bool = False, caller: Caller = DAEMON, lean: bool = False
    ) -> Iterator[tuple[int, bytes, Node | None, Attr]]:
        """:meth:`readdir` of directory *ino* for *caller*, a reader without a
        handle (the kernel's zero-message opendir); see :meth:`.Directories.read_at`."""
        return self.dirs.read_at(ino, cookie, plain, caller, lean)

    def remember(self, node: Node) -> None:
        """The kernel accepted a readdir entry and holds a reference now."""
        self.inodes.remember(node.path, node.entry, node.parent, made=node)

    def releasedir(self, handle: int) -> None:
        self.dirs.release(handle)

    def usage(self) -> dict[str, int]:
        """What open handles hold now (``user.pyunionfs.stats`` shows it):
        handles of files and directories, every caller's together and the
        bounds they are held to (:mod:`.handles`), the directory listings
        those hold (:class:`.cache.Listing`) with their names, and of those
        the ones held for readers without a handle (:meth:`readdir_at`); and
        the nodes the kernel holds, as objects and as columns (:mod:`.residents`)."""
        cache, share = self.resolver.cache, self.handles.share
        return {
            "open_files": len(self.handles),
            "open_dirs": len(self.dirs),
            "handles_max": share.total,
            "handles_per_uid_max": share.per_uid,
            "listings": cache.live_listings,
            "listed_names": cache.live_listed_names,
            "held_listings": len(cache.held),
            "held_names": cache.held.names,
            "nodes": len(self.inodes.nodes),
            "resident_nodes": len(self.inodes.residents),
        }

    # -- files ---------------------------------------------------------------

    def open(self, ino: int, flags: int, caller: Caller = DAEMON) -> int:
        """Open for reading; returns the fd, which is also the FUSE file handle."""
        node = self.node(ino)
        if flags & _WRITE_FLAGS:
            raise fs_error(errno.EROFS)
        if node.entry.is_dir:
            raise fs_error(errno.EISDIR)
        with self.handles.share.admitted(caller.uid):
            fd = self.open_object(node, flags & BACKING_FLAGS)
            self.handles.add(fd, ino, caller.uid)
        return fd

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(fh, size, offset)

    def release(self, fh: int) -> None:
        self.handles.release(fh)

    def detach(self, fh: int) -> int | None:
        """RELEASE of handle *fh*: its fd, for the caller to close after
        letting go of the lock (see :meth:`.HandleTable.detach`)."""
        return self.handles.detach(fh)

    # -- xattrs and the rest ---------------------------------------------------

    def listxattr(self, ino: int, caller: Caller = DAEMON) -> list[bytes]:
        """Always listed afresh (a write or chown may drop ``security.capability``).

        ``trusted.*`` names only for a caller with CAP_SYS_ADMIN, as the
        kernel lists them (see :mod:`.callers`).
        """
        names = [v for v in map(self.markers.visible_xattr, self._stored_xattrs(self._peek(ino))) if v is not None]
        if any(n.startswith(TRUSTED) for n in names) and not caller.sys_admin():
            names = [n for n in names if not n.startswith(TRUSTED)]
        return names

    def _stored_xattrs(self, node: Node, strict: bool = False) -> list[bytes]:
        """The stored xattr names of *node*'s object; where xattrs are not
        supported, none (unless *strict*)."""
        return self._stored_xattrs_at(*self.object_path(node), strict)

    def _stored_xattrs_at(self, path: bytes, follow: bool, strict: bool = False) -> list[bytes]:
        """:meth:`_stored_xattrs` of the object at *path* (see :meth:`object_path`)."""
        try:
            return [os.fsencode(n) for n in os.listxattr(path, follow_symlinks=follow)]
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM) and not strict:
                return []
            raise

    def getxattr(self, ino: int, name: bytes, caller: Caller = DAEMON) -> bytes:
        """The value of xattr *name*; ENODATA for ``trusted.*`` without
        CAP_SYS_ADMIN, as the kernel answers before asking any filesystem."""
        node = self.inodes.nodes.get(ino)
        where: tuple[bytes, bool] | None = None
        if node is not None:
            known = node.xattrs
        else:  # a resident node (see .residents): a lower file, found at its name without a check
            layer, path, table, pos = self._resident(ino)
            known = NO_XATTRS if table.bare(pos) else None
        if name.startswith(TRUSTED) and not caller.sys_admin():
            raise fs_error(errno.ENODATA, name)
        if known is None:
            where = (proc_path(*self.stack.at(layer, path)), False) if node is None else self.object_path(node)
            try:
                names = self._stored_xattrs_at(*where, strict=True)
            except OSError:
                pass  # not known; the getxattr below reports what is wrong
            else:
                # One shared empty set for the common "none": a set per node
                # costs 216 bytes, more than the node itself (``ls -l`` of a
                # big directory asks every entry for its label and ACL).
                known = frozenset(v for v in map(self.markers.visible_xattr, names) if v is not None) or NO_XATTRS
                if node is not None:
                    node.xattrs = known
                elif known is NO_XATTRS:
                    table.mark_bare(pos)
        if known is not None and name not in known:
            raise fs_error(errno.ENODATA, name)
        if where is None:
            assert node is not None  # (a resident node known bare has no xattr to read: ENODATA above)
            where = self.object_path(node)
        path, follow = where
        try:
            return os.getxattr(path, self.markers.stored_xattr(name), follow_symlinks=follow)
        except OSError as exc:
            # The kernel asks for ACLs to check permissions, and takes only
            # "none" for an answer where a layer has no xattrs at all.
            if name.startswith(b"system.posix_acl_") and exc.errno == errno.EOPNOTSUPP:
                raise fs_error(errno.ENODATA, name) from None
            raise

    def access(self, ino: int, mode: int) -> None:
        """Only what the kernel cannot know: writes to a read-only mount."""
        if ino not in self.inodes:
            raise fs_error(errno.ESTALE)
        if mode & os.W_OK and self.readonly:
            raise fs_error(errno.EROFS)

    def statfs(self) -> os.statvfs_result:
        """The upper's filesystem (or the top layer's), as overlayfs reports."""
        return self.stack.statvfs(0)


def _pin(node: Node) -> int | None:
    """The pin a request reaches *node*'s object by, if any.

    A gone node (no name of it known) always goes by its pin.  A node still
    named goes by its pin too while the pin holds the object the node shows:
    its known name may be one still only in a lower layer (a hard link whose
    copy is in ``index/``), which the node's entry does not describe.  A pin
    of another object (taken before a removal that then failed, or before a
    copy-up) is not used: the node's checked name is.
    """
    if node.pin is None:
        return None
    if node.gone:
        return node.pin
    st = os.fstat(node.pin)
    return node.pin if (st.st_dev, st.st_ino) == node.entry.real else None
