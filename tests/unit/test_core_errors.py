"""errors: fs_error, to_errno and the fuse_errors handler wrapper."""

from __future__ import annotations

import errno
import logging

import pyfuse3
import pytest

from pyunionfs.errors import fs_error, fuse_errors, to_errno


def test_fs_error():
    e = fs_error(errno.ENOENT, b"name")
    assert isinstance(e, OSError) and e.errno == errno.ENOENT and e.filename == "name"
    assert isinstance(e, FileNotFoundError)  # OSError picks the subclass
    assert fs_error(errno.EROFS).errno == errno.EROFS
    assert fs_error(errno.EIO, "s").filename == "s"


def test_to_errno():
    assert to_errno(OSError(errno.EACCES, "x")) == errno.EACCES
    assert to_errno(FileNotFoundError(errno.ENOENT, "x")) == errno.ENOENT
    assert to_errno(OSError("no errno")) == errno.EIO
    assert to_errno(ValueError()) == errno.EIO
    assert to_errno(KeyError()) == errno.EIO


async def test_oserror_becomes_fuseerror():
    @fuse_errors
    async def handler(x):
        raise OSError(errno.ENOENT, "gone")

    with pytest.raises(pyfuse3.FUSEError) as info:
        await handler(1)
    assert info.value.errno == errno.ENOENT


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ESTALE, errno.ELOOP])
async def test_oserror_errno_kept(code):
    @fuse_errors
    async def handler():
        raise fs_error(code)

    with pytest.raises(pyfuse3.FUSEError) as info:
        await handler()
    assert info.value.errno == code


async def test_unexpected_exception_is_eio_and_logged(caplog):
    @fuse_errors
    async def broken_handler():
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="pyunionfs.errors"), pytest.raises(pyfuse3.FUSEError) as info:
        await broken_handler()
    assert info.value.errno == errno.EIO
    records = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(records) == 1
    assert "broken_handler" in records[0].getMessage()
    assert records[0].exc_info is not None and records[0].exc_info[0] is ValueError


async def test_oserror_without_errno_is_eio_and_logged(caplog):
    @fuse_errors
    async def h():
        raise OSError("no errno here")

    with caplog.at_level(logging.ERROR, logger="pyunionfs.errors"), pytest.raises(pyfuse3.FUSEError) as info:
        await h()
    assert info.value.errno == errno.EIO
    assert any(r.levelno == logging.ERROR for r in caplog.records)


async def test_fuseerror_passes_through(caplog):
    original = pyfuse3.FUSEError(errno.EXDEV)

    @fuse_errors
    async def h():
        raise original

    with caplog.at_level(logging.DEBUG, logger="pyunionfs.errors"), pytest.raises(pyfuse3.FUSEError) as info:
        await h()
    assert info.value is original
    assert info.value.errno == errno.EXDEV
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_oserror_not_logged(caplog):
    @fuse_errors
    async def h():
        raise FileNotFoundError(errno.ENOENT, "x")

    with caplog.at_level(logging.DEBUG, logger="pyunionfs.errors"), pytest.raises(pyfuse3.FUSEError):
        await h()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_return_value_and_args_pass():
    @fuse_errors
    async def h(a, b=0, *, c):
        """doc"""
        return (a, b, c)

    assert await h(1, b=2, c=3) == (1, 2, 3)
    assert h.__name__ == "h"
    assert h.__doc__ == "doc"


async def test_cancellation_not_swallowed():
    """BaseExceptions (e.g. trio's Cancelled, KeyboardInterrupt) must propagate."""

    @fuse_errors
    async def h():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await h()
