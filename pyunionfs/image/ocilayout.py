"""OCI image layouts (image-spec ``image-layout.md``): reading them checked, writing them atomically.

A layout is a directory holding ``oci-layout`` (``{"imageLayoutVersion":
"1.0.0"}``), ``index.json`` (descriptors of manifests, the tag being the
``org.opencontainers.image.ref.name`` annotation) and content-addressed
``blobs/sha256/<hex>``.  Everything read from one is untrusted: every blob
is checked against the size and digest of the descriptor that led to it
before it is believed, and read with a size cap, so a hostile layout can
neither lie about content nor make us read without end.

Docker's media types (``docker save`` converted by skopeo keeps them in
some setups) are accepted when reading; what we write is always OCI.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ..errors import MALFORMED_INPUT, ImageError, UsageError, malformed
from .digest import Hasher
from .references import Platform

__all__ = [
    "MT_CONFIG",
    "MT_INDEX",
    "MT_LAYER_GZIP",
    "MT_LAYER_TAR",
    "MT_LAYER_ZSTD",
    "MT_MANIFEST",
    "REF_NAME",
    "CONTAINERD_NAME",
    "Descriptor",
    "choose_platform",
    "Layout",
    "LayoutWriter",
    "compression_of",
    "digest_hex",
    "host_platform",
    "json_list",
    "load_json",
    "normalise_layer",
    "oci_manifest",
    "split_layout_arg",
]

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = MT_LAYER_TAR + "+gzip"
MT_LAYER_ZSTD = MT_LAYER_TAR + "+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
#: containerd (``ctr export``) records the full name here; we write and read it too.
CONTAINERD_NAME = "io.containerd.image.name"

_LAYER_TYPES = {
    MT_LAYER_TAR: "none",
    MT_LAYER_GZIP: "gzip",
    MT_LAYER_ZSTD: "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
#: Manifests, configs and indexes are small; anything bigger is refused unread.
MAX_JSON = 16 * 1024 * 1024
_CHUNK = 1024 * 1024
_HEX = re.compile(r"[0-9a-f]{64}")


def digest_hex(digest: str, what: str = "digest") -> str:
    """The hex part of ``sha256:<64 hex>``; anything else is refused.

    Only sha256 is accepted: it is what every registry and tool writes, and
    a digest is used as a file name, so its shape is checked before use.
    """
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not _HEX.fullmatch(hexpart):
        raise ImageError(f"{what} {digest!r} is not sha256:<64 lowercase hex>")
    return hexpart


def compression_of(media_type: str) -> str:
    """``none``, ``gzip`` or ``zstd`` for a layer media type; others are refused."""
    try:
        return _LAYER_TYPES[media_type]
    except KeyError:
        raise ImageError(f"layer media type {media_type!r} is not a tar layer this tool reads") from None


def host_platform() -> tuple[str, str]:
    """(os, architecture) in OCI's GOOS/GOARCH spelling, to pick from a multi-platform index."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "i386": "386"}.get(machine, machine)
    return "linux", arch


def choose_platform(index: dict[str, Any], want: Platform | None, what: str) -> Descriptor:
    """The descriptor of *index* (an image index or docker manifest list) for platform *want*
    (default: this host, any variant).  Entries without a platform (attestations, say) never match;
    of several that do, the first, as docker and containerd take it."""
    if want is None:
        os_name, arch = host_platform()
        want = Platform(os_name, arch)
    subs = [Descriptor.parse(m, what) for m in json_list(index, "manifests", what)]
    for sub in subs:
        if sub.platform and want.matches(sub.platform):
            return sub
    seen = sorted({Platform.of(s.platform).text for s in subs if s.platform})
    raise ImageError(f"{what}: no manifest for {want.text} in this image index (it has {', '.join(seen) or 'none'})")


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor, as far as we use one."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None

    @classmethod
    def parse(cls, data: Any, what: str) -> Descriptor:
        if not isinstance(data, dict):
            raise ImageError(f"{what}: a descriptor must be a JSON object")
        mt, digest, size = data.get("mediaType"), data.get("digest"), data.get("size")
        if not isinstance(mt, str) or not isinstance(digest, str) or type(size) is not int or size < 0:
            raise ImageError(f"{what}: a descriptor needs mediaType, digest and a non-negative size")
        digest_hex(digest, f"{what}: digest")
        ann = data.get("annotations") or {}
        plat = data.get("platform")
        if not isinstance(ann, dict) or (plat is not None and not isinstance(plat, dict)):
            raise ImageError(f"{what}: malformed annotations or platform")
        return cls(mt, digest, size, {str(k): str(v) for k, v in ann.items()}, plat)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        if self.platform:
            out["platform"] = self.platform
        return out


def normalise_layer(desc: Descriptor) -> Descriptor:
    """A layer descriptor in OCI media types (docker's name the same bytes differently)."""
    comp = compression_of(desc.media_type)
    mt = {"none": MT_LAYER_TAR, "gzip": MT_LAYER_GZIP}.get(comp, desc.media_type)
    return Descriptor(mt, desc.digest, desc.size, desc.annotations)


def oci_manifest(config: Descriptor, layers: list[Descriptor]) -> dict[str, Any]:
    """An OCI image manifest (the JSON object) of *config* and *layers*, bottom layer first."""
    return {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config.to_json(),
            "layers": [d.to_json() for d in layers]}


def split_layout_arg(arg: str, *, must_exist: bool) -> tuple[str, str | None]:
    """``LAYOUT[:TAG]`` -> (directory, tag or None).

    A path may itself hold a ``:``: an existing directory named by the whole
    argument wins; otherwise the text after the last ``:`` is the tag when it
    has no ``/`` (a tag never does).
    """
    if os.path.isdir(arg) or ":" not in arg:
        return arg, None
    path, _, tag = arg.rpartition(":")
    if "/" in tag or not path:
        return arg, None
    if must_exist and not os.path.isdir(path):
        return arg, None
    if not tag:
        raise UsageError(f"{arg}: empty tag after ':'")
    return path, tag


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object from untrusted bytes; anything else (nesting too deep included) is refused."""
    try:
        obj = json.loads(data)
    except MALFORMED_INPUT as exc:
        raise ImageError(f"{what}: not valid JSON ({malformed(exc)})") from None
    if not isinstance(obj, dict):
        raise ImageError(f"{what}: not a JSON object")
    return obj


def json_list(obj: dict[str, Any], key: str, what: str) -> list[Any]:
    """``obj[key]`` when it is a list (missing or null: empty); any other type is refused."""
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ImageError(f"{what}: {key} is not a list")
    return value


class Layout:
    """An OCI image layout directory, opened for reading."""

    def __init__(self, root: str) -> None:
        self.root = root
        try:
            with open(os.path.join(root, "oci-layout"), "rb") as f:
                marker = load_json(f.read(4096), f"{root}/oci-layout")
            with open(os.path.join(root, "index.json"), "rb") as f:
                self.index = load_json(f.read(MAX_JSON + 1), f"{root}/index.json")
        except FileNotFoundError as exc:
            raise ImageError(f"{root}: not an OCI image layout (no {os.path.basename(str(exc.filename))})") from None
        except OSError as exc:
            raise ImageError(f"{exc.filename or root}: {exc.strerror}") from None
        if marker.get("imageLayoutVersion") != "1.0.0":
            raise ImageError(f"{root}/oci-layout: imageLayoutVersion {marker.get('imageLayoutVersion')!r} is not 1.0.0")
        manifests = self.index.get("manifests")
        if not isinstance(manifests, list):
            raise ImageError(f"{root}/index.json: no manifests list")
        self.manifests = [Descriptor.parse(m, f"{root}/index.json") for m in manifests]

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", digest_hex(digest))

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        try:
            return open(self.blob_path(desc.digest), "rb")
        except OSError as exc:
            raise ImageError(f"blob {desc.digest}: {exc.strerror} in {self.root}") from None

    def read_blob(self, desc: Descriptor) -> bytes:
        """A small (JSON) blob, checked against *desc*."""
        if desc.size > MAX_JSON:
            raise ImageError(f"blob {desc.digest}: {desc.size} bytes is too big for a {desc.media_type}")
        with self.open_blob(desc) as f:
            data = f.read(desc.size + 1)
        check_blob(desc, len(data), "sha256:" + hashlib.sha256(data).hexdigest())
        return data

    def copy_blob(self, desc: Descriptor, dest: str, progress: Callable[[int], None] | None = None) -> None:
        """Copy the blob of *desc* to *dest*, checking its size and digest on the way."""
        h = Hasher()
        with self.open_blob(desc) as src, open(dest, "wb") as out:
            while chunk := src.read(min(_CHUNK, desc.size + 1 - h.size)):
                h.update(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(len(chunk))
                if h.size > desc.size:
                    break
        check_blob(desc, h.size, h.digest)

    def select(self, tag: str | None, want: Platform | None = None) -> tuple[Descriptor, dict[str, Any], str | None]:
        """(manifest descriptor, manifest, name it was found under) for *tag*.

        Without a tag the layout must hold exactly one image.  An image index
        (multi-platform image) is followed to the manifest for *want* (default: this host).
        """
        if tag is None:
            if len(self.manifests) != 1:
                refs = sorted(d.annotations.get(REF_NAME, "?") for d in self.manifests)
                raise UsageError(f"{self.root} holds {len(self.manifests)} images ({', '.join(refs) or 'none'}); "
                                 "name one as LAYOUT:TAG")
            desc = self.manifests[0]
        else:
            found = [d for d in self.manifests
                     if tag in (d.annotations.get(REF_NAME), d.annotations.get(CONTAINERD_NAME))]
            if not found:
                raise ImageError(f"{self.root}: no image tagged {tag!r}")
            desc = found[-1]  # later entries replace earlier ones of the same name
        name = desc.annotations.get(CONTAINERD_NAME) or desc.annotations.get(REF_NAME)
        for _ in range(4):  # an index of indexes is legal; a few levels is plenty
            data = load_json(self.read_blob(desc), f"blob {desc.digest}")
            mt = data.get("mediaType", desc.media_type)
            if mt in (MT_MANIFEST, DOCKER_MANIFEST) or (desc.media_type in (MT_MANIFEST, DOCKER_MANIFEST)
                                                         and "layers" in data):
                return desc, data, name
            if mt not in (MT_INDEX, DOCKER_LIST):
                raise ImageError(f"blob {desc.digest}: media type {mt!r} is not an image manifest or index")
            desc = choose_platform(data, want, f"blob {desc.digest}")
        raise ImageError(f"{self.root}: image indexes nested too deep")


def check_blob(desc: Descriptor, size: int, digest: str) -> None:
    """Refuse a blob whose size or digest differs from its descriptor's."""
    if size != desc.size:
        how = "truncated" if size < desc.size else "longer than its descriptor says"
        raise ImageError(f"blob {desc.digest}: {how} ({size} bytes read, {desc.size} expected)")
    if digest != desc.digest:
        raise ImageError(f"blob {desc.digest}: content does not match its digest (got {digest})")


