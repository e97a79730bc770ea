"""Errors, and the one place where exceptions become errnos.

The union core raises plain :class:`OSError` (with ``errno`` set) exactly where
a decision is made, so it can be tested without FUSE.  pyfuse3 accepts only
``FUSEError`` from a handler: anything else ends ``pyfuse3.main()`` and leaves a
dead mount.  :func:`fuse_errors` wraps every handler once instead of pasting the
conversion into each one.
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


class UsageError(Exception):
    """Bad input from the command line: reported as one line, exit status 2."""


class MountError(Exception):
    """The mount could not be made: reported as one line, exit status 1."""


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

    OSErrors keep their errno.  Anything else is a bug in pyunionfs: the caller
    gets EIO and the log gets a traceback, but the daemon keeps serving.
    """
    if isinstance(exc, OSError) and exc.errno:
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
