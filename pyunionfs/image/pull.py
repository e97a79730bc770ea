"""Pull: an image of an OCI layout (or, through :mod:`.remote`, a registry) into the store,
every blob checked before anything is kept.

Why everything is checked first: a layout is untrusted input (a download, a
tarball from elsewhere), and so is a registry.  Each blob is copied into a
private workspace and checked against its digest as it is copied
(:meth:`.ocilayout.Layout.copy_blob`, :meth:`.registry.Registry.download_blob`);
each layer's uncompressed content against the DiffID the config names; and
each layer is unpacked there (:func:`.layerapply.apply_layer` refuses an
unsafe one) before :meth:`.records.StoreRecords.move_in` moves anything into
the store, so a refused pull leaves the store as it was.
"""

from __future__ import annotations

import gzip
import os
from typing import IO, Any, Protocol

from ..errors import MALFORMED_INPUT, ImageError, LayerError, malformed
from .compression import open_zstd
from .digest import Hasher, HashWriter
from .ocilayout import Descriptor, Layout, compression_of, digest_hex, json_list, load_json, split_layout_arg
from .progress import CHUNK, Progress, copy_counted
from .references import Platform
from .records import Image, Staged, StoreRecords, parse_ref

__all__ = ["BlobSource", "import_image", "pull"]


class BlobSource(Protocol):
    """Where an image's blobs come from: an OCI layout here, a registry in :mod:`.remote`.

    Why a seam at exactly these two calls: everything else about a pull
    (the config's DiffIDs, unpacking, moving in under the lock) must be the
    same whatever the source, so that the same image from a layout or a
    registry ends as the same store state.
    """

    def read_blob(self, desc: Descriptor) -> bytes:
        """A small (JSON) blob, its size and digest checked."""
        ...

    def fetch_blobs(self, descs: list[Descriptor], dest: str, progress: Progress) -> None:
        """Each blob of *descs* as ``dest/<hex>``, its size and digest checked before it gets that
        name; ``progress.layer_done()`` after each."""
        ...


class LayoutSource:
    """An OCI layout directory as a :class:`BlobSource`: blobs copied one after the other."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def read_blob(self, desc: Descriptor) -> bytes:
        return self.layout.read_blob(desc)

    def fetch_blobs(self, descs: list[Descriptor], dest: str, progress: Progress) -> None:
        for desc in descs:
            path = os.path.join(dest, digest_hex(desc.digest))
            if not os.path.exists(path):
                self.layout.copy_blob(desc, path + ".part", progress.add)
                os.rename(path + ".part", path)
            progress.layer_done()


def pull(store: StoreRecords, arg: str, name: str | None = None, platform: Platform | None = None) -> Image:
    """Import the image LAYOUT[:TAG] (an OCI layout directory); every blob is checked first."""
    root, tag = split_layout_arg(arg, must_exist=True)
    layout = Layout(root)
    mdesc, manifest, found_name = layout.select(tag, platform)
    if name is None:
        if found_name and (":" in found_name or "/" in found_name):
            name = found_name
        else:
            base = os.path.basename(os.path.normpath(os.path.abspath(root))).lower()
            name = f"{base}:{found_name or tag or 'latest'}"
    return import_image(store, LayoutSource(layout), mdesc, manifest, layout.read_blob(mdesc), parse_ref(name))


def import_image(store: StoreRecords, source: BlobSource, mdesc: Descriptor, manifest: dict[str, Any],
                 manifest_bytes: bytes, name: str) -> Image:
    """Store the image of *manifest* (whose bytes are *manifest_bytes*, already checked against
    *mdesc*) as *name*: config and layers read from *source* into a workspace, every DiffID checked
    and every layer unpacked there, then all moved in at once; a refusal leaves the store as it was."""
    cdesc = Descriptor.parse(manifest.get("config"), f"manifest {mdesc.digest}")
    config_bytes = source.read_blob(cdesc)
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
    for desc in layers:
        compression_of(desc.media_type)  # an unreadable layer type refused before anything is fetched
    unique = list({d.digest: d for d in layers}.values())
    progress = Progress(f"pull {name}", len(unique))
    try:
        with store.workspace() as ws:
            staged = Staged()
            os.makedirs(os.path.join(ws, "blobs"))
            os.makedirs(os.path.join(ws, "layers"))
            source.fetch_blobs(unique, os.path.join(ws, "blobs"), progress)
            for desc, diff_id in zip(layers, diff_ids, strict=True):
                _pull_layer(store, ws, staged, desc, diff_id)
            for digest, data in ((mdesc.digest, manifest_bytes), (cdesc.digest, config_bytes)):
                tmp = os.path.join(ws, "blobs", digest_hex(digest))
                with open(tmp, "wb") as f:
                    f.write(data)
                staged.blobs[digest] = tmp
            store.move_in(ws, staged, {name: mdesc.digest}, diff_ids)
    finally:
        progress.close()
    return store.load(name, mdesc.digest)


def _pull_layer(store: StoreRecords, ws: str, staged: Staged, desc: Descriptor, diff_id: str) -> None:
    """One layer in the workspace: its blob (fetched, size and digest checked) hashed uncompressed
    against *diff_id*, and unpacked unless the store has it already."""
    hexid = digest_hex(diff_id, "DiffID")
    comp = compression_of(desc.media_type)
    tmp = os.path.join(ws, "blobs", digest_hex(desc.digest))
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
    if not store.has_layer(diff_id):
        store.stage_layer(ws, staged, diff_id, source, desc, size)


def _hash_stream(stream: IO[bytes], digest: str) -> tuple[str, int]:
    """(sha256, size) of a (decompressed) layer stream; a broken stream names the blob."""
    h = Hasher()
    try:
        while chunk := stream.read(CHUNK):
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
        copy_counted(stream, HashWriter(out, h))  # type: ignore[arg-type]
    return h.digest, h.size
