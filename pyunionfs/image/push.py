"""Push: an image of the store written into an OCI layout, its layers compressed as asked.

Kept apart from the store's records because it only reads them (under the
shared lock, so an ``rmi`` waits) and writes elsewhere, through
:class:`.ocilayout.LayoutWriter`.
"""

from __future__ import annotations

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

__all__ = ["push"]


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
        return _push(store, ref, arg, compress or Compression(), convert)


def _push(store: StoreRecords, ref: str, arg: str, compress: Compression,
          convert: bool) -> tuple[Image, str, Descriptor]:
    """:func:`push`, the shared lock held."""
    img = store.image(ref)
    root, tag = split_layout_arg(arg, must_exist=False)
    tag = tag or img.name.rpartition(":")[2]
    parse_ref(f"x:{tag}")
    out = LayoutWriter(root)
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
    with open(store.blob_path(cdesc.digest), "rb") as f:
        out.put_bytes(f.read(), MT_CONFIG)
    mdesc = out.put_bytes(manifest_bytes, MT_MANIFEST)
    mdesc = Descriptor(MT_MANIFEST, mdesc.digest, mdesc.size,
                       {REF_NAME: tag, CONTAINERD_NAME: f"{img.name.rpartition(':')[0]}:{tag}"},
                       {"os": img.config.get("os", "linux"),
                        "architecture": img.config.get("architecture", "amd64")})
    out.tag(mdesc, tag)
    return img, tag, mdesc


def _push_layer(store: StoreRecords, out: LayoutWriter, desc: Descriptor, progress: Progress,
                compress: Compression, convert: bool) -> Descriptor:
    """One layer into *out*: a compressed blob copied as it is (its digest kept) unless *convert*
    asks for another format; a plain one (or one converted) compressed with *compress*."""
    comp = compression_of(desc.media_type)
    if comp != "none" and (comp == compress.format or not convert):
        if not out.has(desc.digest):
            tmp = out.temp()
            with open(store.blob_path(desc.digest), "rb") as src, open(tmp, "wb") as dst:
                copy_counted(src, dst, progress.add)
            out.put_file(tmp, desc.digest)
        else:
            progress.add(desc.size)
        return normalise_layer(desc)
    from .layertar import open_layer_stream

    tmp = out.temp()
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
    out.put_file(tmp, new.digest)
    return new
