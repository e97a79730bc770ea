"""Errors: every exception type pyunionfs raises, and the one place where exceptions become errnos.

The union core raises plain :class:`OSError` (with ``errno`` set) exactly where
a decision is made, so it can be tested without FUSE.  pyfuse3 accepts only
``FUSEError`` from a handler: anything else ends ``pyfuse3.main()`` and leaves a
dead mount.  :func:`fuse_errors` wraps every handler once instead of pasting the
conversion into each one.

Everything else pyunionfs raises on purpose is a :class:`PyunionfsError`, of a
type named for what failed, so a caller catches what it can handle and the
command line catches the base for its one-line message::

    PyunionfsError
    +-- UsageError          the command line is wrong (exit status 2)
    +-- MountError          a mount or its daemon (mount, unmount, control)
    +-- LayerError          a layer tar, or an upper being read or applied
    +-- ImageError          an OCI image or layout (manifest, config, blob), or a registry
    |   +-- TransferError       a registry transfer cut short or refused for now: worth another attempt
    +-- StoreError          the layer store (its directory, records, lookups)
    +-- ProtocolError       a FUSE message that does not parse
    |   +-- UnsupportedKernel   a kernel whose INIT cannot be served
    +-- WouldBlock          the core would have to wait where it may not

They live here, not beside their raisers, because this module is the floor
every part may import: a type defined in one part could not be caught by a
sibling part (``fuse`` and ``image`` do not import each other).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import struct
import tarfile
import zlib
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class PyunionfsError(Exception):
    """What pyunionfs refuses or fails at on purpose, with a one-line message.

    The command line prints the message (``pyunionfs: ...``) and exits with
    status 1 (2 for a :class:`UsageError`) instead of a traceback: anything
    that is not one of these is a bug.
    """


class UsageError(PyunionfsError):
    """Bad input from the command line: reported as one line, exit status 2."""


class MountError(PyunionfsError):
    """A mount could not be made, unmounted or controlled: one line, exit status 1."""


class LayerError(PyunionfsError):
    """An upper or an image layer cannot be read, written or applied safely: one line, exit status 1."""


class ImageError(PyunionfsError):
    """An OCI image or layout cannot be used (a manifest, config or blob is wrong): one line, exit status 1."""


class TransferError(ImageError):
    """A registry request that may succeed if made again (a 5xx or 429, a connection refused or cut
    short).  The registry client retries these with backoff; once it gives up, this is the one line.
    ``retry_after`` is the wait the registry asked for, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreError(PyunionfsError):
    """The layer store cannot be used, or lacks what was asked (an image, a layer): one line, exit status 1."""


class ProtocolError(PyunionfsError):
    """A FUSE message that does not parse as the protocol says.

    ``unique`` and ``opcode`` are None when even the header was unreadable; the
    engine then cannot answer and can only log.  ``errno`` is what to answer
    (see :func:`to_errno`).
    """

    errno = errno.EIO

    def __init__(self, message: str, unique: int | None = None, opcode: int | None = None) -> None:
        super().__init__(message)
        self.unique = unique
        self.opcode = opcode


class UnsupportedKernel(ProtocolError):
    """The kernel's INIT cannot be served (major, minor, or a required capability).

    Answered with EPROTO, which makes the mount fail instead of limping along.
    """

    errno = errno.EPROTO


class RingError(PyunionfsError):
    """io_uring, or FUSE over io_uring, refused (see :mod:`pyunionfs.fuse.uring`):
    requests go on over /dev/fuse.  ``errno`` is the kernel's answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


class WouldBlock(PyunionfsError):
    """The request needs to wait (a long copy-up) in a thread that may not:
    nothing was changed yet; run it again where blocking is allowed
    (see :mod:`pyunionfs.fs.locking`)."""


#: What reading untrusted input (a layer tar, gzip stream, layout JSON) can raise besides
#: OSError: tarfile's own errors, truncation, a corrupt deflate stream, malformed binary or JSON
#: (``json.JSONDecodeError`` and ``UnicodeError`` are ValueErrors), numbers out of range, and
#: nesting too deep.  Whoever reads such input catches these and refuses it in one line
#: (:func:`malformed`), so no input ends in a traceback.
MALFORMED_INPUT: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    struct.error,
    ValueError,
    OverflowError,
    IndexError,
    KeyError,
    RecursionError,
)


def malformed(exc: BaseException) -> str:
    """One line saying what was wrong with the input, for the refusal."""
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fs_error(code: int, what: bytes | str | None = None) -> OSError:
    """An OSError carrying *code*, for the core to raise where it decides."""
    name = os.fsdecode(what) if isinstance(what, bytes) else what
    if name is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), name)


def to_errno(exc: BaseException) -> int:
    """Map any exception from the core to the errno the caller should see.

    OSErrors keep their errno; a :class:`ProtocolError` answers its own (EIO,
    EPROTO for a kernel that cannot be served).  Anything else is a bug in
    pyunionfs: the caller gets EIO and the log gets a traceback, but the daemon
    keeps serving.
    """
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, ProtocolError):
        return exc.errno
    return errno.EIO


def fuse_errors(
    fn: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Decorate a pyfuse3 handler so that it raises nothing but FUSEError."""
    import pyfuse3

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            if not exc.errno:
                log.exception("%s: OSError without errno", fn.__name__)
            raise pyfuse3.FUSEError(to_errno(exc)) from None
        except Exception:
            log.exception("%s failed unexpectedly; answering EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper
