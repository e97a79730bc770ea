"""A client of the OCI distribution API (``/v2/``), as registries implement it.

What it speaks (distribution-spec 1.0, and what docker's registry adds):

* ``GET /v2/``: the version check, and the first authentication challenge;
* manifests by tag or digest, ``Accept`` listing OCI and Docker schema 2
  manifests and indexes; every manifest is checked against the digest it was
  asked by (or the ``Docker-Content-Digest`` the registry sends for a tag);
* blobs by digest, streamed to a file, size and sha256 checked on the way;
  a dropped connection resumes with ``Range`` (or starts again from byte 0
  if the registry sends the whole blob);
* ``HEAD`` of a blob, to skip one the registry has; cross-repository mount
  (``POST .../uploads/?mount=DIGEST&from=REPO``); uploads as ``POST`` then
  ``PUT`` (one request) or, for large blobs, ``PATCH`` chunks then ``PUT``;
* errors as registries send them (``{"errors": [{"code", "message"}]}``),
  made one line;
* authentication: anonymous, HTTP basic, and bearer tokens fetched from the
  realm of the ``WWW-Authenticate`` challenge (with basic credentials, if
  any, as docker does), renewed when a later challenge asks for more scope.

Why urllib3 (2.x): connection pooling across the many requests of a push,
streaming bodies both ways with timeouts, TLS verification against the
system's certificates by default, and no dependencies of its own; it is
what ``requests`` is built on, pure Python, and kept up to date.  It is
imported here only, and this module only by registry commands, so a
``mount`` never pays for it.

Retries: 5 attempts in all, after 0.5, 1, 2, 4 s (at most 8 s, or the
``Retry-After`` a 429/503 asks, up to 30 s), on 429 and 5xx answers and on
connections refused, reset or cut short.  A wrong digest is never retried:
it is refused at once, by name.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from ..errors import ImageError, TransferError
from .auth import Challenge, Credentials, basic_header, parse_challenges
from .digest import Hasher
from .ocilayout import DOCKER_LIST, DOCKER_MANIFEST, MAX_JSON, MT_INDEX, MT_MANIFEST, Descriptor, check_blob

if TYPE_CHECKING:
    import urllib3

__all__ = ["ATTEMPTS", "MANIFEST_TYPES", "Registry", "cancelled"]

#: What a manifest GET accepts, best first.
MANIFEST_TYPES = (MT_MANIFEST, MT_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
#: Requests tried at most this many times (see the module's docstring).
ATTEMPTS = 5
_BACKOFF, _BACKOFF_MAX, _RETRY_AFTER_MAX = 0.5, 8.0, 30.0
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
#: Bytes read from a download at a time; also the size of a PATCH chunk of a chunked upload.
CHUNK = 1024 * 1024
#: Blobs larger than this are uploaded in PATCH chunks of :data:`UPLOAD_CHUNK` bytes.
MONOLITHIC_MAX = 32 * 1024 * 1024
UPLOAD_CHUNK = 16 * 1024 * 1024
_USER_AGENT = "pyunionfs (OCI distribution client)"


def cancelled() -> InterruptedError:
    """What a download raises when another failed (or Ctrl-C came): it stops at its next chunk."""
    return InterruptedError("transfer cancelled")


def _urllib3() -> Any:
    """urllib3, imported on first use; without it (a copy run from source) one line says how to get it."""
    try:
        import urllib3
    except ImportError:
        raise ImageError("registries need the urllib3 package (pip install 'urllib3>=2.3'; "
                         "bash contrib/install.sh installs it)") from None
    return urllib3


class Registry:
    """One registry (``host[:port]``), its connection pool and authentication state.

    Thread-safe for the parallel downloads of one pull: the pool is, and the
    authentication state changes under a lock.
    """

    def __init__(self, host: str, *, tls_verify: bool = True, plain_http: bool = False,
                 creds: Credentials | None = None, scopes: list[str] | None = None, pool_size: int = 4,
                 sleep: Callable[[float], Any] = time.sleep) -> None:
        u3 = _urllib3()
        self.host = host
        self.tls_verify = tls_verify
        self.plain_http = plain_http  # may fall back to http:// (loopback, or --tls-verify=false)
        self.creds = creds
        self.scopes = list(scopes or [])
        self.base = ""
        self._sleep = sleep
        self._lock = threading.Lock()
        self._authorization: str | None = None
        self._bearer: Challenge | None = None
        self._live: set[Any] = set()  # responses being downloaded, for abort()
        if not tls_verify:
            u3.disable_warnings(u3.exceptions.InsecureRequestWarning)
        self.pool: urllib3.PoolManager = u3.PoolManager(
            num_pools=4, maxsize=pool_size, cert_reqs="CERT_REQUIRED" if tls_verify else "CERT_NONE",
            timeout=u3.Timeout(connect=15.0, read=60.0), headers={"User-Agent": _USER_AGENT})

    # -- connecting and authenticating ------------------------------------------

    def connect(self) -> None:
        """The version check: ``GET /v2/`` over https (then http where allowed); a 401 sets up auth.

        A certificate that fails verification is never a reason to fall back to plain HTTP:
        that is what an impostor would arrange.  Only a server that does not speak TLS at all
        (on the loopback, or with ``--tls-verify=false``) is asked again over http.
        """
        u3 = _urllib3()
        failure = ""
        for scheme in ["https", "http"] if self.plain_http else ["https"]:
            try:
                resp = self.pool.request("GET", f"{scheme}://{self.host}/v2/", retries=self._no_retries(),
                                         preload_content=True)
            except u3.exceptions.HTTPError as exc:
                failure = _reason(exc)
                if "CERTIFICATE_VERIFY_FAILED" in failure or "certificate verify failed" in failure:
                    raise ImageError(f"registry {self.host}: cannot connect: {failure} (to accept it: "
                                     "--tls-verify=false)") from None
                continue
            self.base = f"{scheme}://{self.host}"
            break
        else:
            hint = "" if self.plain_http else " (a registry without TLS: --tls-verify=false)"
            raise ImageError(f"registry {self.host}: cannot connect: {failure}{hint}")
        if resp.status in _RETRY_STATUS:
            resp = self.call("GET", "/v2/")
        if resp.status == 401:
            self._answer(resp, None)
        elif resp.status != 200:
            raise self.error(resp, "GET /v2/ (is this an OCI registry?)")

    def _answer(self, resp: Any, extra: list[str] | None) -> None:
        """Meet a 401's challenge: basic credentials, or a bearer token for the scopes it names."""
        challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.params.get("realm")), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        with self._lock:
            if bearer is not None:
                self._bearer = bearer
                scopes = list(dict.fromkeys(self.scopes + (extra or []) + bearer.params.get("scope", "").split()))
                self._authorization = "Bearer " + self._token(bearer, [s for s in scopes if s])
            elif basic is not None:
                if self.creds is None:
                    raise ImageError(f"registry {self.host}: authentication required "
                                     f"(pyunionfs login {self.host}, or --creds USER:PASSWORD)")
                self._authorization = basic_header(self.creds)
            else:
                raise self.error(resp, "authentication")

    def _token(self, challenge: Challenge, scopes: list[str]) -> str:
        """A bearer token from the challenge's realm (docker's token protocol, GET form)."""
        u3 = _urllib3()
        query = [("service", challenge.params["service"])] if challenge.params.get("service") else []
        query += [("scope", s) for s in scopes]
        realm = challenge.params["realm"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {"Authorization": basic_header(self.creds)} if self.creds else {}
        try:
            resp = self.pool.request("GET", url, headers=headers, retries=self._retries(), preload_content=True)
        except u3.exceptions.HTTPError as exc:
            raise ImageError(f"registry {self.host}: token server {realm}: {_reason(exc)}") from None
        if resp.status in (401, 403):
            who = "as " + self.creds.username if self.creds else "without credentials"
            raise ImageError(f"registry {self.host}: token server refused access {who} "
                             f"(HTTP {resp.status}{_messages(resp.data)})")
        if resp.status != 200:
            raise ImageError(f"registry {self.host}: token server {realm}: HTTP {resp.status}{_messages(resp.data)}")
        try:
            data = json.loads(resp.data)
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise ImageError(f"registry {self.host}: token server {realm} answered no token")
        return token

    # -- requests ----------------------------------------------------------------

    def _no_retries(self) -> Any:
        return _urllib3().Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5,
                                raise_on_status=False)

    def _retries(self) -> Any:
        """urllib3's own retries, for small requests whose body can be sent again."""
        return _urllib3().Retry(total=ATTEMPTS - 1, redirect=5, backoff_factor=_BACKOFF, backoff_max=_BACKOFF_MAX,
                                status_forcelist=_RETRY_STATUS, allowed_methods=None, raise_on_status=False,
                                respect_retry_after_header=True)

    def url(self, path: str) -> str:
        """An absolute URL of a path (or of a ``Location`` a registry sent, relative or not)."""
        return urllib.parse.urljoin(self.base + "/", path)

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None, body: Any = None,
                stream: bool = False, replay: bool = True, scopes: list[str] | None = None) -> Any:
        """One request, authenticated (a 401 is answered once and the request sent again).

        With *replay* (a body that can be sent twice), urllib3 retries 429/5xx and cut
        connections; without, a failure raises :class:`TransferError` for the caller's own loop.
        """
        u3 = _urllib3()
        for answered in (False, True):
            hdrs = dict(headers or {})
            with self._lock:
                if self._authorization:
                    hdrs["Authorization"] = self._authorization
            try:
                resp = self.pool.request(method, self.url(path), headers=hdrs, body=body,
                                         retries=self._retries() if replay else self._no_retries(),
                                         preload_content=not stream, decode_content=False)
            except u3.exceptions.HTTPError as exc:
                raise TransferError(f"{method} {path}: {_reason(exc)}") from None
            if resp.status == 401 and not answered:
                _discard(resp)
                self._answer(resp, scopes)
                if not replay:
                    raise TransferError(f"{method} {path}: authentication renewed")
                continue
            if resp.status in _RETRY_STATUS and not replay:
                _discard(resp)
                raise TransferError(f"{method} {path}: HTTP {resp.status}", _retry_after(resp))
            return resp
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """:meth:`request`, a connection that fails all its attempts said in one line."""
        try:
            return self.request(method, path, **kw)
        except TransferError as exc:
            raise ImageError(f"registry {self.host}: {exc}") from None

    def error(self, resp: Any, what: str) -> ImageError:
        """A registry's refusal as one line: its ``errors`` messages and codes, else the HTTP status."""
        msgs = _messages(_read_capped(resp, 64 * 1024))
        detail = msgs.removeprefix(": ") or f"HTTP {resp.status} {resp.reason or ''}".strip()
        if resp.status == 401 and self.creds is None:
            detail += f" (pyunionfs login {self.host}, or --creds USER:PASSWORD)"
        elif resp.status in (401, 403) and self.creds is not None:
            detail = f"access denied as {self.creds.username} ({detail})"
        return ImageError(f"registry {self.host}: {what}: {detail}")

    def backoff(self, attempt: int, exc: TransferError, cancel: threading.Event | None = None) -> None:
        """Wait before attempt *attempt* + 1 (or give up after the last, saying why)."""
        if attempt + 1 >= ATTEMPTS:
            raise ImageError(f"registry {self.host}: {exc} (gave up after {ATTEMPTS} attempts)")
        delay = min(_BACKOFF * 2 ** attempt, _BACKOFF_MAX)
        if exc.retry_after is not None:
            delay = min(max(delay, exc.retry_after), _RETRY_AFTER_MAX)
        if cancel is not None:
            if cancel.wait(delay):
                raise cancelled()
        else:
            self._sleep(delay)

    # -- manifests ---------------------------------------------------------------

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index by tag or digest, its digest checked."""
        resp = self.call("GET", f"/v2/{repo}/manifests/{reference}", stream=True,
                         headers={"Accept": ", ".join(MANIFEST_TYPES)})
        if resp.status != 200:
            raise self.error(resp, f"manifest {repo}:{reference}" if ":" not in reference
                             else f"manifest {repo}@{reference}")
        data = _read_capped(resp, MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise ImageError(f"registry {self.host}: manifest {repo}:{reference}: larger than {MAX_JSON} bytes")
        h = Hasher()
        h.update(data)
        sent = resp.headers.get("Docker-Content-Digest")
        want = reference if reference.startswith("sha256:") else sent if sent and sent.startswith("sha256:") else None
        if want is not None and h.digest != want:
            raise ImageError(f"manifest {want}: content does not match its digest (got {h.digest})")
        media_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        try:
            declared = json.loads(data).get("mediaType")
        except (ValueError, AttributeError):
            declared = None
        if media_type not in MANIFEST_TYPES and isinstance(declared, str):
            media_type = declared
        return data, media_type, h.digest

    def put_manifest(self, repo: str, tag: str, data: bytes, media_type: str, digest: str) -> None:
        resp = self.call("PUT", f"/v2/{repo}/manifests/{tag}", body=data, headers={"Content-Type": media_type})
        if resp.status not in (200, 201):
            raise self.error(resp, f"manifest {repo}:{tag}")
        sent = resp.headers.get("Docker-Content-Digest")
        if sent and sent != digest:
            raise ImageError(f"registry {self.host}: manifest {repo}:{tag} stored as {sent}, sent as {digest}")

    # -- blobs -------------------------------------------------------------------

    def has_blob(self, repo: str, digest: str) -> bool:
        """``HEAD`` of a blob: whether *repo* has it (so a push need not send it)."""
        resp = self.call("HEAD", f"/v2/{repo}/blobs/{digest}")
        if resp.status == 200:
            return True
        if resp.status == 404:
            return False
        raise self.error(resp, f"blob {digest}")

    def read_blob(self, repo: str, desc: Descriptor) -> bytes:
        """A small (JSON) blob, size and digest checked."""
        if desc.size > MAX_JSON:
            raise ImageError(f"blob {desc.digest}: {desc.size} bytes is too big for a {desc.media_type}")
        resp = self.call("GET", f"/v2/{repo}/blobs/{desc.digest}", stream=True)
        if resp.status != 200:
            raise self.error(resp, f"blob {desc.digest}")
        data = _read_capped(resp, desc.size + 1)
        h = Hasher()
        h.update(data)
        check_blob(desc, h.size, h.digest)
        return data

    def download_blob(self, repo: str, desc: Descriptor, out: IO[bytes], progress: Callable[[int], None],
                      cancel: threading.Event) -> None:
        """Stream blob *desc* into *out* (a new file), checking size and digest on the way.

        A connection cut mid-blob resumes with ``Range: bytes=N-``; a registry that answers
        with the whole blob instead starts it again from byte 0 (the file truncated, the hash
        new), so what ends in *out* is always one blob, checked whole.
        """
        h = Hasher()
        attempt = 0
        while True:
            if cancel.is_set():
                raise cancelled()
            headers = {"Accept-Encoding": "identity"}
            if h.size:
                headers["Range"] = f"bytes={h.size}-"
            try:
                resp = self.request("GET", f"/v2/{repo}/blobs/{desc.digest}", headers=headers, stream=True,
                                    replay=False)
                with self._lock:
                    self._live.add(resp)
                try:
                    if resp.status == 206 and h.size and _range_start(resp) == h.size:
                        pass
                    elif resp.status == 200:
                        if h.size:  # the whole blob again: start over
                            progress(-h.size)
                            out.seek(0)
                            out.truncate()
                            h = Hasher()
                    else:
                        raise self.error(resp, f"blob {desc.digest}")
                    self._stream(resp, desc, out, h, progress, cancel)
                finally:
                    with self._lock:
                        self._live.discard(resp)
                    _discard(resp)
            except TransferError as exc:
                self.backoff(attempt, exc, cancel)
                attempt += 1
                continue
            break
        check_blob(desc, h.size, h.digest)

    def abort(self) -> None:
        """Cut every download under way (their threads then see the cancel event at once, instead
        of after a read timeout): what Ctrl-C and a failed sibling download need."""
        with self._lock:
            live = list(self._live)
        for resp in live:
            with contextlib.suppress(Exception):
                resp.shutdown()

    def _stream(self, resp: Any, desc: Descriptor, out: IO[bytes], h: Hasher, progress: Callable[[int], None],
                cancel: threading.Event) -> None:
        """Copy a response body into *out*; a cut connection is :class:`TransferError` (the bytes so far kept)."""
        u3 = _urllib3()
        while True:
            if cancel.is_set():
                raise cancelled()
            try:
                chunk = resp.read(min(CHUNK, desc.size + 1 - h.size), decode_content=False)
            except (u3.exceptions.HTTPError, OSError) as exc:
                out.flush()
                raise TransferError(f"blob {desc.digest}: download cut short at byte {h.size} "
                                    f"({_reason(exc)})") from None
            if not chunk:
                break
            out.write(chunk)
            h.update(chunk)
            progress(len(chunk))
            if h.size > desc.size:
                break  # longer than its descriptor: check_blob says so
        out.flush()

    def mount_blob(self, repo: str, desc: Descriptor, source: str) -> str | None:
        """Cross-repository mount of blob *desc* from *source* (same registry): None when mounted,
        else the upload ``Location`` the registry opened instead (it does not have it there)."""
        query = urllib.parse.urlencode({"mount": desc.digest, "from": source})
        resp = self.call("POST", f"/v2/{repo}/blobs/uploads/?{query}", headers={"Content-Length": "0"},
                         scopes=[f"repository:{source}:pull"])
        _discard(resp)
        if resp.status == 201:
            return None
        if resp.status == 202 and resp.headers.get("Location"):
            return str(resp.headers["Location"])
        raise self.error(resp, f"blob {desc.digest} (mount from {source})")

    def upload_blob(self, repo: str, desc: Descriptor, path: str, progress: Callable[[int], None],
                    location: str | None = None) -> None:
        """Upload the file *path* as blob *desc*: ``POST`` (unless *location* is an upload already
        opened), then one ``PUT``, or ``PATCH`` chunks then ``PUT`` for a large blob.  A failed
        attempt starts again with a new upload."""
        attempt = 0
        while True:
            sent = 0
            try:
                loc = location or self._start_upload(repo, desc)
                location = None
                with open(path, "rb") as f:
                    if desc.size <= MONOLITHIC_MAX:
                        reader = _CountingReader(f, progress)
                        resp = self.request("PUT", _with_digest(loc, desc.digest), body=reader, replay=False,
                                            headers={"Content-Type": "application/octet-stream",
                                                     "Content-Length": str(desc.size)})
                        sent = reader.count
                    else:
                        while chunk := f.read(UPLOAD_CHUNK):
                            resp = self.request("PATCH", loc, body=chunk, replay=False, headers={
                                "Content-Type": "application/octet-stream", "Content-Length": str(len(chunk)),
                                "Content-Range": f"{sent}-{sent + len(chunk) - 1}"})
                            _discard(resp)
                            if resp.status != 202 or not resp.headers.get("Location"):
                                raise self.error(resp, f"blob {desc.digest} (chunk at {sent})")
                            loc = resp.headers["Location"]
                            sent += len(chunk)
                            progress(len(chunk))
                        resp = self.request("PUT", _with_digest(loc, desc.digest), replay=False,
                                            headers={"Content-Length": "0"})
                _discard(resp)
                if resp.status != 201:
                    raise self.error(resp, f"blob {desc.digest}")
                return
            except TransferError as exc:
                progress(-sent)
                self.backoff(attempt, exc)
                attempt += 1

    def _start_upload(self, repo: str, desc: Descriptor) -> str:
        resp = self.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
        _discard(resp)
        if resp.status != 202 or not resp.headers.get("Location"):
            raise self.error(resp, f"blob {desc.digest} (starting the upload)")
        return str(resp.headers["Location"])


class _CountingReader:
    """A file as a request body, telling *progress* what urllib3 read of it."""

    def __init__(self, f: IO[bytes], progress: Callable[[int], None]) -> None:
        self.f, self.progress, self.count = f, progress, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.count += len(data)
        self.progress(len(data))
        return data


def _with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})


def _range_start(resp: Any) -> int | None:
    """The first byte of a 206's ``Content-Range: bytes START-END/TOTAL``."""
    value = str(resp.headers.get("Content-Range", ""))
    try:
        return int(value.removeprefix("bytes ").split("-")[0])
    except ValueError:
        return None


