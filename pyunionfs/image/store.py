"""The layer store: images pulled, committed and pushed, their layers unpacked once and shared.

Layout of the store directory (see :func:`default_store`)::

    STORE/lock                     flock(2)ed while records change
    STORE/blobs/sha256/<hex>       manifests, configs, compressed layers, as pulled or committed
    STORE/layers/<diffid-hex>/diff the layer unpacked (kernel whiteouts): a lower, shared by images
    STORE/layers/<diffid-hex>/meta.json   {diff_id, size, compressed: [descriptors seen]}
    STORE/images/<quoted NAME:TAG> {name, manifest}: the tag -> manifest digest record
    STORE/tmp/<random>/            work in progress, with its own flock(2)ed ``.lock``

Why it is safe against crashes and concurrent commands:

* Everything long (copying, verifying, unpacking) happens in a private
  ``tmp/`` directory without the store lock.  Only then, under the lock,
  are blobs and layer directories renamed into place and the image record
  written, records last.  A killed pull leaves at most a ``tmp/``
  directory, which no mount ever uses and the next command removes (its
  ``.lock`` is no longer held), or complete layers no record names yet,
  which ``rmi`` collects.
* A layer directory is renamed into place whole: if another command got
  there first, rename(2) fails and ours is discarded; both were unpacked
  from bytes with the same DiffID, so either is right.
* Layers the store already had when a pull started are checked again under
  the lock (an ``rmi`` may have removed them meanwhile) and unpacked then.

Layer sizes are those of the uncompressed layer tar (what ``docker images``
reports is close to that); a layer's id is its DiffID, so two images built
on the same base share the base's directories on disk.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from ..errors import MALFORMED_INPUT, ImageError, LayerError, StoreError, UsageError, malformed
from .compression import Compression, open_zstd
from .digest import Hasher, HashWriter
from .ocilayout import (
    CONTAINERD_NAME,
    MT_CONFIG,
    MT_LAYER_GZIP,
    MT_LAYER_TAR,
    MT_MANIFEST,
    REF_NAME,
    Descriptor,
    Layout,
    LayoutWriter,
    atomic_file,
    compression_of,
    digest_hex,
    dump_json,
    host_platform,
    is_exists_error,
    json_list,
    load_json,
    split_layout_arg,
)
from .progress import Progress, human

__all__ = [
    "IMAGE_PREFIX",
    "Image",
    "Progress",
    "Store",
    "default_store",
    "format_history",
    "format_images",
    "human",
    "parse_ref",
    "whiteout_mode",
]

#: ``pyunionfs mount image:NAME[:TAG] ...``: what tells an image from a list of lower directories.
IMAGE_PREFIX = "image:"
_CHUNK = 1024 * 1024


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------


def default_store() -> str:
    """``$PYUNIONFS_STORE``, else /var/lib/pyunionfs for root, else the XDG data directory."""
    env = os.environ.get("PYUNIONFS_STORE")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/pyunionfs"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "pyunionfs")


def parse_ref(ref: str) -> str:
    """``NAME[:TAG]`` -> ``NAME:TAG`` (tag ``latest`` by default), as docker reads it.

    The tag is what follows the last ``:`` when no ``/`` follows it, so a
    registry port (``host:5000/app``) is part of the name.  Names and tags
    become file names in the store and table cells: no whitespace, control
    characters or ``..``.
    """
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        name, tag = ref, "latest"
    if not name or not tag or any(c.isspace() or ord(c) < 32 for c in ref) or ".." in name.split("/"):
        raise UsageError(f"invalid image name {ref!r} (want NAME[:TAG])")
    if len(tag) > 128 or tag.startswith((".", "-")) or not all(c.isalnum() or c in "._-" for c in tag):
        raise UsageError(f"invalid tag {tag!r} in {ref!r} (letters, digits, '.', '_', '-'; at most 128)")
    if name != name.lower():
        raise UsageError(f"invalid image name {name!r}: names are lowercase")
    return f"{name}:{tag}"


def whiteout_mode() -> str:
    """How layers are unpacked: kernel markers (0/0 devices) as root, OCI ``.wh.`` files otherwise.

    An unprivileged user cannot mknod a whiteout outside a user namespace;
    pyunionfs reads ``.wh.`` files as whiteouts (``oci_whiteouts=on``, the
    default), so a rootless store still mounts.  The kernel's overlayfs
    needs the device form, which root (or uid 0 of a user namespace) gets.
    """
    return "device" if os.geteuid() == 0 else "oci"


def _maybe_ref(ref: str) -> str | None:
    try:
        return parse_ref(ref)
    except UsageError:
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------


@dataclass(slots=True)
class Image:
    """One tagged image of the store, its JSON documents parsed."""

    name: str  # NAME:TAG
    manifest_digest: str
    manifest: dict[str, Any]
    config_digest: str
    config: dict[str, Any]

    @property
    def id(self) -> str:
        """Docker's IMAGE ID: the config digest, shortened for display."""
        return digest_hex(self.config_digest)[:12]

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config.get("rootfs", {}).get("diff_ids", []))

    @property
    def layer_descriptors(self) -> list[Descriptor]:
        return [Descriptor.parse(d, f"manifest {self.manifest_digest}") for d in self.manifest.get("layers", [])]


