"""OCI image layers as tar archives: the format rules, and ``commit`` (an upper out as a layer).

A layer (OCI image-spec ``layer.md``) is a tar archive of a directory's
changes: added and changed entries in full, deletions as empty ``.wh.NAME``
files, a directory whose lower contents are gone marked by ``.wh..wh..opq``
inside it.  The upper of an overlay holds the same information in the
kernel's format; :mod:`.changes` reads it, this module writes it out.

What a committed layer holds, and why:

* every entry of the upper (never the upper's root itself, whose opacity
  overlayfs ignores too), whiteouts of any format as ``.wh.NAME``, opaque
  directories as a ``.wh..wh..opq`` member right after the directory;
* in each directory the markers before the entries, each group sorted by
  name: OCI asks writers to put whiteouts before their siblings, and a
  sorted walk makes the output a function of the upper alone;
* numeric owners only (empty uname/gname), the 12 mode bits (setuid
  included), mtime in whole seconds as docker writes it, no atime or ctime:
  reading the upper (which may change atimes) cannot change the layer;
* user-visible xattrs as PAX ``SCHILY.xattr.NAME`` records, sorted
  (``security.capability`` included); the overlay's own records
  (``overlay.origin``, ``nlink``, ``impure``, ``opaque``...) are never
  emitted, and an escaped ``trusted.overlay.overlay.X`` goes out as
  ``trusted.overlay.X``, the name the mount shows;
* hard links as tar hard-link members pointing at the group's first path in
  member order (a tar reader needs the target earlier in the archive);
* with the lowers given, the names a copied-up lower hard link has only in
  the lowers (found through the work dir's ``index/``, see :mod:`.changes`):
  members of the same hard-link group as the copy's upper names, with the
  copy's metadata and content (the first member of the group, whichever
  it is, carries the data), and the lower directories leading to them
  with the lowers' metadata.  Without the lowers they cannot be found; a
  warning says how many names the layer lacks;
* sockets are skipped (tar cannot hold them; docker skips them too).

The archive is written once, through a tee that hashes it (the DiffID is
the sha256 of the uncompressed tar) and, when asked, compresses it (gzip or
zstd, see :mod:`.compression`: deterministic, so the compressed blob's
digest is a function of the tar too) and counts the bytes for a progress
display.
Both files are built under temporary names and renamed into place only when
complete.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import stat
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, BinaryIO

from ..errors import LayerError
from ..fs.entry import StatLike
from ..fs.markers import OCI_OPAQUE, Markers
from ..fs.paths import join
from .changes import UpperEntry, UpperWalk, Warn, display, warn_stderr
from .compression import ZSTD_MAGIC, Compression, Sink, open_zstd
from .digest import Hasher, HashWriter

__all__ = [
    "TAR_ENCODING",
    "TAR_ERRORS",
    "XATTR_PAX",
    "CommitResult",
    "commit",
    "from_tar_text",
    "member_mtime_ns",
    "member_xattrs",
    "open_layer_stream",
    "to_tar_text",
]

#: Member names and PAX values are bytes on disk; tarfile wants str.  UTF-8 with
#: surrogateescape maps every byte string to a str and back unchanged (names
#: that are not UTF-8 get PAX ``hdrcharset=BINARY``), whatever the locale.
TAR_ENCODING = "utf-8"
TAR_ERRORS = "surrogateescape"
#: PAX record prefix for extended attributes (star, GNU tar, Go, containerd).
XATTR_PAX = "SCHILY.xattr."

_GZIP_MAGIC = b"\x1f\x8b"
_OTHER_COMPRESSION = {
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
}
_WHITEOUT_MODE = 0o600  # what docker gives a whiteout member: it is never shown, only obeyed
_NS = 1_000_000_000


def to_tar_text(raw: bytes) -> str:
    return raw.decode(TAR_ENCODING, TAR_ERRORS)


def from_tar_text(text: str) -> bytes:
    return text.encode(TAR_ENCODING, TAR_ERRORS)


# --------------------------------------------------------------------------
# Reading side helpers (used by layerapply)
# --------------------------------------------------------------------------


def open_layer_stream(path: str | bytes) -> IO[bytes]:
    """The uncompressed bytes of a layer file, plain, gzip or zstd (told by magic, not by name).

    zstd needs the optional ``zstandard`` package; without it, a one-line refusal.
    Other compressions found in registries are named in the refusal, so the
    user knows to decompress first.
    """
    raw = open(path, "rb")  # noqa: SIM115 - handed to the caller, who closes it
    try:
        head = raw.read(6)
        raw.seek(0)
        if head.startswith(ZSTD_MAGIC):
            return open_zstd(raw, os.fsdecode(path))
        for magic, name in _OTHER_COMPRESSION.items():
            if head.startswith(magic):
                raise LayerError(f"{os.fsdecode(path)}: {name}-compressed; only plain, gzip and zstd layers are read")
        if head.startswith(_GZIP_MAGIC):
            return _OwningGzip(raw)  # type: ignore[return-value]
    except BaseException:
        raw.close()
        raise
    return raw


class _OwningGzip(gzip.GzipFile):
    """A gzip reader that closes the file it reads when it is closed."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def member_xattrs(info: tarfile.TarInfo) -> list[tuple[bytes, bytes]]:
    """The ``SCHILY.xattr.*`` records of a member, as (name, value) bytes."""
    out = []
    for key, value in info.pax_headers.items():
        if key.startswith(XATTR_PAX) and len(key) > len(XATTR_PAX):
            out.append((from_tar_text(key[len(XATTR_PAX) :]), from_tar_text(value)))
    return sorted(out)


