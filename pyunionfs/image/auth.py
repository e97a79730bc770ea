"""Registry credentials: the files container tools keep them in, and the challenges that ask for them.

Why these files and no store of our own: a user who ran ``podman login`` or
``docker login`` expects every container tool to use it, and expects
``pyunionfs login`` to work for them.  Read, in the order containers-auth.json(5) gives:

1. ``--authfile FILE`` or ``$REGISTRY_AUTH_FILE``;
2. ``${XDG_RUNTIME_DIR}/containers/auth.json`` (``/run/containers/UID/auth.json``
   without ``XDG_RUNTIME_DIR``), where podman's and our ``login`` write;
3. ``$XDG_CONFIG_HOME/containers/auth.json`` (``~/.config/...``);
4. ``~/.docker/config.json`` (docker's).

Each is ``{"auths": {"HOST[:PORT][/REPO]": {"auth": base64("USER:PASSWORD")}}}``;
the most specific key (``host/repo`` before ``host``) of the first file that
has one wins.  Credential helpers (``credHelpers``, ``credsStore``) are not run.

Nothing here touches the network: :mod:`.registry` asks these functions what
to send.  A challenge (``WWW-Authenticate``) is parsed per RFC 7235 as
registries send it: ``Bearer realm="...",service="...",scope="..."`` or ``Basic realm="..."``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
from dataclasses import dataclass

from ..errors import MALFORMED_INPUT, ImageError, malformed

__all__ = [
    "Challenge",
    "Credentials",
    "auth_files",
    "basic_header",
    "find_credentials",
    "forget_credentials",
    "login_file",
    "parse_challenges",
    "save_credentials",
]

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf"\s*({_TOKEN})\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|({_TOKEN}))\s*(?:,|$)")
_SCHEME = re.compile(rf"\s*,?\s*({_TOKEN})(?:\s+|$)")


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header: its scheme (lowercase) and parameters."""

    scheme: str
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and password (or token) for one registry."""

    username: str
    password: str


def parse_challenges(header: str) -> list[Challenge]:
    """Every challenge of a ``WWW-Authenticate`` value, in order; what does not parse ends the list."""
    found: list[Challenge] = []
    pos = 0
    while pos < len(header):
        scheme = _SCHEME.match(header, pos)
        if not scheme:
            break
        pos = scheme.end()
        params: dict[str, str] = {}
        while pos < len(header):
            param = _PARAM.match(header, pos)
            if not param:
                break
            value = param[2] if param[2] is not None else param[3]
            params[param[1].lower()] = re.sub(r"\\(.)", r"\1", value)
            pos = param.end()
        found.append(Challenge(scheme[1].lower(), params))
    return found


def basic_header(creds: Credentials) -> str:
    """The ``Authorization`` value of HTTP basic authentication."""
    return "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


def login_file(authfile: str | None = None) -> str:
    """Where ``login`` writes: *authfile*, ``$REGISTRY_AUTH_FILE``, else podman's per-session file."""
    if authfile:
        return authfile
    if os.environ.get("REGISTRY_AUTH_FILE"):
        return os.environ["REGISTRY_AUTH_FILE"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        return f"/run/containers/{os.geteuid()}/auth.json"  # podman's choice without a session directory
    return os.path.join(runtime, "containers", "auth.json")


def auth_files(authfile: str | None = None) -> list[str]:
    """The files credentials are read from, first one first (see the module's docstring)."""
    if authfile:
        return [authfile]  # as podman: an explicit file is the only one
    home = os.path.expanduser("~")
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return [login_file(None), os.path.join(config, "containers", "auth.json"),
            os.path.join(home, ".docker", "config.json")]


def _normalise_key(key: str) -> str:
    """An ``auths`` key as a bare ``host[:port][/path]``: docker writes ``https://host/v1/`` for the Hub."""
    key = re.sub(r"^[a-z]+://", "", key).rstrip("/")
    if key in ("index.docker.io/v1", "index.docker.io", "registry-1.docker.io"):
        return "docker.io"
    return key


def _read_auths(path: str) -> dict[str, dict[str, object]]:
    """The ``auths`` map of *path*; a missing file is empty, a malformed one is refused in one line."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 20) or b"{}")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror}") from None
    except MALFORMED_INPUT as exc:
        raise ImageError(f"{path}: not valid JSON ({malformed(exc)})") from None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return {}
    return {_normalise_key(str(k)): v for k, v in auths.items() if isinstance(v, dict)}


def _decode(entry: dict[str, object], path: str, key: str) -> Credentials | None:
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeError):
            raise ImageError(f"{path}: the auth of {key!r} is not base64 of USER:PASSWORD") from None
        if not sep:
            raise ImageError(f"{path}: the auth of {key!r} is not base64 of USER:PASSWORD")
        return Credentials(user, password)
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str):
        return Credentials(name, secret)
    return None


def find_credentials(registry: str, repository: str, authfile: str | None = None) -> Credentials | None:
    """The credentials for *repository* on *registry* (``host[:port]``), or None (anonymous)."""
    parts = repository.split("/")
    keys = [f"{registry}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)] + [registry]
    for path in auth_files(authfile):
        auths = _read_auths(path)
        for key in keys:
            if key in auths:
                found = _decode(auths[key], path, key)
                if found is not None:
                    return found
    return None


def _write_auths(path: str, edit: dict[str, dict[str, object] | None]) -> None:
    """Change entries of *path*'s ``auths`` (None removes), keeping everything else in the file;
    written whole under a temporary name (mode 0600, the directory 0700), as podman does."""
    data: dict[str, object] = {}
    try:
        with open(path, "rb") as f:
            loaded = json.loads(f.read(1 << 20) or b"{}")
        if isinstance(loaded, dict):
            data = loaded
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror}") from None
    except MALFORMED_INPUT as exc:
        raise ImageError(f"{path}: not valid JSON ({malformed(exc)}); not overwritten") from None
    auths = data.get("auths")
    if not isinstance(auths, dict):
        auths = {}
    for key, value in edit.items():
        if value is None:
            auths.pop(key, None)
        else:
            auths[key] = value
    data["auths"] = auths
    head = os.path.dirname(path) or "."
    tmp = os.path.join(head, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        os.makedirs(head, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent="\t") + "\n")
        os.rename(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ImageError(f"{exc.filename or path}: {exc.strerror}") from None


def save_credentials(registry: str, creds: Credentials, authfile: str | None = None) -> str:
    """Record *creds* for *registry* in the login file; returns its path."""
    path = login_file(authfile)
    _write_auths(path, {registry: {"auth": base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()}})
    return path


def forget_credentials(registry: str, authfile: str | None = None) -> str | None:
    """Remove *registry*'s entry from the login file; returns its path, or None if it had none."""
    path = login_file(authfile)
    if registry not in _read_auths(path):
        return None
    _write_auths(path, {registry: None})
    return path
