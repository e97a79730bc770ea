"""Pull from and push to a registry: :mod:`.registry` spoken through the store's own pull and push.

Why through them: a registry is one more source of blobs for
:func:`.pull.import_image` and one more sink for :func:`.push.export_image`,
so the checks (sizes, digests, DiffIDs, safe layers), the workspace and the
move into the store are the very code an OCI layout goes through: the same
image from a layout or a registry is the same store state (same IMAGE ID,
same manifest digest), and a refused pull leaves the store as it was.

Downloads run :data:`PARALLEL` at a time, each into ``NAME.part`` in the
pull's workspace (``STORE/tmp/work-*``, flocked, swept if the command is
killed) and renamed to its digest's name only once size and digest are
right.  The first failure (or Ctrl-C) stops the others at their next chunk.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass

from ..errors import ImageError, UsageError
from .auth import Credentials, find_credentials, save_credentials
from .compression import Compression
from .ocilayout import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MT_INDEX,
    MT_MANIFEST,
    Descriptor,
    choose_platform,
    digest_hex,
    load_json,
)
from .progress import Progress
from .pull import import_image
from .push import export_image
from .records import Image, StoreRecords, parse_ref
from .references import Platform, RegistryRef, parse_reference
from .registry import Registry

__all__ = ["PARALLEL", "RegistryOptions", "RegistrySink", "RegistrySource", "login", "pull_remote", "push_remote"]

#: Layers downloaded at once: enough to hide one slow connection, few enough not to hog a registry.
PARALLEL = 3


@dataclass(frozen=True, slots=True)
class RegistryOptions:
    """How to reach a registry: ``--tls-verify``, ``--creds``, ``--authfile`` (podman's names)."""

    tls_verify: bool = True
    creds: Credentials | None = None
    authfile: str | None = None


def open_registry(ref: RegistryRef, options: RegistryOptions, scopes: list[str]) -> Registry:
    """A connected :class:`.registry.Registry` for *ref*: credentials from the options or the auth
    files; plain HTTP allowed on the loopback or with ``--tls-verify=false``."""
    creds = options.creds or find_credentials(ref.registry, ref.repository, options.authfile)
    reg = Registry(ref.host, tls_verify=options.tls_verify, plain_http=ref.loopback or not options.tls_verify,
                   creds=creds, scopes=scopes, pool_size=PARALLEL + 1)
    reg.connect()
    return reg


# --------------------------------------------------------------------------
# pull
# --------------------------------------------------------------------------


class RegistrySource:
    """A repository of a registry as a :class:`.pull.BlobSource`: layers fetched in parallel."""

    def __init__(self, reg: Registry, repo: str) -> None:
        self.reg, self.repo = reg, repo

    def read_blob(self, desc: Descriptor) -> bytes:
        return self.reg.read_blob(self.repo, desc)

    def fetch_blobs(self, descs: list[Descriptor], dest: str, progress: Progress) -> None:
        cancel = threading.Event()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="pull")
        try:
            futures = [pool.submit(self._fetch, d, dest, progress, cancel) for d in descs]
            done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
            if failed:
                cancel.set()
                self.reg.abort()
                concurrent.futures.wait(futures)
                first = failed[0].exception()
                assert first is not None
                raise first
        except BaseException:  # Ctrl-C included: the others stop now
            cancel.set()
            self.reg.abort()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _fetch(self, desc: Descriptor, dest: str, progress: Progress, cancel: threading.Event) -> None:
        final = os.path.join(dest, digest_hex(desc.digest))
        part = final + ".part"
        short = digest_hex(desc.digest)[:12]
        progress.start_layer(short, desc.size)
        try:
            with open(part, "wb") as out:
                self.reg.download_blob(self.repo, desc, out, lambda n: progress.add(n, short), cancel)
            os.rename(part, final)
        except BaseException:
            if os.path.exists(part):
                os.unlink(part)
            raise
        progress.layer_done(short)


def default_name(ref: RegistryRef) -> str:
    """The store's name for an image pulled from *ref*: ``HOST[:PORT]/REPO:TAG`` as docker and podman
    record it; by digest alone, the tag ``sha256-<12 hex>`` (a store record needs a tag)."""
    tag = ref.tag or (f"sha256-{digest_hex(ref.digest)[:12]}" if ref.digest else "latest")
    return f"{ref.registry.lower()}/{ref.repository}:{tag}"


def pull_remote(store: StoreRecords, arg: str, name: str | None = None, platform: Platform | None = None,
                options: RegistryOptions | None = None) -> Image:
    """Import ``docker://HOST/REPO[:TAG|@DIGEST]`` into the store (an index followed to *platform*,
    default this host's); recorded as *name*, else :func:`default_name`."""
    ref = parse_reference(arg)
    target = parse_ref(name or default_name(ref))
    reg = open_registry(ref, options or RegistryOptions(), [f"repository:{ref.repository}:pull"])
    data, media_type, digest = reg.get_manifest(ref.repository, ref.reference)
    where = f"{ref}"
    for _ in range(3):  # an index of indexes is legal; a few levels is plenty
        doc = load_json(data, f"manifest {digest}")
        if media_type in (MT_INDEX, DOCKER_LIST) or (media_type not in (MT_MANIFEST, DOCKER_MANIFEST)
                                                      and "manifests" in doc and "layers" not in doc):
            sub = choose_platform(doc, platform, where)
            data, media_type, digest = reg.get_manifest(ref.repository, sub.digest)
            if len(data) != sub.size:
                raise ImageError(f"manifest {sub.digest}: {len(data)} bytes, the index says {sub.size}")
            continue
        if doc.get("schemaVersion") == 1 or "fsLayers" in doc:
            raise ImageError(f"{where}: a Docker schema 1 manifest (deprecated; not supported)")
        if media_type not in (MT_MANIFEST, DOCKER_MANIFEST) and "layers" not in doc:
            raise ImageError(f"{where}: media type {media_type!r} is not an image manifest or index")
        mdesc = Descriptor(media_type if media_type in (MT_MANIFEST, DOCKER_MANIFEST) else MT_MANIFEST,
                           digest, len(data))
        return import_image(store, RegistrySource(reg, ref.repository), mdesc, doc, data, target)
    raise ImageError(f"{where}: image indexes nested too deep")