@contextlib.contextmanager
def atomic_file(path: str, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write *path* under a temporary name beside it; renamed into place only if the block succeeds."""
    head, tail = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{tail}.", suffix=".tmp", dir=head or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def dump_json(obj: Any) -> bytes:
    """Canonical enough JSON for content addressing: same object, same bytes."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class LayoutWriter:
    """Adds blobs and tagged manifests to a layout directory (made if missing).

    Blobs are written under temporary names and renamed into place, and
    ``index.json`` is replaced last: a reader never sees a manifest whose
    blobs are not all there.  An existing layout keeps its other images; a
    manifest with the same ref name replaces the old entry (as skopeo does).
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.blobs = os.path.join(root, "blobs", "sha256")
        try:
            os.makedirs(self.blobs, exist_ok=True)
            marker = os.path.join(root, "oci-layout")
            if not os.path.exists(marker):
                with atomic_file(marker) as f:
                    f.write(dump_json({"imageLayoutVersion": "1.0.0"}))
        except OSError as exc:
            raise ImageError(f"{exc.filename or root}: {exc.strerror}") from None

    def has(self, digest: str) -> bool:
        return os.path.exists(os.path.join(self.blobs, digest_hex(digest)))

    def temp(self) -> str:
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=self.blobs)
        os.close(fd)
        return tmp

    def put_file(self, tmp: str, digest: str) -> None:
        """Move the finished temporary file *tmp* in as blob *digest*."""
        dest = os.path.join(self.blobs, digest_hex(digest))
        os.chmod(tmp, 0o644)
        os.rename(tmp, dest)

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.has(digest):
            with atomic_file(os.path.join(self.blobs, digest_hex(digest))) as f:
                f.write(data)
        return Descriptor(media_type, digest, len(data))

    def tag(self, manifest: Descriptor, ref: str) -> None:
        """Point ref name *ref* (in ``index.json``) at *manifest*."""
        path = os.path.join(self.root, "index.json")
        index: dict[str, Any] = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": []}
        try:
            with open(path, "rb") as f:
                index = load_json(f.read(MAX_JSON + 1), path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ImageError(f"{path}: {exc.strerror}") from None
        kept = [m for m in index.get("manifests") or []
                if not (isinstance(m, dict) and (m.get("annotations") or {}).get(REF_NAME) == ref)]
        index["manifests"] = kept + [manifest.to_json()]
        index.setdefault("schemaVersion", 2)
        index.setdefault("mediaType", MT_INDEX)
        with atomic_file(path) as f:
            f.write(dump_json(index))


def is_exists_error(exc: OSError) -> bool:
    """rename(2) of a directory onto a non-empty one: someone else got there first."""
    return exc.errno in (errno.EEXIST, errno.ENOTEMPTY)
