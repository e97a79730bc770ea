"""Small OCI images for tests, written by hand so they do not depend on our own push.

A layer is made from a directory with :func:`pyunionfs.image.layertar.commit`
(the directory read as an overlay upper: 0/0 devices are whiteouts), and the
layout is written here from the spec: ``oci-layout``, ``index.json`` with the
tag as ``org.opencontainers.image.ref.name``, ``blobs/sha256/<hex>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pyunionfs.image.layertar import commit

T0 = 1_700_000_000


@dataclass
class LayerBlob:
    tar: Path
    diff_id: str
    gz: Path
    gz_digest: str


def put(path: Path, data: bytes = b"", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    os.utime(path, (T0, T0))
    return path


def whiteout(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    return path


def settle(root: Path) -> None:
    """Fixed mtimes everywhere, so the same tree always makes the same layer."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), (T0, T0), follow_symlinks=False)
    os.utime(root, (T0, T0))


def make_layer(tree: Path, out: Path) -> LayerBlob:
    """The directory *tree* as a layer tar and tar.gz under *out* (a directory)."""
    out.mkdir(parents=True, exist_ok=True)
    settle(tree)
    res = commit(str(tree), str(out / f"{tree.name}.tar"), gzip_too=True)
    assert res.gzip_path and res.gzip_digest
    return LayerBlob(Path(res.tar_path), res.diff_id, Path(res.gzip_path), res.gzip_digest)


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    d = layout / "blobs" / "sha256"
    d.mkdir(parents=True, exist_ok=True)
    (d / digest[7:]).write_bytes(data)
    return digest, len(data)


def write_layout(layout: Path, layers: list[LayerBlob], tag: str = "latest", *, gzip: bool = True,
                 created_by: list[str] | None = None, extra_index: list[dict] | None = None) -> dict:
    """An OCI layout holding one image of *layers* (bottom first); returns its digests."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    descs = []
    for lb in layers:
        path = lb.gz if gzip else lb.tar
        digest, size = _blob(layout, path.read_bytes())
        mt = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gzip else "")
        descs.append({"mediaType": mt, "digest": digest, "size": size})
    created_by = created_by or [f"step {i}" for i in range(len(layers))]
    config = {
        "architecture": "amd64", "os": "linux", "created": "2024-01-02T03:04:05Z",
        "rootfs": {"type": "layers", "diff_ids": [lb.diff_id for lb in layers]},
        "history": [{"created": f"2024-01-0{i + 1}T00:00:00Z", "created_by": c} for i, c in enumerate(created_by)],
    }
    cdigest, csize = _blob(layout, json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
                "layers": descs}
    mdigest, msize = _blob(layout, json.dumps(manifest).encode())
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": msize,
         "annotations": {"org.opencontainers.image.ref.name": tag}},
        *(extra_index or []),
    ]}
    (layout / "index.json").write_text(json.dumps(index))
    return {"manifest": mdigest, "config": cdigest, "layers": [d["digest"] for d in descs]}


def base_tree(root: Path) -> Path:
    """A small base: files, a directory, a symlink, an executable."""
    put(root / "etc" / "os-release", b"ID=test\n")
    put(root / "etc" / "motd", b"hello\n")
    put(root / "bin" / "tool", b"#!/bin/sh\necho tool\n", 0o755)
    put(root / "usr" / "share" / "doc" / "README", b"docs\n" * 100)
    (root / "lib").symlink_to("usr/lib")
    return root


def app_tree(root: Path, name: str = "app") -> Path:
    """A layer on top of :func:`base_tree`: adds, changes, deletes."""
    put(root / "etc" / "motd", f"welcome to {name}\n".encode())
    put(root / "srv" / name / "main.py", b"print('hi')\n")
    whiteout(root / "usr" / "share" / "doc")
    return root
