"""Image references on a registry (``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``) and platforms.

Why a transport prefix at all: ``pull`` and ``push`` also take OCI layout
directories, and ``host:5000/app:1`` is a perfectly good relative path.
Guessing would read a directory one day and a registry the next (and before
this module existed, ``push IMAGE docker://h/r:t`` quietly made a local
folder named ``docker:``).  So a registry is named with ``docker://``,
exactly as skopeo, buildah and podman write it, and any other ``xxx://`` is
refused instead of becoming a path.

The grammar is the one of distribution's ``reference`` package (what the
registry itself and every client accept): a first component holding a
``.`` or a ``:``, or ``localhost``, is the registry; otherwise the image is
on Docker Hub (``docker.io``, one-component names under ``library/``).
Only sha256 digests are accepted, as everywhere in pyunionfs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

__all__ = ["DOCKER_HUB", "TRANSPORT", "Platform", "RegistryRef", "check_transport", "is_registry", "parse_reference"]

#: The prefix naming a registry, as skopeo and buildah write it.
TRANSPORT = "docker://"
#: Docker Hub as names say it, and the host its API is served from.
DOCKER_HUB = "docker.io"
_HUB_API = "registry-1.docker.io"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_DOMAIN_PART = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST = re.compile(rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_LOOPBACK = ("localhost", "127.0.0.1", "[::1]", "::1")


def is_registry(arg: str) -> bool:
    """Whether a pull or push argument names a registry (``docker://...``)."""
    return arg.startswith(TRANSPORT)


def check_transport(arg: str) -> None:
    """Refuse ``xxx://`` other than ``docker://``: a scheme is never a directory name by accident."""
    found = _SCHEME.match(arg)
    if found and not is_registry(arg):
        raise UsageError(f"{arg}: unknown transport {found[0]!r} (pyunionfs reads and writes docker://HOST/REPO[:TAG] "
                         "and OCI layout directories; write ./ before a directory whose name has '://')")


@dataclass(frozen=True, slots=True)
class RegistryRef:
    """A parsed ``docker://`` reference.  *registry* is as written (``docker.io`` for the Hub)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def host(self) -> str:
        """Where the API is served: the registry, but ``registry-1.docker.io`` for ``docker.io``."""
        return _HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def hostname(self) -> str:
        """The host without its port or IPv6 brackets."""
        host = self.registry.lower()
        if host.startswith("["):
            return host[1:host.index("]")]
        return host.rpartition(":")[0] if ":" in host else host

    @property
    def loopback(self) -> bool:
        """On this machine: plain HTTP may be used without asking (docker and podman allow it too)."""
        return self.hostname in _LOOPBACK or self.hostname.startswith("127.")

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one (it pins), else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        """``registry/repository``, as the store records an image pulled from here."""
        return f"{self.registry}/{self.repository}"

    def with_tag(self, tag: str) -> RegistryRef:
        return RegistryRef(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        text = TRANSPORT + self.name
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text


def parse_reference(arg: str) -> RegistryRef:
    """``docker://HOST[:PORT]/REPO[:TAG][@DIGEST]`` (or a Docker Hub name) -> :class:`RegistryRef`."""
    if not is_registry(arg):
        raise UsageError(f"{arg}: not a registry reference (docker://HOST[:PORT]/REPO[:TAG|@DIGEST])")
    text = arg[len(TRANSPORT):]
    rest, at, digest = text.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise UsageError(f"{arg}: digest {digest!r} is not sha256:<64 lowercase hex>")
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, remainder
        if not _HOST.fullmatch(registry):
            raise UsageError(f"{arg}: {registry!r} is not a registry host[:port]")
    else:
        registry, path = DOCKER_HUB, rest
    repo, colon, tag = path.rpartition(":")
    if not colon:
        repo, tag = path, ""
    elif not _TAG.fullmatch(tag):
        raise UsageError(f"{arg}: invalid tag {tag!r} (letters, digits, '_', '.', '-'; at most 128)")
    if registry == DOCKER_HUB and "/" not in repo:
        repo = "library/" + repo
    if not _REPOSITORY.fullmatch(repo) or len(repo) > 255:
        raise UsageError(f"{arg}: invalid repository name {repo!r} (lowercase letters, digits, '.', '_', '-', '/')")
    return RegistryRef(registry, repo, tag or None, digest or None)


@dataclass(frozen=True, slots=True)
class Platform:
    """``os/arch[/variant]`` as OCI spells them (``linux/arm64/v8``), to choose from an image index."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if not 2 <= len(parts) <= 3 or not all(re.fullmatch(r"[a-z0-9_.-]+", p) for p in parts):
            raise UsageError(f"--platform {text!r}: want OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm/v7")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def of(cls, data: dict[str, Any]) -> Platform:
        """The platform of an index entry's ``platform`` object."""
        variant = data.get("variant")
        return cls(str(data.get("os")), str(data.get("architecture")), str(variant) if variant else None)

    @property
    def text(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, data: dict[str, Any]) -> bool:
        """Whether an index entry's platform is this one.  Without a variant any variant does;
        arm64's only variant, v8, is the same as none (as containerd normalises it)."""
        other = Platform.of(data)
        if (other.os, other.architecture) != (self.os, self.architecture):
            return False
        if self.variant is None:
            return True
        mine, theirs = self.variant, other.variant
        if self.architecture == "arm64":
            mine, theirs = mine or "v8", theirs or "v8"
        return mine == theirs