@dataclass(slots=True)
class _Staged:
    """What a command prepared in its tmp directory, to be moved in under the lock."""

    blobs: dict[str, str] = field(default_factory=dict)  # digest -> tmp file
    layers: dict[str, str] = field(default_factory=dict)  # diff hex -> tmp layer dir (diff/ inside)
    #: diff hex -> (source of the uncompressed tar or compressed blob, descriptor seen, tar size)
    sources: dict[str, tuple[str, Descriptor, int]] = field(default_factory=dict)


class Store:
    """A store directory, made on first use unless *create* is false (a command
    that only reads creates nothing: a missing store reads as an empty one).

    Every command sweeps ``tmp/`` of what killed commands left first.
    """

    def __init__(self, root: str | None = None, *, create: bool = True) -> None:
        self.root = os.path.abspath(root or default_store())
        self.create = create
        if create:
            try:
                for sub in ("blobs/sha256", "layers", "images", "tmp"):
                    os.makedirs(os.path.join(self.root, sub), mode=0o700 if sub == "tmp" else 0o755, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"store {self.root}: {exc.strerror}") from None
        if os.path.isdir(os.path.join(self.root, "tmp")):
            self._clean_tmp()

    # -- paths -----------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", digest_hex(digest))

    def layer_path(self, diff_id: str) -> str:
        return os.path.join(self.root, "layers", digest_hex(diff_id, "DiffID"))

    def layer_dir(self, diff_id: str) -> str:
        """The unpacked layer, to be used as a lower."""
        return os.path.join(self.layer_path(diff_id), "diff")

    def has_layer(self, diff_id: str) -> bool:
        return os.path.exists(os.path.join(self.layer_path(diff_id), "meta.json"))

    def _record_path(self, name: str) -> str:
        return os.path.join(self.root, "images", urllib.parse.quote(name, safe=""))

    # -- locking and scratch space ----------------------------------------

    @contextlib.contextmanager
    def locked(self, shared: bool = False) -> Iterator[None]:
        """Exclusive use of the records (and of moving things in or out); *shared* for
        readers, so a listing never meets an image half removed.  Not reentrant."""
        try:
            fd = os.open(os.path.join(self.root, "lock"), (os.O_CREAT | os.O_RDWR if self.create else os.O_RDONLY)
                         | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            if self.create or not shared:
                raise
            yield  # a reader of a store never written to: nothing to wait for
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def workspace(self) -> Iterator[str]:
        """A private tmp directory, removed afterwards; stale ones of killed commands go first."""
        self._clean_tmp()
        path = tempfile.mkdtemp(prefix="work-", dir=os.path.join(self.root, "tmp"))
        fd = os.open(os.path.join(path, ".lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            _remove_tree(path)
            os.close(fd)

    def _clean_tmp(self) -> None:
        tmp = os.path.join(self.root, "tmp")
        try:
            names = os.listdir(tmp)
        except OSError:
            return  # not ours to read: another user's store, read only
        for name in names:
            path = os.path.join(tmp, name)
            with contextlib.suppress(OSError):
                if time.time() - os.lstat(path).st_mtime < 60:
                    continue  # maybe being set up right now: its .lock may not be held yet
            try:
                fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                fd = -1  # no lock file: garbage (or an rmi's trash, removed by the rmi itself)
            try:
                if fd >= 0:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # someone is working there
            finally:
                if fd >= 0:
                    os.close(fd)
            _remove_tree(path)

    # -- reading -----------------------------------------------------------

    def _json_blob(self, digest: str, what: str) -> dict[str, Any]:
        try:
            with open(self.blob_path(digest), "rb") as f:
                return load_json(f.read(), f"{what} {digest}")
        except FileNotFoundError:
            raise StoreError(f"store {self.root}: {what} {digest} is missing (damaged store?)") from None

    def records(self) -> dict[str, str]:
        """NAME:TAG -> manifest digest, for every image."""
        out: dict[str, str] = {}
        if not self.create and not os.path.isdir(os.path.join(self.root, "images")):
            return out  # no store yet: no images
        for entry in sorted(os.listdir(os.path.join(self.root, "images"))):
            if entry.startswith("."):
                continue
            with open(os.path.join(self.root, "images", entry), "rb") as f:
                rec = load_json(f.read(), f"image record {entry}")
            out[rec["name"]] = rec["manifest"]
        return out

    def _load(self, name: str, manifest_digest: str) -> Image:
        manifest = self._json_blob(manifest_digest, "manifest")
        cfg = Descriptor.parse(manifest.get("config"), f"manifest {manifest_digest}")
        return Image(name, manifest_digest, manifest, cfg.digest, self._json_blob(cfg.digest, "config"))

    def images(self) -> list[Image]:
        return [self._load(n, d) for n, d in self.records().items()]

    def image(self, ref: str) -> Image:
        """The image named NAME[:TAG], or by a unique prefix (4+ hex) of its IMAGE ID, as docker allows."""
        records = self.records()
        try:
            name = parse_ref(ref)
        except UsageError:
            name = ""
        if name in records:
            return self._load(name, records[name])
        ref_hex = ref.removeprefix("sha256:")
        if len(ref_hex) >= 4 and all(c in "0123456789abcdef" for c in ref_hex):
            found = [img for img in self.images() if digest_hex(img.config_digest).startswith(ref_hex)]
            if len({img.config_digest for img in found}) > 1:
                raise StoreError(f"image id {ref} is ambiguous: {', '.join(i.name for i in found)}")
            if found:
                return found[0]
        if not name:
            parse_ref(ref)  # raises the usage error
        raise StoreError(f"no image {name} in store {self.root}")

    def lowers(self, ref: str) -> list[str]:
        """The image's layer directories, topmost first (the order of a lower list)."""
        with self.locked(shared=True):
            img = self.image(ref)
            dirs = []
            for diff_id in img.diff_ids:
                if not self.has_layer(diff_id):
                    raise StoreError(f"image {img.name}: layer {diff_id} is missing from store {self.root}")
                dirs.append(self.layer_dir(diff_id))
        if not dirs:
            raise ImageError(f"image {img.name} has no layers to mount")
        return dirs[::-1]

    def layer_meta(self, diff_id: str) -> dict[str, Any]:
        try:
            with open(os.path.join(self.layer_path(diff_id), "meta.json"), "rb") as f:
                return load_json(f.read(), f"layer {diff_id} meta.json")
        except FileNotFoundError:
            return {"diff_id": diff_id, "size": 0, "compressed": []}

    # -- staging and committing --------------------------------------------

    def _stage_layer(self, ws: str, staged: _Staged, diff_id: str, source: str, seen: Descriptor,
                     size: int) -> None:
        """Unpack *source* (a layer tar, plain or gzip) into the workspace, with its meta.json."""
        hexid = digest_hex(diff_id, "DiffID")
        target = os.path.join(ws, "layers", hexid)
        os.makedirs(target)
        try:
            from .layerapply import apply_layer

            apply_layer(source, os.path.join(target, "diff"), mode=whiteout_mode())
        except LayerError as exc:
            raise LayerError(f"layer {seen.digest}: {exc}") from None
        meta = {"diff_id": diff_id, "size": size, "compressed": [seen.to_json()], "stored": _now()}
        with open(os.path.join(target, "meta.json"), "wb") as f:
            f.write(json.dumps(meta, indent=2).encode() + b"\n")
        staged.layers[hexid] = target

    def _commit(self, ws: str, staged: _Staged, records: dict[str, str], needed: list[str]) -> None:
        """Under the lock: blobs in, layers in (or ours discarded), then the records."""
        with self.locked():
            for hexid, (source, seen, size) in staged.sources.items():
                diff_id = "sha256:" + hexid
                if hexid not in staged.layers and not self.has_layer(diff_id):
                    self._stage_layer(ws, staged, diff_id, source, seen, size)  # an rmi took it meanwhile
            for digest, tmp in staged.blobs.items():
                dest = self.blob_path(digest)
                if not os.path.exists(dest):
                    os.chmod(tmp, 0o644)
                    os.rename(tmp, dest)
            for hexid, tmp in staged.layers.items():
                try:
                    os.rename(tmp, os.path.join(self.root, "layers", hexid))
                except OSError as exc:
                    if not is_exists_error(exc):
                        raise
            for hexid, (_, seen, _) in staged.sources.items():
                self._note_compressed(hexid, seen)
            for diff_id in needed:
                if not self.has_layer(diff_id):
                    raise StoreError(f"layer {diff_id} vanished from store {self.root} while being stored")
            for name, manifest_digest in records.items():
                img = self._load(name, manifest_digest)
                for desc in img.layer_descriptors:
                    if not os.path.exists(self.blob_path(desc.digest)):  # an rmi of the base meanwhile
                        raise StoreError(f"blob {desc.digest} vanished from store {self.root}; try again")
                with atomic_file(self._record_path(name)) as f:
                    f.write(dump_json({"name": name, "manifest": manifest_digest}) + b"\n")

    def _note_compressed(self, hexid: str, seen: Descriptor) -> None:
        """Remember one more compressed blob that unpacks to this layer."""
        path = os.path.join(self.root, "layers", hexid, "meta.json")
        meta = self.layer_meta("sha256:" + hexid)
        known = meta.setdefault("compressed", [])
        if any(d.get("digest") == seen.digest for d in known):
            return
        known.append(seen.to_json())
        with atomic_file(path) as f:
            f.write(json.dumps(meta, indent=2).encode() + b"\n")

    # -- pull ----------------------------------------------------------------

    def pull(self, arg: str, name: str | None = None) -> Image:
        """Import the image LAYOUT[:TAG] (an OCI layout directory); every blob is checked first."""
        root, tag = split_layout_arg(arg, must_exist=True)
        layout = Layout(root)
        mdesc, manifest, found_name = layout.select(tag)
        if name is None:
            if found_name and (":" in found_name or "/" in found_name):
                name = found_name
            else:
                base = os.path.basename(os.path.normpath(os.path.abspath(root))).lower()
                name = f"{base}:{found_name or tag or 'latest'}"
        name = parse_ref(name)
        cdesc = Descriptor.parse(manifest.get("config"), f"manifest {mdesc.digest}")
        config_bytes = layout.read_blob(cdesc)
        config = load_json(config_bytes, f"config {cdesc.digest}")
        rootfs = config.get("rootfs")
        if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" \
                or not isinstance(rootfs.get("diff_ids"), list):
            raise ImageError(f"config {cdesc.digest}: no rootfs of type layers with diff_ids")
        diff_ids = [str(d) for d in rootfs["diff_ids"]]
        layers = [Descriptor.parse(d, f"manifest {mdesc.digest}") for d in json_list(manifest, "layers",
                                                                                     f"manifest {mdesc.digest}")]
        if len(layers) != len(diff_ids):
            raise ImageError(f"manifest {mdesc.digest}: {len(layers)} layers but config {cdesc.digest} "
                             f"lists {len(diff_ids)} diff_ids")
        for d in diff_ids:
            digest_hex(d, f"config {cdesc.digest}: DiffID")
        manifest_bytes = layout.read_blob(mdesc)
        progress = Progress(f"pull {name}", len(layers))
        try:
            with self.workspace() as ws:
                staged = _Staged()
                os.makedirs(os.path.join(ws, "blobs"))
                os.makedirs(os.path.join(ws, "layers"))
                for desc, diff_id in zip(layers, diff_ids, strict=True):
                    self._pull_layer(layout, ws, staged, desc, diff_id, progress)
                    progress.layer_done()
                for digest, data in ((mdesc.digest, manifest_bytes), (cdesc.digest, config_bytes)):
                    tmp = os.path.join(ws, "blobs", digest_hex(digest))
                    with open(tmp, "wb") as f:
                        f.write(data)
                    staged.blobs[digest] = tmp
                self._commit(ws, staged, {name: mdesc.digest}, diff_ids)
        finally:
            progress.close()
        return self._load(name, mdesc.digest)

    def _pull_layer(self, layout: Layout, ws: str, staged: _Staged, desc: Descriptor, diff_id: str,
                    progress: Progress) -> None:
        hexid = digest_hex(diff_id, "DiffID")
        comp = compression_of(desc.media_type)
        tmp = os.path.join(ws, "blobs", digest_hex(desc.digest))
        if desc.digest not in staged.blobs:
            layout.copy_blob(desc, tmp, progress.add)
        staged.blobs[desc.digest] = tmp
        if hexid in staged.sources:
            return  # the same layer twice in one image
        source = tmp
        with open(tmp, "rb") as raw:
            if comp == "zstd":
                source = os.path.join(ws, hexid + ".tar")
                got, size = _unzstd(raw, source, desc.digest)
            else:
                stream: Any = gzip.GzipFile(fileobj=raw, mode="rb") if comp == "gzip" else raw
                got, size = _hash_stream(stream, desc.digest)
        if got != diff_id:
            raise ImageError(f"blob {desc.digest}: uncompressed content has DiffID {got}, the config says {diff_id}")
        staged.sources[hexid] = (source, desc, size)
        if not self.has_layer(diff_id):
            self._stage_layer(ws, staged, diff_id, source, desc, size)

    # -- push ----------------------------------------------------------------

    def push(self, ref: str, arg: str, compress: Compression | None = None,
             convert: bool = False) -> tuple[Image, str, Descriptor]:
        """Write image *ref* into the OCI layout LAYOUT[:TAG]; returns (image, tag, manifest descriptor).

        Compressed layers are copied as they are, so an image pulled from a
        layout and pushed again keeps its digests; plain layers are
        compressed with *compress* (default gzip, level 6; deterministic:
        the same layer always gives the same blob) and the manifest is
        rewritten to say so.  With *convert* (``push --compress FORMAT``),
        layers compressed otherwise are recompressed into *compress*'s
        format too, for a consumer that reads only that one.
        """
        with self.locked(shared=True):  # an rmi waits: the blobs are read as they are
            return self._push(ref, arg, compress or Compression(), convert)

    def _push(self, ref: str, arg: str, compress: Compression, convert: bool) -> tuple[Image, str, Descriptor]:
        img = self.image(ref)
        root, tag = split_layout_arg(arg, must_exist=False)
        tag = tag or img.name.rpartition(":")[2]
        parse_ref(f"x:{tag}")
        out = LayoutWriter(root)
        layers = img.layer_descriptors
        progress = Progress(f"push {img.name}", len(layers))
        new_layers = []
        try:
            for desc in layers:
                new_layers.append(self._push_layer(out, desc, progress, compress, convert))
                progress.layer_done()
        finally:
            progress.close()
        cdesc = Descriptor.parse(img.manifest.get("config"), f"manifest {img.manifest_digest}")
        if img.manifest.get("mediaType", MT_MANIFEST) == MT_MANIFEST and cdesc.media_type == MT_CONFIG \
                and new_layers == layers:
            with open(self.blob_path(img.manifest_digest), "rb") as f:
                manifest_bytes = f.read()
        else:
            manifest_bytes = dump_json(_oci_manifest(Descriptor(MT_CONFIG, cdesc.digest, cdesc.size), new_layers))
        with open(self.blob_path(cdesc.digest), "rb") as f:
            out.put_bytes(f.read(), MT_CONFIG)
        mdesc = out.put_bytes(manifest_bytes, MT_MANIFEST)
        mdesc = Descriptor(MT_MANIFEST, mdesc.digest, mdesc.size,
                           {REF_NAME: tag, CONTAINERD_NAME: f"{img.name.rpartition(':')[0]}:{tag}"},
                           {"os": img.config.get("os", "linux"),
                            "architecture": img.config.get("architecture", "amd64")})
        out.tag(mdesc, tag)
        return img, tag, mdesc

    def _push_layer(self, out: LayoutWriter, desc: Descriptor, progress: Progress, compress: Compression,
                    convert: bool) -> Descriptor:
        comp = compression_of(desc.media_type)
        if comp != "none" and (comp == compress.format or not convert):
            if not out.has(desc.digest):
                tmp = out.temp()
                with open(self.blob_path(desc.digest), "rb") as src, open(tmp, "wb") as dst:
                    _copy(src, dst, progress.add)
                out.put_file(tmp, desc.digest)
            else:
                progress.add(desc.size)
            return _normalise(desc)
        from .layertar import open_layer_stream

        tmp = out.temp()
        with open(tmp, "wb") as dst:
            h = Hasher()
            packed = compress.writer(HashWriter(dst, h))  # type: ignore[arg-type]
            try:
                with open_layer_stream(self.blob_path(desc.digest)) as src:
                    _copy(src, packed, progress.add)  # type: ignore[arg-type]
            except LayerError as exc:
                raise LayerError(f"blob {desc.digest}: {exc}") from None
            packed.close()
        new = Descriptor(compress.media_type, h.digest, h.size)
        out.put_file(tmp, new.digest)
        return new

    # -- commit --------------------------------------------------------------

    def commit(self, upper: str, tag: str, base: str | None = None, message: str | None = None,
               userxattr: bool = False, lowers: list[str] | None = None,
               workdir: str | None = None,
               compress: Compression | None = None) -> tuple[Image, str | None, tuple[bytes, ...]]:
        """Store *upper* as a new layer on top of image *base* (or on nothing) and tag the result.

        Returns (new image, the layer's DiffID, paths left out of the layer).
        The new layer's history entry says *message* (``pyunionfs commit``
        by default) as its ``created_by``, as ``docker history`` shows it.
        *lowers* (default: *base*'s layers) and *workdir* are what the upper
        was mounted with (see :func:`.layertar.commit`); *compress* is how
        the layer's blob is compressed (default gzip, level 6).

        An upper that changed nothing on top of a base with layers adds no
        layer: the history gets an ``empty_layer`` entry, as docker and
        BuildKit record a step without changes, and the DiffID returned is
        None.  (On nothing, the empty layer is stored, so the image mounts.)
        """
        from .layertar import commit as commit_tar

        name = parse_ref(tag)
        parent = self.image(base) if base is not None else None
        if lowers is None and base is not None and parent is not None and parent.diff_ids:
            # A base whose layers are gone still commits; names only they hold are then missed (and warned of).
            with contextlib.suppress(StoreError, ImageError):
                lowers = self.lowers(base)
        progress = Progress(f"commit {name}", 1)
        try:
            with self.workspace() as ws:
                staged = _Staged()
                tar = os.path.join(ws, "layer.tar")
                res = commit_tar(upper, tar, userxattr=userxattr, lowers=lowers, workdir=workdir,
                                 compress=compress or Compression(), progress=progress.add)
                assert res.compressed_path is not None and res.compressed_digest is not None
                empty = res.members == 0 and parent is not None and bool(parent.diff_ids)
                new_layers: list[Descriptor] = []
                if not empty:
                    size = os.stat(tar).st_size
                    seen = Descriptor(res.compression.media_type if res.compression else MT_LAYER_GZIP,
                                      res.compressed_digest, os.stat(res.compressed_path).st_size)
                    new_layers.append(seen)
                    staged.blobs[res.compressed_digest] = res.compressed_path
                    staged.sources[digest_hex(res.diff_id)] = (tar, seen, size)
                    os.makedirs(os.path.join(ws, "layers"))
                    if not self.has_layer(res.diff_id):
                        self._stage_layer(ws, staged, res.diff_id, tar, seen, size)
                progress.layer_done()
                now = _now()
                if parent is not None:
                    config = copy.deepcopy(parent.config)
                    layers = [_normalise(d) for d in parent.layer_descriptors]
                else:
                    os_name, arch = host_platform()
                    config = {"architecture": arch, "os": os_name, "config": {},
                              "rootfs": {"type": "layers", "diff_ids": []}, "history": []}
                    layers = []
                config["created"] = now
                config.setdefault("rootfs", {"type": "layers", "diff_ids": []})["diff_ids"] = \
                    [*config["rootfs"].get("diff_ids", []), *([] if empty else [res.diff_id])]
                entry: dict[str, Any] = {"created": now, "created_by": message or "pyunionfs commit"}
                if empty:
                    entry["empty_layer"] = True
                config.setdefault("history", []).append(entry)
                config_bytes = dump_json(config)
                cdesc = _bytes_blob(ws, staged, config_bytes, MT_CONFIG)
                manifest_bytes = dump_json(_oci_manifest(cdesc, [*layers, *new_layers]))
                mdesc = _bytes_blob(ws, staged, manifest_bytes, MT_MANIFEST)
                self._commit(ws, staged, {name: mdesc.digest}, config["rootfs"]["diff_ids"])
        finally:
            progress.close()
        return self._load(name, mdesc.digest), None if empty else res.diff_id, res.skipped

    # -- tag -------------------------------------------------------------------

    def tag(self, ref: str, name: str) -> Image:
        """Record image *ref* (NAME[:TAG] or an IMAGE ID prefix) under *name* too, as
        ``docker tag`` does: a second record of the same manifest, nothing copied."""
        target = parse_ref(name)
        with self.locked():
            img = self.image(ref)
            with atomic_file(self._record_path(target)) as f:
                f.write(dump_json({"name": target, "manifest": img.manifest_digest}) + b"\n")
        return self._load(target, img.manifest_digest)

    # -- rmi -------------------------------------------------------------------

    def remove(self, ref: str) -> tuple[Image, list[str]]:
        """Untag image *ref*; delete every layer and blob no remaining image uses.

        Returns (the image, the DiffIDs of the layers deleted).  Layers and
        blobs that no record names (left by a crash between moving them in
        and writing the record) are collected at the same time.
        """
        with self.locked():
            img = self.image(ref)
            tags = sorted(i.name for i in self.images() if i.config_digest == img.config_digest)
            if img.name != _maybe_ref(ref) and len(tags) > 1:
                raise StoreError(f"image {img.id} has several tags ({', '.join(tags)}): remove them by name")
            os.unlink(self._record_path(img.name))
            keep_layers: set[str] = set()
            keep_blobs: set[str] = set()
            for other in self.images():
                keep_layers.update(digest_hex(d) for d in other.diff_ids)
                keep_blobs.update({digest_hex(other.manifest_digest), digest_hex(other.config_digest)})
                keep_blobs.update(digest_hex(d.digest) for d in other.layer_descriptors)
            removed = []
            trash = tempfile.mkdtemp(prefix="rmi-", dir=os.path.join(self.root, "tmp"))
            for hexid in sorted(os.listdir(os.path.join(self.root, "layers"))):
                if hexid not in keep_layers:
                    os.rename(os.path.join(self.root, "layers", hexid), os.path.join(trash, hexid))
                    removed.append("sha256:" + hexid)
            blobs = os.path.join(self.root, "blobs", "sha256")
            for hexid in os.listdir(blobs):
                if hexid not in keep_blobs:
                    os.unlink(os.path.join(blobs, hexid))
        _remove_tree(trash)  # outside the lock: the layers are already out of sight
        return img, removed


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _remove_tree(path: str) -> None:
    """rm -r, but never through a mount below *path* (a crashed test's, say)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            # mountinfo writes space, tab, newline and backslash as \ooo
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), line.split()[4]).decode(
                sys.getfilesystemencoding(), "surrogateescape")
            if point == real or point.startswith(real + "/"):
                print(f"pyunionfs: warning: {path} has a mount below it; not removed", file=sys.stderr)
                return
    shutil.rmtree(path, ignore_errors=True)


def _copy(src: IO[bytes], dst: IO[bytes], progress: Callable[[int], None] | None = None) -> None:
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        if progress is not None:
            progress(len(chunk))


def _hash_stream(stream: IO[bytes], digest: str) -> tuple[str, int]:
    """(sha256, size) of a (decompressed) layer stream; a broken stream names the blob."""
    h = Hasher()
    try:
        while chunk := stream.read(_CHUNK):
            h.update(chunk)
    except OSError as exc:
        raise LayerError(f"blob {digest}: cannot be decompressed ({malformed(exc)})") from None
    except MALFORMED_INPUT as exc:  # zlib.error from a corrupt deflate stream, EOFError when cut short
        raise LayerError(f"blob {digest}: cannot be decompressed ({malformed(exc)})") from None
    return h.digest, h.size


def _unzstd(raw: IO[bytes], dest: str, digest: str) -> tuple[str, int]:
    """Decompress a zstd layer to *dest* (apply reads plain tars), hashing it on the way."""
    h = Hasher()
    with open_zstd(raw, f"blob {digest}") as stream, open(dest, "wb") as out:  # type: ignore[arg-type]
        _copy(stream, HashWriter(out, h))  # type: ignore[arg-type]
    return h.digest, h.size


def _normalise(desc: Descriptor) -> Descriptor:
    """A layer descriptor in OCI media types (docker's name the same bytes differently)."""
    comp = compression_of(desc.media_type)
    mt = {"none": MT_LAYER_TAR, "gzip": MT_LAYER_GZIP}.get(comp, desc.media_type)
    return Descriptor(mt, desc.digest, desc.size, desc.annotations)


def _oci_manifest(config: Descriptor, layers: list[Descriptor]) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config.to_json(),
            "layers": [d.to_json() for d in layers]}


def _bytes_blob(ws: str, staged: _Staged, data: bytes, media_type: str) -> Descriptor:
    h = Hasher()
    h.update(data)
    tmp = os.path.join(ws, "blob-" + h.digest[7:])
    with open(tmp, "wb") as f:
        f.write(data)
    staged.blobs[h.digest] = tmp
    return Descriptor(media_type, h.digest, h.size)


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def format_images(store: Store) -> str:
    """``docker images`` with sharing made visible.

    SIZE is the sum of the image's layers; SHARED SIZE the part of it in
    layers another image uses too (stored once); the last line says what
    the store holds on disk, each layer counted once.
    """
    with store.locked(shared=True):
        images = store.images()
        users: dict[str, set[str]] = {}  # layer -> the images (by ID: two tags are one image) using it
        for img in images:
            for d in img.diff_ids:
                users.setdefault(d, set()).add(img.config_digest)
        sizes = {d: int(store.layer_meta(d).get("size", 0)) for d in users}
    rows: list[tuple[str, ...]] = [("REPOSITORY:TAG", "IMAGE ID", "LAYERS", "SIZE", "SHARED SIZE")]
    for img in images:
        ids = list(dict.fromkeys(img.diff_ids))
        total = sum(sizes[d] for d in ids)
        shared = sum(sizes[d] for d in ids if len(users[d]) > 1)
        rows.append((img.name, img.id, str(len(img.diff_ids)), human(total), human(shared)))
    footer = f"{len(images)} images, {len(users)} layers, {human(sum(sizes.values()))} of layers stored"
    return _table(rows) + "\n" + footer


def _date(created: Any) -> str:
    if not isinstance(created, str) or not created:
        return ""
    return created.replace("T", " ")[:19] + (" UTC" if len(created) >= 19 else "")


#: ``docker history`` cuts CREATED BY to this many characters, the last one an ellipsis.
CREATED_BY_WIDTH = 45


def _created_by(entry: dict[str, Any], trunc: bool) -> str:
    """One table cell: tabs and newlines as spaces; cut as docker does unless *trunc* is off."""
    text = " ".join(str(entry.get("created_by", "")).replace("\t", " ").splitlines())
    if trunc and len(text) > CREATED_BY_WIDTH:
        return text[: CREATED_BY_WIDTH - 1] + "\u2026"
    return text


def format_history(store: Store, ref: str, trunc: bool = True) -> str:
    """``docker history``: newest first; a row per history entry, an empty layer shown as 0B.

    CREATED BY is cut to 45 characters (the last an ellipsis) as docker
    does, so a long RUN line cannot stretch every row; *trunc* False
    (``--no-trunc``) shows it whole.  A config without history (or with
    fewer entries than layers) still gets one row per layer, with the
    columns it cannot know left empty.
    """
    with store.locked(shared=True):
        img = store.image(ref)
        sizes = {d: int(store.layer_meta(d).get("size", 0)) for d in img.diff_ids}
    diff_ids = img.diff_ids
    history = [h for h in img.config.get("history") or [] if isinstance(h, dict)]
    rows: list[tuple[str, ...]] = []
    layer = 0
    for h in history:
        if h.get("empty_layer"):
            rows.append(("<missing>", _date(h.get("created")), _created_by(h, trunc), "0B",
                         str(h.get("comment", ""))))
            continue
        if layer < len(diff_ids):
            d = diff_ids[layer]
            rows.append((digest_hex(d)[:12], _date(h.get("created")), _created_by(h, trunc),
                         human(sizes[d]), str(h.get("comment", ""))))
        layer += 1
    for d in diff_ids[layer:]:
        rows.append((digest_hex(d)[:12], "", "", human(sizes[d]), ""))
    header: tuple[str, ...] = ("LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT")
    return _table([header, *rows[::-1]])