# --------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------


class RegistrySink:
    """A repository of a registry as a :class:`.push.Sink`.

    A blob the repository has (``HEAD``) is not sent; one another repository
    of the same registry has (per the store's names, see :func:`mount_sources`)
    is mounted from there; the rest are uploaded.  The manifest goes last.
    """

    def __init__(self, reg: Registry, repo: str, sources: dict[str, list[str]], tmpdir: str) -> None:
        self.reg, self.repo, self.sources, self.tmpdir = reg, repo, sources, tmpdir
        self._opened: dict[str, str] = {}  # digest -> upload location a refused mount opened
        self.skipped: list[str] = []
        self.mounted: list[str] = []

    def has(self, desc: Descriptor) -> bool:
        if self.reg.has_blob(self.repo, desc.digest):
            self.skipped.append(desc.digest)
            return True
        for source in self.sources.get(desc.digest, []):
            location = self.reg.mount_blob(self.repo, desc, source)
            if location is None:
                self.mounted.append(desc.digest)
                return True
            self._opened[desc.digest] = location
        return False

    def put_path(self, path: str, desc: Descriptor, progress: Progress) -> None:
        self.reg.upload_blob(self.repo, desc, path, progress.add, self._opened.pop(desc.digest, None))

    def temp(self) -> str:
        fd, tmp = tempfile.mkstemp(prefix="layer-", dir=self.tmpdir)
        os.close(fd)
        return tmp

    def put_temp(self, tmp: str, desc: Descriptor, progress: Progress) -> None:
        try:
            self.put_path(tmp, desc, progress)
        finally:
            os.unlink(tmp)

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        desc = Descriptor(media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
        with tempfile.NamedTemporaryFile(dir=self.tmpdir, prefix="blob-") as f:
            f.write(data)
            f.flush()
            self.reg.upload_blob(self.repo, desc, f.name, lambda n: None)
        return desc

    def put_manifest(self, data: bytes, desc: Descriptor, tag: str) -> None:
        self.reg.put_manifest(self.repo, tag, data, desc.media_type, desc.digest)


def mount_sources(store: StoreRecords, ref: RegistryRef) -> dict[str, list[str]]:
    """Blob digest -> other repositories of *ref*'s registry that have it, as far as the store knows:
    the images it recorded as ``HOST[:PORT]/REPO:TAG`` (pulled from there, or tagged so to be
    pushed there, as docker does)."""
    prefix = ref.registry.lower() + "/"
    found: dict[str, list[str]] = {}
    for img in store.images():
        repo = img.name.rpartition(":")[0]
        if not repo.startswith(prefix) or repo[len(prefix):] == ref.repository:
            continue
        for desc in [*img.layer_descriptors,
                     Descriptor.parse(img.manifest.get("config"), f"manifest {img.manifest_digest}")]:
            found.setdefault(desc.digest, [])
            if repo[len(prefix):] not in found[desc.digest]:
                found[desc.digest].append(repo[len(prefix):])
    return found


def push_remote(store: StoreRecords, image: str, arg: str, compress: Compression | None = None,
                convert: bool = False, options: RegistryOptions | None = None
                ) -> tuple[Image, str, Descriptor, RegistrySink]:
    """Push image *image* of the store to ``docker://HOST/REPO[:TAG]`` (default tag: the image's)."""
    ref = parse_reference(arg)
    if ref.digest:
        raise UsageError(f"{arg}: push names a tag, not a digest (the registry computes the digest)")
    with store.locked(shared=True):  # an rmi waits: the blobs are read as they are
        img = store.image(image)
        tag = ref.tag or img.name.rpartition(":")[2]
        sources = mount_sources(store, ref)
        scopes = [f"repository:{ref.repository}:pull,push"]
        scopes += [f"repository:{r}:pull" for r in sorted({r for rs in sources.values() for r in rs})][:10]
        reg = open_registry(ref, options or RegistryOptions(), scopes)
        with tempfile.TemporaryDirectory(prefix="pyunionfs-push-") as tmpdir:
            sink = RegistrySink(reg, ref.repository, sources, tmpdir)
            mdesc = export_image(store, img, sink, tag, compress or Compression(), convert)
        return img, tag, mdesc, sink


def login(registry: str, creds: Credentials, options: RegistryOptions) -> str:
    """Check *creds* against *registry* (``HOST[:PORT]``), then record them; returns the file written.

    Checked as podman does: the version check with them, and for a token
    registry a token fetched with them (no scope)."""
    ref = parse_reference(f"docker://{registry}/x")
    if ref.registry != registry.lower() and ref.registry != registry:
        raise UsageError(f"{registry}: not a registry HOST[:PORT]")
    reg = Registry(ref.host, tls_verify=options.tls_verify, plain_http=ref.loopback or not options.tls_verify,
                   creds=creds)
    reg.connect()
    resp = reg.call("GET", "/v2/")
    if resp.status != 200:
        raise reg.error(resp, "login")
    return save_credentials(registry, creds, options.authfile)
