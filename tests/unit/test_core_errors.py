"""errors: the exception types, fs_error, to_errno and the fuse_errors handler wrapper."""

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


# -- the exception types: all in errors.py, one base, named for what failed -------------------


def _package_modules() -> list[str]:
    import pkgutil

    import pyunionfs

    return [m.name for m in pkgutil.walk_packages(pyunionfs.__path__, "pyunionfs.") if not m.name.endswith("__main__")]


def test_every_exception_type_is_defined_in_errors():
    """A type defined beside its raiser could not be caught by a sibling part (fuse and image do not
    import each other), and the command line would not know it: so every one lives in errors.py."""
    import importlib
    import inspect

    elsewhere = []
    for name in _package_modules():
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, BaseException) and name != "pyunionfs.errors":
                elsewhere.append(f"{name}.{cls_name}")
    assert elsewhere == []


def test_one_base_and_a_type_for_each_thing_that_fails():
    from pyunionfs import errors

    types = {
        errors.UsageError, errors.MountError, errors.LayerError, errors.ImageError, errors.StoreError,
        errors.ProtocolError, errors.UnsupportedKernel, errors.WouldBlock, errors.TransferError, errors.RingError,
    }
    kinds = {errors.UnsupportedKernel, errors.TransferError}
    assert all(issubclass(t, errors.PyunionfsError) for t in types)
    assert issubclass(errors.UnsupportedKernel, errors.ProtocolError)
    assert issubclass(errors.TransferError, errors.ImageError)
    # siblings, not kinds of one another: an image error is not a mount error any more
    for a in types - kinds:
        for b in types - kinds - {a}:
            assert not issubclass(a, b), (a, b)
    defined = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BaseException)}
    assert defined == types | {errors.PyunionfsError}


def test_protocol_errors_map_to_their_errno():
    from pyunionfs.errors import ProtocolError, UnsupportedKernel

    assert to_errno(ProtocolError("short", unique=3, opcode=1)) == errno.EIO
    assert to_errno(UnsupportedKernel("7.1")) == errno.EPROTO


@pytest.mark.parametrize(
    ("name", "status"),
    [("UsageError", 2), ("MountError", 1), ("LayerError", 1), ("ImageError", 1), ("StoreError", 1),
     ("ProtocolError", 1), ("WouldBlock", 1)],
)
def test_the_command_line_reports_each_type_in_one_line(monkeypatch, capsys, name, status):
    from pyunionfs import errors
    from pyunionfs.cli import commands

    def fail(args):
        raise getattr(errors, name)(f"what failed: {name}")

    monkeypatch.setattr(commands, "_command", fail)
    assert commands.main(["images"]) == status
    captured = capsys.readouterr()
    assert captured.err == f"pyunionfs: what failed: {name}\n" and captured.out == ""
