"""What ``apply`` checks before anything is written: the first pass over a layer, building the plan.

Why a module of its own: :mod:`.layerapply` writes; this one reads the archive once and decides
whether every member can be written, and where (paths, parents, markers: see
:mod:`.layerapply` for those rules), with the same answer the kernel would give later for its
metadata.  Whatever the kernel or the filesystem would refuse half way through a
layer (an owner ``chown(2)`` cannot take, a value ``setxattr(2)`` rejects, a device number
``mknod(2)`` cannot encode, a file larger than the free space) is refused here, while DIR is
still as it was.  The rules, and why:

* **owners**: uid and gid 0..2^32-2.  ``(uid_t)-1`` (2^32-1) means "leave unchanged" to
  ``chown(2)``, so a member owned by it would silently stay root's; larger or negative values
  (base-256 headers, PAX records) cannot be a uid at all.  A PAX ``uid``/``gid``/``size``
  record must be plain decimal digits: Python's tarfile reads anything else as 0, which would
  make a garbled owner root and a garbled size hide the member's data among the headers.
* **mode**: the 12 permission bits are used; the file-type bits some writers add are ignored
  (the type flag decides); anything beyond 16 bits is refused.
* **times**: an ``mtime`` must fit in a 64-bit ``time_t`` (PAX: decimal, optionally with a
  fraction).
* **devices**: major 0..4095, minor 0..2^20-1, what the kernel's 32-bit ``dev_t`` holds.
* **names and targets**: no NUL byte (a C string ends there); a symlink target of 1..4095 bytes
  (PATH_MAX with its NUL).
* **xattrs**: ``security.``, ``system.``, ``trusted.`` or ``user.`` followed by a name; the
  name as stored (after escaping ``overlay.*``) at most 255 bytes (XATTR_NAME_MAX); a value
  at most 65536 bytes (XATTR_SIZE_MAX); the names of one file together at most 65536 bytes
  (XATTR_LIST_MAX, or ``listxattr`` fails on the file); ``user.*`` only on regular files and
  directories (the kernel's rule); a default ACL only on a directory;
  ``security.capability`` of version 2 (20 bytes) or 3 (24 bytes, with a valid root uid),
  no flag but "effective" (version 1 is refused by the kernel since Linux 2.6.25's v2).
  Then, as the filesystem has its own limits (ext4 keeps all of a file's xattrs in one block)
  and the kernel validates ACLs, each distinct set of xattrs is tried on an unnamed
  ``O_TMPFILE`` inode of the target filesystem, which no directory ever lists.
* **size**: a size is never negative, and the regular files of the layer (rounded up to
  blocks, each hard-link group once) and its entries must fit in the free space and inodes of
  the target filesystem (what the layer replaces is not counted: a layer that only fits by
  replacing is refused, the safe side).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from ..errors import MALFORMED_INPUT, LayerError, malformed
from ..fs.markers import Markers, classify_oci_name
from ..fs.paths import join, split
from .changes import display
from .compression import GZIP_MAGIC, ZSTD_MAGIC
from .layertar import TAR_ENCODING, TAR_ERRORS, from_tar_text, member_xattrs, open_layer_stream

__all__ = [
    "DIR_FLAGS",
    "UID_MAX",
    "XATTR_LIST_MAX",
    "XATTR_NAME_MAX",
    "XATTR_SIZE_MAX",
    "Checker",
    "Member",
    "MemberCheck",
    "Plan",
    "SpaceCheck",
    "XattrProbe",
    "capability_problem",
    "check_layer",
    "check_xattrs",
    "header",
    "reading",
    "stored_xattrs",
]

#: The largest owner a layer may give: (uid_t)-1 is chown(2)'s "unchanged".
UID_MAX = 2**32 - 2
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
_SYMLINK_MAX = 4095  # PATH_MAX less the terminating NUL
_MAJOR_MAX = (1 << 12) - 1
_MINOR_MAX = (1 << 20) - 1
_MODE_MAX = 0o177777
_TIME_MIN, _TIME_MAX = -(2**63), 2**63 - 1
_NAMESPACES = (b"security.", b"system.", b"trusted.", b"user.")
_CAPS = b"security.capability"
_ACL_ACCESS = b"system.posix_acl_access"
_ACL_DEFAULT = b"system.posix_acl_default"
_CAP_REVISION_MASK = 0xFF000000
_CAP_FLAGS_EFFECTIVE = 0x000001
_CAP_SIZES = {0x02000000: 20, 0x03000000: 24}  # VFS_CAP_REVISION_2, _3: XATTR_CAPS_SZ_2, _3
_DECIMAL = re.compile(r"[0-9]+")
_PAX_TIME = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def _ascii_digits(text: str, pattern: re.Pattern[str]) -> bool:
    return pattern.fullmatch(text) is not None and text.isascii()


@dataclass(slots=True)
class MemberCheck:
    """The header of one member (*kind* as :mod:`.layerapply` classified it), checked."""

    info: tarfile.TarInfo
    kind: str  # dir reg sym lnk chr blk fifo | whiteout opaque

    def problem(self) -> str | None:
        """Why the member's header cannot be written as it says, or None (xattrs: :func:`check_xattrs`).

        Run first, before its name is used in any call: it refuses a NUL byte.
        """
        for check in (self._names, self._pax_numbers, self._owner, self._mode, self._mtime, self._size,
                      self._device):
            why = check()
            if why:
                return why
        return None

    def _pax_numbers(self) -> str | None:
        pax = self.info.pax_headers
        for key in ("uid", "gid", "size"):
            text = pax.get(key)
            if text is not None and not _ascii_digits(text, _DECIMAL):
                return f"PAX {key} record {text[:40]!r} is not a decimal number"
        text = pax.get("mtime")
        if text is not None and not _ascii_digits(text, _PAX_TIME):
            return f"PAX mtime record {text[:40]!r} is not a decimal time"
        return None

    def _owner(self) -> str | None:
        for what, value in (("uid", self.info.uid), ("gid", self.info.gid)):
            if not isinstance(value, int) or not 0 <= value <= UID_MAX:
                return f"{what} {value} is not a valid owner (0..{UID_MAX})"
        return None

    def _mode(self) -> str | None:
        mode = self.info.mode
        if not isinstance(mode, int) or not 0 <= mode <= _MODE_MAX:
            return f"mode {mode!r} is not a file mode"
        return None

    def _mtime(self) -> str | None:
        mtime = self.info.mtime
        text = self.info.pax_headers.get("mtime")
        whole = int(text.partition(".")[0]) if text is not None else mtime
        if not isinstance(whole, int) or not _TIME_MIN <= whole <= _TIME_MAX:
            return f"mtime {whole!r} does not fit in a time_t"
        return None

    def _size(self) -> str | None:
        if not isinstance(self.info.size, int) or self.info.size < 0:
            return f"size {self.info.size!r} is negative"
        return None

    def _device(self) -> str | None:
        if self.kind not in ("chr", "blk"):
            return None
        major, minor = self.info.devmajor, self.info.devminor
        if not 0 <= major <= _MAJOR_MAX or not 0 <= minor <= _MINOR_MAX:
            return f"device number {major}:{minor} is out of range (major 0..{_MAJOR_MAX}, minor 0..{_MINOR_MAX})"
        return None

    def _names(self) -> str | None:
        if "\0" in self.info.name:
            return "name has a NUL byte"
        if self.kind in ("sym", "lnk") and "\0" in self.info.linkname:
            return "link target has a NUL byte"
        if self.kind == "sym" and len(from_tar_text(self.info.linkname)) > _SYMLINK_MAX:
            return f"symlink target longer than {_SYMLINK_MAX} bytes"
        return None


def check_xattrs(pairs: list[tuple[bytes, bytes]], kind: str) -> str | None:
    """Why the xattrs *pairs* (stored names) cannot be set on a *kind* entry, or None."""
    listed = 0
    for name, value in pairs:
        shown = name.decode("utf-8", "backslashreplace")[:80]
        if b"\0" in name or not any(name.startswith(ns) and len(name) > len(ns) for ns in _NAMESPACES):
            return f"xattr name {shown!r} is not NAMESPACE.NAME (security, system, trusted or user)"
        if len(name) > XATTR_NAME_MAX:
            return f"xattr name {shown!r}... is longer than {XATTR_NAME_MAX} bytes (as stored)"
        if len(value) > XATTR_SIZE_MAX:
            return f"xattr {shown}: value of {len(value)} bytes, more than {XATTR_SIZE_MAX}"
        if name.startswith(b"user.") and kind not in ("reg", "dir"):
            return f"xattr {shown}: user.* xattrs exist only on regular files and directories"
        if name == _ACL_DEFAULT and kind != "dir":
            return f"xattr {shown}: a default ACL belongs to a directory"
        if name == _CAPS:
            why = capability_problem(value)
            if why:
                return f"xattr {shown}: {why}"
        listed += len(name) + 1
    if listed > XATTR_LIST_MAX:
        return f"xattr names take {listed} bytes, more than {XATTR_LIST_MAX} (listxattr could not list them)"
    return None


def capability_problem(value: bytes) -> str | None:
    """What is wrong with a ``security.capability`` value (struct vfs_cap_data), or None."""
    if len(value) < 4:
        return f"malformed file capability ({len(value)} bytes)"
    (magic,) = struct.unpack_from("<I", value)
    revision = magic & _CAP_REVISION_MASK
    want = _CAP_SIZES.get(revision)
    if want is None:
        return f"file capability of unknown or obsolete revision {revision >> 24}"
    if len(value) != want:
        return f"malformed file capability: revision {revision >> 24} is {want} bytes, not {len(value)}"
    if magic & ~_CAP_REVISION_MASK & ~_CAP_FLAGS_EFFECTIVE:
        return f"file capability with unknown flags {magic & ~_CAP_REVISION_MASK:#x}"
    if want == 24:
        (rootid,) = struct.unpack_from("<I", value, 20)
        if rootid > UID_MAX:
            return f"file capability with root uid {rootid}, not a valid uid"
    return None


class XattrProbe:
    """Tries sets of xattrs on unnamed inodes of the target's filesystem.

    ``O_TMPFILE`` makes an inode no directory lists, freed on close: the
    directory it is made in does not change (not even its times).  Where the
    filesystem cannot make one, there is nothing to try on and only the
    rules above are checked.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.usable = True
        self.known: dict[tuple[tuple[bytes, object], ...], str | None] = {}

    def problem(self, pairs: list[tuple[bytes, bytes]]) -> str | None:
        """Why the filesystem refuses *pairs* on one file, or None (probed once per distinct set)."""
        if not pairs or not self.usable:
            return None
        # A default ACL is tried as an access ACL on an inode of its own: same format and rules,
        # and the probe inode, a regular file, cannot hold a default one.
        tried = [(n, v) for n, v in pairs if n != _ACL_DEFAULT]
        default = [(_ACL_ACCESS, v) for n, v in pairs if n == _ACL_DEFAULT]
        return self._try(tried) or (self._try(default) if default else None)

    def _try(self, tried: list[tuple[bytes, bytes]]) -> str | None:
        if not tried:
            return None
        # values matter where the kernel parses them; elsewhere only their sizes do
        key = tuple((n, v if n.startswith((b"security.", b"system.")) else len(v)) for n, v in tried)
        if key in self.known:
            return self.known[key]
        try:
            fd = os.open(self.where, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.EACCES, errno.EROFS):
                self.usable = False
                return None
            raise
        why = None
        try:
            for name, value in tried:
                try:
                    os.setxattr(fd, name, value)
                except OSError as exc:
                    hint = " (not root?)" if exc.errno == errno.EPERM and os.geteuid() != 0 else ""
                    why = f"xattr {name.decode('utf-8', 'backslashreplace')[:80]}: {exc.strerror}{hint}"
                    break
        finally:
            os.close(fd)
        self.known[key] = why
        return why


