"""A real registry for tests: Debian's ``docker-registry`` (CNCF distribution 2.8) on 127.0.0.1,
a meddling proxy in front of it, and a tiny token server for its ``auth: token`` mode.

Why a real one: the distribution protocol has many details (upload sessions, ``Location``
headers, ``Range``, error bodies, token scopes) that a hand-made fake would get right only as
far as its author understood them.  Each server gets a free port, its own storage and config,
is waited for by polling ``/v2/`` against a deadline, and is always killed.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def require_registry() -> None:
    if not os.path.exists(REGISTRY):
        pytest.fail("docker-registry is missing: bash contrib/install.sh installs it (apt-get install docker-registry)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(url: str) -> int | None:
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


@dataclass
class Registry:
    """A running ``docker-registry serve CONFIG``."""

    port: int
    root: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_registry(root: Path, auth: str = "", deadline: float = 20.0, tls: tuple[Path, Path] | None = None
                   ) -> Registry:
    """Start a registry storing under *root*; *auth* is the YAML of its ``auth:`` section, if any;
    *tls* (certificate, key) makes it serve HTTPS only."""
    require_registry()
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: {secrets.token_hex(16)}\n"
        + (f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n" if tls else "")
        + (f"auth:\n{auth}" if auth else "")
    )
    log = root / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    reg = Registry(port, root, proc, log)
    end = time.monotonic() + deadline
    while _status(f"{'https' if tls else 'http'}://{reg.host}/v2/") not in (200, 401):
        if proc.poll() is not None or time.monotonic() > end:
            reg.stop()
            pytest.fail(f"docker-registry did not answer on {reg.host}:\n{log.read_text(errors='replace')}")
        time.sleep(0.02)
    return reg


@contextlib.contextmanager
def running_registry(root: Path, auth: str = "", tls: tuple[Path, Path] | None = None) -> Iterator[Registry]:
    reg = start_registry(root, auth, tls=tls)
    try:
        yield reg
    finally:
        reg.stop()


# --------------------------------------------------------------------------
# The proxy: counts requests, damages or cuts blobs on demand
# --------------------------------------------------------------------------


@dataclass
class ProxyState:
    upstream: int
    seen: list[tuple[str, str, int, str]] = field(default_factory=list)  # method, path, status, Range
    damage: set[str] = field(default_factory=set)  # blob digests served with one byte flipped
    cut_once: set[str] = field(default_factory=set)  # blob digests whose next GET is cut halfway
    stall: set[str] = field(default_factory=set)  # blob digests served halfway, then nothing until shutdown
    fail_once: dict[str, int] = field(default_factory=dict)  # path part -> status answered once, unforwarded
    ignore_range: bool = False  # forward without Range: the registry answers a resumption with the whole blob
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: threading.Event = field(default_factory=threading.Event)

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, int, str]]:
        with self.lock:
            return [r for r in self.seen if (method is None or r[0] == method) and contains in r[1]]


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _forward(self) -> None:
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        with state.lock:
            failing = next((k for k in state.fail_once if k in self.path), None)
            status = state.fail_once.pop(failing) if failing is not None else 0
            if status:
                state.seen.append((self.command, self.path, status, self.headers.get("Range", "")))
        if status:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        conn = http.client.HTTPConnection("127.0.0.1", state.upstream, timeout=30)
        dropped = ("connection", "keep-alive") + (("range",) if state.ignore_range else ())
        headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        digest = ""
        if "/blobs/sha256:" in self.path and self.command == "GET":
            digest = self.path.rsplit("/", 1)[1].split("?")[0]
        with state.lock:
            state.seen.append((self.command, self.path, resp.status, self.headers.get("Range", "")))
            cut = resp.status == 200 and digest in state.cut_once
            if cut:
                state.cut_once.discard(digest)
            damaged = resp.status in (200, 206) and digest in state.damage
            stalled = resp.status in (200, 206) and digest in state.stall
        if damaged and data:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if stalled:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            state.released.wait(60)
            self.close_connection = True
            return
        if cut:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: ProxyState) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.state = state


@contextlib.contextmanager
def proxy(upstream: Registry) -> Iterator[tuple[str, ProxyState]]:
    """A proxy to *upstream* on a port of its own: yields (``127.0.0.1:PORT``, its state)."""
    state = ProxyState(upstream.port)
    server = _ProxyServer(state)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", state
    finally:
        state.released.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --------------------------------------------------------------------------
# A token server (docker's token protocol), signing with the openssl command
# --------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenIssuer:
    key: Path
    cert: Path
    users: dict[str, str]
    service: str = "pyunionfs-test"
    issuer: str = "pyunionfs-test-issuer"
    requests: list[dict[str, object]] = field(default_factory=list)

    @classmethod
    def make(cls, root: Path, users: dict[str, str]) -> TokenIssuer:
        root.mkdir(parents=True, exist_ok=True)
        key, cert = root / "token.key", root / "token.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", "/CN=pyunionfs test token issuer"],
                       check=True, capture_output=True, timeout=60)
        return cls(key, cert, users)

    def auth_yaml(self, realm: str) -> str:
        return (f"  token:\n    realm: {realm}\n    service: {self.service}\n    issuer: {self.issuer}\n"
                f"    rootcertbundle: {self.cert}\n")

    def token(self, user: str, scopes: list[str]) -> str:
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True,
                             capture_output=True, timeout=30).stdout
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": user, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing.encode(),
                             check=True, capture_output=True, timeout=30).stdout
        return f"{signing}.{_b64url(sig)}"


class _TokenHandler(BaseHTTPRequestHandler):
    server: _TokenServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        issuer = self.server.issuer
        query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        user = ""
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if issuer.users.get(name) != password:
                self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad user name or password"}]})
                return
            user = name
        issuer.requests.append({"user": user, "scope": query.get("scope", [])})
        if not user:
            self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "anonymous access is not allowed"}]})
            return
        scopes = [s for scope in query.get("scope", []) for s in scope.split()]
        self._answer(200, {"token": issuer.token(user, scopes), "expires_in": 300})

    def _answer(self, status: int, doc: dict[str, object]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _TokenServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, issuer: TokenIssuer) -> None:
        super().__init__(("127.0.0.1", 0), _TokenHandler)
        self.issuer = issuer


@contextlib.contextmanager
def token_server(issuer: TokenIssuer) -> Iterator[str]:
    """Serve tokens of *issuer*; yields the realm URL."""
    server = _TokenServer(issuer)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd line (the only kind the registry reads), from apache2-utils' htpasswd."""
    exe = shutil.which("htpasswd")
    if exe is None:
        pytest.fail("htpasswd is missing: bash contrib/install.sh installs it (apt-get install apache2-utils)")
    res = subprocess.run([exe, "-nbB", user, password], check=True, capture_output=True, text=True, timeout=30)
    return res.stdout.strip() + "\n"


def self_signed(root: Path, name: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate for *name* (an IP address) and its key, made with the openssl command."""
    root.mkdir(parents=True, exist_ok=True)
    cert, key = root / "tls.crt", root / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=IP:{name}"],
                   check=True, capture_output=True, timeout=60)
    return cert, key
