"""``commit --tag``: an upper stored as a new layer on top of an image of the store, and tagged.

The layer tar is made by :func:`.layertar.commit` (what ``commit -o`` writes
too); this module is what makes it an image: the layer unpacked into the
store, the base's config and manifest extended by one layer (or by an
``empty_layer`` history entry), all moved in under the store's lock.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any

from ..errors import ImageError, StoreError
from .compression import Compression
from .digest import Hasher
from .ocilayout import (
    MT_CONFIG,
    MT_LAYER_GZIP,
    MT_MANIFEST,
    Descriptor,
    digest_hex,
    dump_json,
    host_platform,
    normalise_layer,
    oci_manifest,
)
from .progress import Progress
from .records import Image, Staged, StoreRecords, parse_ref, utc_now

__all__ = ["commit"]


def commit(store: StoreRecords, upper: str, tag: str, base: str | None = None, message: str | None = None,
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
    parent = store.image(base) if base is not None else None
    if lowers is None and base is not None and parent is not None and parent.diff_ids:
        # A base whose layers are gone still commits; names only they hold are then missed (and warned of).
        with contextlib.suppress(StoreError, ImageError):
            lowers = store.lowers(base)
    progress = Progress(f"commit {name}", 1)
    try:
        with store.workspace() as ws:
            staged = Staged()
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
                if not store.has_layer(res.diff_id):
                    store.stage_layer(ws, staged, res.diff_id, tar, seen, size)
            progress.layer_done()
            now = utc_now()
            if parent is not None:
                config = copy.deepcopy(parent.config)
                layers = [normalise_layer(d) for d in parent.layer_descriptors]
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
            manifest_bytes = dump_json(oci_manifest(cdesc, [*layers, *new_layers]))
            mdesc = _bytes_blob(ws, staged, manifest_bytes, MT_MANIFEST)
            store.move_in(ws, staged, {name: mdesc.digest}, config["rootfs"]["diff_ids"])
    finally:
        progress.close()
    return store.load(name, mdesc.digest), None if empty else res.diff_id, res.skipped


def _bytes_blob(ws: str, staged: Staged, data: bytes, media_type: str) -> Descriptor:
    """Stage a small blob (a config, a manifest) made in memory; its descriptor."""
    h = Hasher()
    h.update(data)
    tmp = os.path.join(ws, "blob-" + h.digest[7:])
    with open(tmp, "wb") as f:
        f.write(data)
    staged.blobs[h.digest] = tmp
    return Descriptor(media_type, h.digest, h.size)