class SpaceCheck:
    """Adds up what the layer's entries take, to compare with the target filesystem's free space."""

    def __init__(self) -> None:
        self.bytes = 0
        self.inodes = 0

    def add(self, kind: str, size: int) -> None:
        if kind in ("whiteout", "opaque", "lnk"):
            return  # a marker takes an inode at most; a hard link none
        self.inodes += 1
        if kind == "reg":
            self.bytes += size

    def problem(self, where: str) -> str | None:
        """Why the layer cannot fit on *where*'s filesystem, or None."""
        st = os.statvfs(where)
        block = st.f_frsize or st.f_bsize or 4096
        free_blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
        need = -(-self.bytes // block)  # the data alone: a layer refused here would certainly not fit
        if st.f_blocks and need > free_blocks:
            return (f"needs at least {self.bytes} bytes in {self.inodes} entries, "
                    f"{free_blocks * block} bytes free on the target filesystem")
        if st.f_files and self.inodes > st.f_ffree:
            return f"needs {self.inodes} inodes, {st.f_ffree} free on the target filesystem"
        return None


# --------------------------------------------------------------------------
# The plan: every member checked, nothing written
# --------------------------------------------------------------------------


DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME_MAX = 255


@dataclass(slots=True)
class Member:
    """One checked archive member and what it becomes."""

    index: int
    path: bytes  # normalised, relative to DIR; b"" is DIR itself
    info: tarfile.TarInfo
    kind: str  # dir reg sym lnk chr blk fifo | whiteout opaque (device and flatten modes)
    #: lnk: the path of the member it links to (never itself a link);
    #: whiteout: the path it deletes.
    target: bytes = b""


@dataclass(slots=True)
class Plan:
    members: list[Member] = field(default_factory=list)
    entries: dict[bytes, Member] = field(default_factory=dict)  # non-marker members by path
    whiteouts: list[bytes] = field(default_factory=list)
    opaques: list[bytes] = field(default_factory=list)


def member_kind(info: tarfile.TarInfo) -> str | None:
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


def stored_xattrs(info: tarfile.TarInfo, mode: str, markers: Markers) -> list[tuple[bytes, bytes]]:
    """A member's xattrs under the names they are written as (``overlay.*`` escaped but in flatten mode)."""
    pairs = member_xattrs(info)
    if mode == "flatten":
        return pairs
    return [(markers.stored_xattr(n), v) for n, v in pairs]


def header(info: tarfile.TarInfo) -> tuple[object, ...]:
    """Everything of a header that apply uses: the writing pass must meet what the checks saw."""
    return (info.name, info.type, info.size, info.mode, info.uid, info.gid, info.mtime, info.linkname,
            info.devmajor, info.devminor, sorted(info.pax_headers.items()))


class Checker:
    """Builds the plan, refusing the whole layer at its first unsafe member."""

    def __init__(self, layer: str, mode: str, root_fd: int | None, markers: Markers, where: str) -> None:
        self.layer = layer
        self.mode = mode
        self.root_fd = root_fd  # None: DIR does not exist yet, so holds nothing
        self.markers = markers
        self.probe = XattrProbe(where)  # where: DIR, or the directory it will be made in
        self.space = SpaceCheck()
        self.max_size = 2**63  # see data_limit()
        self.plan = Plan()
        self.seen: dict[bytes, Member] = {}  # every member path, markers included
        self._dir_state: dict[bytes, str] = {}

    def fail(self, info: tarfile.TarInfo | None, why: str) -> LayerError:
        where = f"{self.layer}: member {info.name[:200]!r}" if info is not None else self.layer
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
        kind = member_kind(info)
        if kind is None:
            raise self.fail(info, f"unsupported member type {info.type!r}")
        why = MemberCheck(info, kind).problem()
        if why:
            raise self.fail(info, why)
        if info.size > self.max_size:
            raise self.fail(info, f"size {info.size} is more than the archive can hold")
        path = self.normalise(info, info.name, "name")
        if path in self.seen:
            raise self.fail(info, f"duplicate entry for {display(path)!r}")
        member = Member(index, path, info, kind)
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
        elif kind == "chr" and Markers.is_whiteout_node(stat.S_IFCHR, os.makedev(info.devmajor, info.devminor)):
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
        if member.kind not in ("whiteout", "opaque", "lnk"):  # what gets metadata of its own
            xattrs = stored_xattrs(info, self.mode, self.markers)
            why = check_xattrs(xattrs, member.kind) or self.probe.problem(xattrs)
            if why:
                raise self.fail(info, why)
        self.space.add(member.kind, info.size)
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
                fd = os.open(a, DIR_FLAGS, dir_fd=fd)
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


class _EndGuard:
    """The layer's bytes as tarfile reads them, with an end that cannot be read past for ever.

    Told to skip a member (or a PAX header) of 2^64 bytes, tarfile's stream reader reads on
    past the end of the archive block by block, some 10^15 empty reads: a hang, not an error.
    After the end has been met a few dozen times more, another read is an error.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.empty = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data or size == 0:
            self.empty = 0
        else:
            self.empty += 1
            if self.empty > 64:
                raise EOFError("unexpected end of data: a size larger than the archive")
        return data


def data_limit(layer: str) -> int:
    """The most data one member of *layer* can hold: the file's size, or what a
    compressed file could decompress to (deflate expands 1032:1 at most; a zstd
    RLE block of 4 bytes holds up to 128 KiB: 32768:1)."""
    with open(layer, "rb") as f:
        head = f.read(4)
        size = os.fstat(f.fileno()).st_size
    if head.startswith(GZIP_MAGIC):
        return size * 1032
    return size * 32768 if head == ZSTD_MAGIC else size


@contextlib.contextmanager
def reading(layer: str) -> Iterator[tarfile.TarFile]:
    """The archive, read as a stream: a gzip layer is decompressed once per
    pass (one to check, one to write), never seeked in.  Whatever cannot be
    read becomes a :class:`LayerError`."""
    try:
        with open_layer_stream(layer) as raw, tarfile.open(  # type: ignore[call-overload]
            fileobj=_EndGuard(raw), mode="r|", encoding=TAR_ENCODING, errors=TAR_ERRORS
        ) as tf:
            yield tf
    except MALFORMED_INPUT as exc:
        raise LayerError(f"{layer}: not a readable tar archive ({malformed(exc)})") from None
    except OSError as exc:
        if exc.errno is None:  # gzip.BadGzipFile and the like
            raise LayerError(f"{layer}: not a readable tar archive ({malformed(exc)})") from None
        raise


def check_layer(layer: str, mode: str, root_fd: int | None, markers: Markers, where: str) -> Plan:
    """The first pass over *layer*: every member checked, nothing written; the plan of the second.

    *where* is DIR or, while it does not exist, the directory it will be made
    in: the filesystem whose limits count.  Anything refused is one
    :class:`LayerError`, whatever part of the reading or checking failed.
    """
    checker = Checker(layer, mode, root_fd, markers, where)
    try:
        checker.max_size = data_limit(layer)
        with reading(layer) as tf:
            for index, info in enumerate(tf):
                checker.add(index, info)
        checker.check_parents()
        why = checker.space.problem(where)
    except OSError as exc:
        raise LayerError(f"{exc.filename or layer}: {exc.strerror or malformed(exc)}") from None
    except MALFORMED_INPUT as exc:
        raise LayerError(f"{layer}: {malformed(exc)}") from None
    if why:
        raise LayerError(f"{layer}: {why}")
    return checker.plan