def member_mtime_ns(info: tarfile.TarInfo) -> int:
    """A member's mtime in nanoseconds: exact from a PAX ``mtime`` record
    (tarfile turns it into a float, which loses the nanoseconds), else the
    header's whole seconds."""
    text = info.pax_headers.get("mtime")
    if text is not None:
        try:
            neg = text.startswith("-")
            whole, _, frac = text.lstrip("+-").partition(".")
            ns = int(whole or "0") * _NS + int((frac + "000000000")[:9])
            return -ns if neg else ns
        except ValueError:
            pass
    return int(info.mtime * _NS) if isinstance(info.mtime, float) else int(info.mtime) * _NS


# --------------------------------------------------------------------------
# commit
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What ``commit`` wrote: digests as ``sha256:<hex>``."""

    tar_path: str
    diff_id: str
    compressed_path: str | None = None
    compressed_digest: str | None = None
    #: Entries a tar cannot hold (sockets), left out.
    skipped: tuple[bytes, ...] = ()
    compression: Compression | None = None
    #: Members in the tar: 0 for an upper that changed nothing (an "empty layer").
    members: int = 0

    @property
    def gzip_path(self) -> str | None:
        return self.compressed_path if self.compression is not None and self.compression.format == "gzip" else None

    @property
    def gzip_digest(self) -> str | None:
        return self.compressed_digest if self.gzip_path is not None else None


class _Tee:
    """The tar's file object: every byte goes to the hashed tar file and,
    optionally, to a compressor (one pass over the upper for both), and is
    counted for *progress*."""

    def __init__(self, tar: HashWriter, packed: Sink | None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.tar = tar
        self.packed = packed
        self.progress = progress

    def write(self, data: bytes) -> int:
        self.tar.write(data)
        if self.packed is not None:
            self.packed.write(data)
        if self.progress is not None:
            self.progress(len(data))
        return len(data)

    def tell(self) -> int:
        return self.tar.tell()


def _base_info(name: bytes, st: StatLike, kind: bytes) -> tarfile.TarInfo:
    """A member header with every field set from *st* and nothing from the
    environment (no user or group names, no atime/ctime)."""
    info = tarfile.TarInfo(to_tar_text(name))
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid = st.st_uid
    info.gid = st.st_gid
    info.mtime = st.st_mtime_ns // _NS
    info.uname = ""
    info.gname = ""
    info.size = 0
    return info


def _marker_info(name: bytes, st: StatLike, mode: int) -> tarfile.TarInfo:
    info = _base_info(name, st, tarfile.REGTYPE)
    info.mode = mode
    return info


def _xattr_records(path: bytes, xattrs: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    records: dict[str, str] = {}
    for name, value in xattrs:
        try:
            key = XATTR_PAX + name.decode("utf-8")
        except UnicodeDecodeError:
            raise LayerError(f"{display(path)}: xattr name {name!r} is not UTF-8: no PAX record holds it") from None
        records[key] = to_tar_text(value)
    return records


_TYPES = {
    stat.S_IFDIR: tarfile.DIRTYPE,
    stat.S_IFREG: tarfile.REGTYPE,
    stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
}


class _LayerWriter:
    """Turns the entries of an :class:`UpperWalk` into tar members."""

    def __init__(self, walk: UpperWalk, tf: tarfile.TarFile) -> None:
        self.walk = walk
        self.tf = tf
        self.oci = Markers(oci=True)  # the tar's marker names, whatever the upper's namespace
        self.links: dict[tuple[int, int], bytes] = {}
        self.skipped: list[bytes] = []

    def add(self, e: UpperEntry) -> None:
        parent, _, name = e.path.rpartition(b"/")
        if e.whiteout:
            marker = self.oci.oci_whiteout_name(name)
            if marker is None:
                raise LayerError(f"{display(e.path)}: deleted, but a name this long has no .wh. form (255 bytes max)")
            self.tf.addfile(_marker_info(join(parent, marker), e.st, _WHITEOUT_MODE))
            return
        kind = _TYPES.get(stat.S_IFMT(e.st.st_mode))
        if kind is None:
            self.skipped.append(e.path)  # a socket
            return
        info = _base_info(e.path, e.st, kind)
        # A grafted name is a link of its index copy even when the copy's
        # only other link is the index itself (every upper name removed).
        if kind != tarfile.DIRTYPE and (e.st.st_nlink > 1 or e.index is not None):
            key = (e.st.st_dev, e.st.st_ino)
            first = self.links.get(key)
            if first is not None:
                info.type = tarfile.LNKTYPE
                info.linkname = to_tar_text(first)
                self.tf.addfile(info)
                return
            self.links[key] = e.path
        info.pax_headers = _xattr_records(e.path, e.xattrs)
        if kind == tarfile.SYMTYPE:
            info.linkname = to_tar_text(self.walk.readlink(e))
        elif kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor = os.major(e.st.st_rdev)
            info.devminor = os.minor(e.st.st_rdev)
        if kind != tarfile.REGTYPE:
            self.tf.addfile(info)
            if e.opaque:
                self.tf.addfile(_marker_info(join(e.path, OCI_OPAQUE), e.st, stat.S_IMODE(e.st.st_mode) & 0o777))
            return
        info.size = e.st.st_size
        fd = self.walk.open(e)
        with os.fdopen(fd, "rb") as f:
            try:
                self.tf.addfile(info, f)
            except OSError as exc:
                if exc.errno is None:  # tarfile: "unexpected end of data"
                    raise LayerError(f"{display(e.path)}: changed size while being committed") from None
                raise


def _temp_beside(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}")


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def commit(upper: str, out: str, *, gzip_too: bool = False, userxattr: bool = False,
           lowers: Sequence[str | bytes] | None = None, workdir: str | bytes | None = None,
           warn: Warn = warn_stderr, compress: Compression | None = None,
           progress: Callable[[int], None] | None = None) -> CommitResult:
    """Write the upper directory *upper* as an OCI layer tar at *out*
    (and a compressed copy at ``out + compress.suffix`` with *compress*;
    *gzip_too* is ``compress=Compression()``, gzip at level 6); see the
    module docstring.

    *lowers* (topmost first) and *workdir* (default: pyunionfs's, beside
    the upper) are the layers and work directory the upper was mounted
    with: they give the lower-only names of copied-up hard links.  *warn*
    is told when names are known to be missing; *progress* of every
    uncompressed byte written.
    """
    if compress is None and gzip_too:
        compress = Compression()
    packed_out = None if compress is None else out + compress.suffix
    for target in (out,) if packed_out is None else (out, packed_out):
        if _inside(os.path.dirname(os.path.abspath(target)) or ".", upper):
            raise LayerError(f"{target}: the layer cannot be written inside the upper it is made from")
    markers = Markers(userxattr=userxattr)
    tmp_tar = _temp_beside(out)
    tmp_gz = None if packed_out is None else _temp_beside(packed_out)
    made: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            files: list[BinaryIO] = []
            tar_file = stack.enter_context(open(tmp_tar, "wb"))
            made.append(tmp_tar)
            files.append(tar_file)
            hashed = HashWriter(tar_file, Hasher())
            gz_hashed: HashWriter | None = None
            gz: Sink | None = None
            if tmp_gz is not None and compress is not None:
                gz_file = stack.enter_context(open(tmp_gz, "wb"))
                made.append(tmp_gz)
                files.append(gz_file)
                gz_hashed = HashWriter(gz_file, Hasher())
                gz = compress.writer(gz_hashed)  # type: ignore[arg-type]
            walk = stack.enter_context(UpperWalk(
                os.fsencode(upper),
                markers,
                [os.fsencode(os.path.abspath(p)) for p in lowers or ()],
                None if workdir is None else os.fsencode(os.path.abspath(workdir)),
                warn,
            ))
            tf = tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115 - closed below, before gzip
                fileobj=_Tee(hashed, gz, progress),
                mode="w",
                format=tarfile.PAX_FORMAT,
                encoding=TAR_ENCODING,
                errors=TAR_ERRORS,
            )
            writer = _LayerWriter(walk, tf)
            entries = walk.entries()
            next(entries)  # the upper itself is not a member
            for e in entries:
                try:
                    writer.add(e)
                except OSError as exc:
                    raise LayerError(f"{os.path.join(upper, display(e.path))}: {exc.strerror or exc}") from None
            members = len(tf.members)
            tf.close()
            if gz is not None:
                gz.close()
            for f in files:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp_tar, out)
        made.remove(tmp_tar)
        diff_id = hashed.hasher.digest
        if tmp_gz is None or gz_hashed is None or packed_out is None:
            return CommitResult(out, diff_id, skipped=tuple(writer.skipped), members=members)
        os.rename(tmp_gz, packed_out)
        made.remove(tmp_gz)
        return CommitResult(out, diff_id, packed_out, gz_hashed.hasher.digest, tuple(writer.skipped),
                            compress, members)
    except OSError as exc:
        where = exc.filename if exc.filename is not None else upper
        raise LayerError(f"{os.fsdecode(where)}: {exc.strerror or exc}") from None
    finally:
        for leftover in made:
            with contextlib.suppress(OSError):
                os.unlink(leftover)
