"""Push: an image of the store written into an OCI layout (or, through :mod:`.remote`, a
registry), its layers compressed as asked.

Kept apart from the store's records because it only reads them (under the
shared lock, so an ``rmi`` waits) and writes elsewhere, through a
:class:`Sink`: :class:`.ocilayout.LayoutWriter` here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Protocol

from ..errors import LayerError
from .compression import Compression
from .digest import Hasher, HashWriter
from .ocilayout import (
    CONTAINERD_NAME,
    MT_CONFIG,
    MT_MANIFEST,
    REF_NAME,
    Descriptor,
    LayoutWriter,
    compression_of,
    dump_json,
    normalise_layer,
    oci_manifest,
    split_layout_arg,
)
from .progress import Progress, copy_counted
from .records import Image, StoreRecords, parse_ref

__all__ = ["LayoutSink", "Sink", "export_image", "push"]


class Sink(Protocol):
    """Where :func:`export_image` writes an image: an OCI layout (:class:`LayoutSink`), or a
    registry (:class:`.remote.RegistrySink`).  One seam, so that both get the same blobs and the
    same manifest bytes (the same manifest digest) from the same image."""

    def has(self, desc: Descriptor) -> bool:
        """Whether the blob is there already (then it is not sent again)."""
        ...

    def put_path(self, path: str, desc: Descriptor, progress: Progress) -> None:
        """Add the blob *desc* from the file *path* (a blob of the store), left in place."""
        ...

    def temp(self) -> str:
        """A new temporary file for a blob being made (a layer compressed on the way out)."""
        ...

    def put_temp(self, tmp: str, desc: Descriptor, progress: Progress) -> None:
        """Add the finished temporary *tmp* as blob *desc*; *tmp* is gone afterwards."""
        ...

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        """Add a small blob (the config) from memory."""
        ...

    def put_manifest(self, data: bytes, desc: Descriptor, tag: str) -> None:
        """Add the manifest (*data*, described by *desc*) and point *tag* at it, once every blob is in."""
        ...


class LayoutSink:
    """An OCI layout directory (made if missing) as a :class:`Sink`."""

    def __init__(self, root: str) -> None:
        self.out = LayoutWriter(root)

    def has(self, desc: Descriptor) -> bool:
        return self.out.has(desc.digest)

    def put_path(self, path: str, desc: Descriptor, progress: Progress) -> None:
        tmp = self.out.temp()
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            copy_counted(src, dst, progress.add)
        self.out.put_file(tmp, desc.digest)

    def temp(self) -> str:
        return self.out.temp()

    def put_temp(self, tmp: str, desc: Descriptor, progress: Progress) -> None:
        self.out.put_file(tmp, desc.digest)

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        return self.out.put_bytes(data, media_type)

    def put_manifest(self, data: bytes, desc: Descriptor, tag: str) -> None:
        self.out.put_bytes(data, desc.media_type)
        self.out.tag(desc, tag)


def push(store: StoreRecords, ref: str, arg: str, compress: Compression | None = None,
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
    with store.locked(shared=True):  # an rmi waits: the blobs are read as they are
        img = store.image(ref)
        root, tag = split_layout_arg(arg, must_exist=False)
        tag = tag or img.name.rpartition(":")[2]
        parse_ref(f"x:{tag}")
        mdesc = export_image(store, img, LayoutSink(root), tag, compress or Compression(), convert)
        return img, tag, mdesc


def export_image(store: StoreRecords, img: Image, out: Sink, tag: str, compress: Compression,
                 convert: bool) -> Descriptor:
    """Image *img* into *out* as *tag* (see :func:`push`); the caller holds the store's shared lock.
    Returns the manifest's descriptor (annotated with the names, and the platform, for an index)."""
    layers = img.layer_descriptors
    progress = Progress(f"push {img.name}", len(layers))
    new_layers = []
    try:
        for desc in layers:
            new_layers.append(_push_layer(store, out, desc, progress, compress, convert))
            progress.layer_done()
    finally:
        progress.close()
    cdesc = Descriptor.parse(img.manifest.get("config"), f"manifest {img.manifest_digest}")
    if img.manifest.get("mediaType", MT_MANIFEST) == MT_MANIFEST and cdesc.media_type == MT_CONFIG \
            and new_layers == layers:
        with open(store.blob_path(img.manifest_digest), "rb") as f:
            manifest_bytes = f.read()
    else:
        manifest_bytes = dump_json(oci_manifest(Descriptor(MT_CONFIG, cdesc.digest, cdesc.size), new_layers))
    config = Descriptor(MT_CONFIG, cdesc.digest, cdesc.size)
    if not out.has(config):
        with open(store.blob_path(cdesc.digest), "rb") as f:
            out.put_bytes(f.read(), MT_CONFIG)
    digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    mdesc = Descriptor(MT_MANIFEST, digest, len(manifest_bytes),
                       {REF_NAME: tag, CONTAINERD_NAME: f"{img.name.rpartition(':')[0]}:{tag}"},
                       {"os": img.config.get("os", "linux"),
                        "architecture": img.config.get("architecture", "amd64")})
    out.put_manifest(manifest_bytes, mdesc, tag)
    return mdesc


def _push_layer(store: StoreRecords, out: Sink, desc: Descriptor, progress: Progress,
                compress: Compression, convert: bool) -> Descriptor:
    """One layer into *out*: a compressed blob copied as it is (its digest kept) unless *convert*
    asks for another format; a plain one (or one converted) compressed with *compress*."""
    comp = compression_of(desc.media_type)
    if comp != "none" and (comp == compress.format or not convert):
        if not out.has(desc):
            out.put_path(store.blob_path(desc.digest), desc, progress)
        else:
            progress.add(desc.size)
        return normalise_layer(desc)
    from .layertar import open_layer_stream

    tmp = out.temp()
    try:
        with open(tmp, "wb") as dst:
            h = Hasher()
            packed = compress.writer(HashWriter(dst, h))  # type: ignore[arg-type]
            try:
                with open_layer_stream(store.blob_path(desc.digest)) as src:
                    copy_counted(src, packed, progress.add)  # type: ignore[arg-type]
            except LayerError as exc:
                raise LayerError(f"blob {desc.digest}: {exc}") from None
            packed.close()
        new = Descriptor(compress.media_type, h.digest, h.size)
        if out.has(new):
            os.unlink(tmp)
        else:
            out.put_temp(tmp, new, progress)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return new