def _retry_after(resp: Any) -> float | None:
    try:
        return float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None


def _read_capped(resp: Any, cap: int) -> bytes:
    """At most *cap* bytes of a body, preloaded or streamed (the connection is given back after)."""
    try:
        body = getattr(resp, "_body", None)  # preloaded: urllib3 keeps it here; .data would read a stream whole
        data = body if body is not None else resp.read(cap, decode_content=False)
    except Exception:  # a broken error body: the status says enough
        return b""
    finally:
        _discard(resp)
    return bytes(data or b"")[:cap]


def _discard(resp: Any) -> None:
    """Give the connection back to the pool; one whose body was not read to its end is closed
    first (the next request on it would read the rest as its answer)."""
    with contextlib.suppress(Exception):  # already released, or broken: nothing to give back
        if not resp.closed:
            resp.close()
        resp.release_conn()


def _messages(data: bytes) -> str:
    """``: message (CODE); ...`` of a registry's JSON ``errors`` list, or ``""``."""
    try:
        errors = json.loads(data).get("errors")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(errors, list):
        return ""
    parts = []
    for err in errors[:3]:
        if isinstance(err, dict):
            msg, code = str(err.get("message") or "").strip(), str(err.get("code") or "").strip()
            parts.append(" ".join(f"{msg} ({code})".split()) if code else " ".join(msg.split()))
    return (": " + "; ".join(p for p in parts if p))[:300] if any(parts) else ""


def _reason(exc: BaseException) -> str:
    """The innermost reason of a urllib3 error, in one line."""
    reason = getattr(exc, "reason", None)
    while isinstance(reason, BaseException) and getattr(reason, "reason", None) is not None:
        reason = reason.reason  # type: ignore[attr-defined]
    text = str(reason if isinstance(reason, BaseException) else exc)
    return " ".join(text.split())[:200]
