"""The layer store on disk: its directory, records and layers, and the sweep of temporaries.

:class:`StoreRecords` is everything about the store's directory that pull
(:mod:`.pull`), push (:mod:`.push`) and ``commit --tag`` (:mod:`.commit`)
share: where things are, the lock, a private workspace, reading the image
records, tagging, and removing an image with the layers and blobs no other
image uses (the reference counts are the records themselves).
:class:`.store.Store` puts them together.

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
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import ImageError, LayerError, StoreError, UsageError
from .ocilayout import Descriptor, atomic_file, digest_hex, dump_json, is_exists_error, load_json

__all__ = [
    "IMAGE_PREFIX",
    "Image",
    "Staged",
    "StoreRecords",
    "default_store",
    "parse_ref",
    "utc_now",
    "whiteout_mode",
]

#: ``pyunionfs mount image:NAME[:TAG] ...``: what tells an image from a list of lower directories.
IMAGE_PREFIX = "image:"


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


def utc_now() -> str:
    """Now, as the ``created`` of an OCI config or history entry (and of a layer's meta.json)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------
# The store's directory and records
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
class Staged:
    """What a command prepared in its tmp directory, to be moved in under the lock."""

    blobs: dict[str, str] = field(default_factory=dict)  # digest -> tmp file
    layers: dict[str, str] = field(default_factory=dict)  # diff hex -> tmp layer dir (diff/ inside)
    #: diff hex -> (source of the uncompressed tar or compressed blob, descriptor seen, tar size)
    sources: dict[str, tuple[str, Descriptor, int]] = field(default_factory=dict)


class StoreRecords:
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

    def load(self, name: str, manifest_digest: str) -> Image:
        """Image *name*: its manifest (*manifest_digest*) and config read from the blobs.  Takes no
        lock: the caller holds it, or has just moved the image in."""
        manifest = self._json_blob(manifest_digest, "manifest")
        cfg = Descriptor.parse(manifest.get("config"), f"manifest {manifest_digest}")
        return Image(name, manifest_digest, manifest, cfg.digest, self._json_blob(cfg.digest, "config"))

    def images(self) -> list[Image]:
        return [self.load(n, d) for n, d in self.records().items()]

    def image(self, ref: str) -> Image:
        """The image named NAME[:TAG], or by a unique prefix (4+ hex) of its IMAGE ID, as docker allows."""
        records = self.records()
        try:
            name = parse_ref(ref)
        except UsageError:
            name = ""
        if name in records:
            return self.load(name, records[name])
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

    # -- staging and moving in --------------------------------------------

    def stage_layer(self, ws: str, staged: Staged, diff_id: str, source: str, seen: Descriptor,
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
        meta = {"diff_id": diff_id, "size": size, "compressed": [seen.to_json()], "stored": utc_now()}
        with open(os.path.join(target, "meta.json"), "wb") as f:
            f.write(json.dumps(meta, indent=2).encode() + b"\n")
        staged.layers[hexid] = target

    def move_in(self, ws: str, staged: Staged, records: dict[str, str], needed: list[str]) -> None:
        """Under the lock: blobs in, layers in (or ours discarded), then the records.

        The one way anything enters the store: pull and ``commit --tag`` stage
        in a :meth:`workspace` and end here.  Layers staged before the lock was
        taken are checked again (an ``rmi`` may have removed one meanwhile) and
        *needed* (every DiffID the new records use) must all be present before
        a record is written, so no record ever names a missing layer.
        """
        with self.locked():
            for hexid, (source, seen, size) in staged.sources.items():
                diff_id = "sha256:" + hexid
                if hexid not in staged.layers and not self.has_layer(diff_id):
                    self.stage_layer(ws, staged, diff_id, source, seen, size)  # an rmi took it meanwhile
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
                img = self.load(name, manifest_digest)
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

    # -- tag -------------------------------------------------------------------

    def tag(self, ref: str, name: str) -> Image:
        """Record image *ref* (NAME[:TAG] or an IMAGE ID prefix) under *name* too, as
        ``docker tag`` does: a second record of the same manifest, nothing copied."""
        target = parse_ref(name)
        with self.locked():
            img = self.image(ref)
            with atomic_file(self._record_path(target)) as f:
                f.write(dump_json({"name": target, "manifest": img.manifest_digest}) + b"\n")
        return self.load(target, img.manifest_digest)

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
