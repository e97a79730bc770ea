"""Metadata-only copies (``metacopy=on``) in the core, without FUSE.

What the mount tests cannot reach: the record's format checks, a data copy
that fails midway (the record stays, so the lower data is still what reads),
and the cheap check that a mount without ``metacopy`` makes.  The kernel's
answers for the rest are in tests/mount/test_metacopy.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pyunionfs.fs import copyups
from pyunionfs.fs.markers import Markers
from pyunionfs.fs.writes import SetAttr

from .conftest import mkfile, read_path
from .test_core_writes import Env, env, ino_of, write_at  # noqa: F401  (env: the fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown, trusted.overlay.* xattrs")

META = "trusted.overlay.metacopy"


class _View:
    """One directory as the single layer of a LayerView."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def lstat(self, layer: int, rel: bytes, name: bytes) -> os.stat_result | None:
        return os.lstat(self.root / os.fsdecode(rel) / os.fsdecode(name))

    def listxattr(self, layer: int, rel: bytes, strict: bool = False) -> list[bytes]:
        return [os.fsencode(n) for n in os.listxattr(self.root / os.fsdecode(rel))]

    def getxattr(self, layer: int, rel: bytes, name: bytes) -> bytes:
        return os.getxattr(self.root / os.fsdecode(rel), name)


def test_the_metacopy_record_is_read_as_the_kernel_reads_it(tmp_path: Path) -> None:
    markers, view = Markers(), _View(tmp_path)
    for name, value, expected in (("empty", b"", True), ("struct", bytes([0, 4, 0, 0]), True),
                                  ("digest", bytes([0, 36, 0, 1]) + b"d" * 32, True)):
        p = tmp_path / name
        p.write_bytes(b"")
        os.truncate(p, 100)
        os.setxattr(p, META, value)
        assert markers.metacopy(view, 0, os.fsencode(name), os.lstat(p)) is expected
    for name, value in (("short", b"\0\3\0"), ("version", bytes([1, 4, 0, 0])), ("len", bytes([0, 9, 0, 0]))):
        p = tmp_path / name
        p.write_bytes(b"")
        os.setxattr(p, META, value)
        with pytest.raises(OSError) as info:
            markers.metacopy(view, 0, os.fsencode(name), os.lstat(p))
        assert info.value.errno == errno.EIO
    plain = tmp_path / "plain"
    plain.write_bytes(b"data" * 5000)
    assert not markers.metacopy(view, 0, b"plain", os.lstat(plain))
    # Without metacopy=on only what can be a kernel-made copy (a hole) is asked:
    # a file full of data carrying a record is not (documented in docs/semantics.md).
    os.setxattr(plain, META, b"")
    assert markers.metacopy(view, 0, b"plain", os.lstat(plain))
    assert not markers.metacopy(view, 0, b"plain", os.lstat(plain), exact=False)


async def test_a_chown_copies_up_metadata_only_and_the_first_write_the_data(env: Env) -> None:  # noqa: F811
    data = b"lower data " * 1000
    mkfile(env.l2 / "f", data)
    fs = env.mount(metacopy=True, redirect_dir="on")
    ino = ino_of(fs, "f")
    attr = fs.setattr(ino, SetAttr(uid=7, gid=8), None)
    st = os.lstat(env.u / "f")
    assert os.getxattr(env.u / "f", META) == b"" and st.st_size == len(data)
    assert st.st_blocks * 512 <= st.st_blksize  # no data in the upper
    assert (attr.uid, attr.size, attr.blocks) == (7, len(data), os.lstat(env.l2 / "f").st_blocks)
    assert read_path(fs, "f") == data
    write_at(fs, ino, b"UPPER")
    assert (env.u / "f").read_bytes() == b"UPPER" + data[5:]
    with pytest.raises(OSError):
        os.getxattr(env.u / "f", META)
    assert (env.l2 / "f").read_bytes() == data


async def test_a_data_copy_that_fails_midway_leaves_the_record_and_the_lower_data(env: Env, monkeypatch) -> None:  # noqa: F811
    data = b"x" * 200_000
    mkfile(env.l2 / "f", data)
    fs = env.mount(metacopy=True, redirect_dir="on")
    ino = ino_of(fs, "f")
    fs.setattr(ino, SetAttr(mode=0o600), None)

    def full(src: int, dst: int, size: int) -> None:
        os.pwrite(dst, b"partial", 0)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(copyups, "_fill_data", full)
    with pytest.raises(OSError) as info:
        fs.open_file(ino, os.O_WRONLY)
    assert info.value.errno == errno.ENOSPC
    assert os.getxattr(env.u / "f", META) == b""
    assert read_path(fs, "f") == data  # still the lower data: the record says so
    monkeypatch.undo()
    write_at(fs, ino, b"ok")
    assert (env.u / "f").read_bytes() == b"ok" + data[2:]


async def test_a_change_through_a_read_only_handle_of_the_data_goes_to_the_copy(env: Env) -> None:  # noqa: F811
    """fchmod/fchown/futimens name the object; a handle that reads a metadata-only copy's data
    is a lower file's, which must never be written (the env fixture checks the lowers)."""
    mkfile(env.l2 / "f", b"data")
    fs = env.mount(metacopy=True, redirect_dir="on")
    ino = ino_of(fs, "f")
    fs.setattr(ino, SetAttr(mode=0o640), None)
    fh = fs.open_file(ino, os.O_RDONLY)
    try:
        assert fs.read(fh, 0, 10) == b"data"
        attr = fs.setattr(ino, SetAttr(mode=0o600, uid=5, mtime_ns=7_000_000_000), fh)
        assert (attr.mode & 0o777, attr.uid, attr.mtime_ns) == (0o600, 5, 7_000_000_000)
        assert fs.read(fh, 0, 10) == b"data"
    finally:
        fs.release(fh)
    st = os.lstat(env.u / "f")
    assert (st.st_mode & 0o777, st.st_uid, st.st_mtime_ns) == (0o600, 5, 7_000_000_000)
