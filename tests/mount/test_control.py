"""Dropping the caches of a live mount, for when a lower changed under it anyway.

Without the drop, the daemon and the kernel keep serving what they learnt (names present and
missing, attributes, data, listings): the first half of each test checks that the change does
not show, so that the second half proves the drop, not a cache that was never there.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pyunionfs.fuse import control
from tests.support.mounting import Daemon
from tests.support.writecheck import public_dir, put, run_as

Mount = Callable[..., Daemon]


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(OSError) as info:
        fn()
    return info.value.errno


@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_drop_caches_shows_lower_changes(tmp_path: Path, mount: Mount, readonly: bool) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    put(lower / "d/a", "a")
    put(lower / "d/gone", "soon gone")
    put(lower / "d/sub/deep", "deep")
    put(lower / "file", "old")
    upper.mkdir()
    m = mount([lower], None if readonly else upper).mnt
    # What the kernel and the daemon learn: listings, names present and missing, data.
    assert sorted(os.listdir(m / "d")) == ["a", "gone", "sub"]
    assert (m / "d/gone").read_text() == "soon gone"
    assert (m / "file").read_text() == "old"
    assert errno_of(lambda: os.stat(m / "new-in-root")) == errno.ENOENT
    assert errno_of(lambda: os.stat(m / "d/sub/new-deep")) == errno.ENOENT
    # The lower changes under the mount.
    put(lower / "d/b", "b")
    (lower / "d/gone").unlink()
    put(lower / "new-in-root", "n")
    put(lower / "d/sub/new-deep", "nd")
    os.truncate(lower / "file", 0)
    (lower / "file").write_text("new content")
    assert sorted(os.listdir(m / "d")) == ["a", "gone", "sub"]
    assert errno_of(lambda: os.stat(m / "new-in-root")) == errno.ENOENT
    assert errno_of(lambda: os.stat(m / "d/sub/new-deep")) == errno.ENOENT

    answer = control.drop_caches(os.fsencode(m))
    assert answer.startswith("dropped the caches of ")

    assert sorted(os.listdir(m / "d")) == ["a", "b", "sub"]
    assert errno_of(lambda: os.stat(m / "d/gone")) == errno.ENOENT
    assert (m / "new-in-root").read_text() == "n"
    assert (m / "d/sub/new-deep").read_text() == "nd"
    assert (m / "file").read_text() == "new content"
    assert os.stat(m / "file").st_size == len("new content")


def test_only_root_and_the_owner_may_drop_and_the_names_are_reserved(mount: Mount) -> None:
    with public_dir() as pub:
        lower, upper = pub / "lower", pub / "upper"
        put(lower / "f", "data")
        os.chmod(lower, 0o755)
        upper.mkdir()
        m = mount([lower], upper, mnt=pub / "mnt").mnt
        out = run_as(1000, 1000, m, "out['drop'] = err(os.getxattr, m, 'user.pyunionfs.drop_caches')")
        assert out["drop"] == "EPERM"
        assert errno_of(lambda: os.setxattr(m, control.DROP_CACHES, b"1")) == errno.EPERM
        assert errno_of(lambda: os.getxattr(m, b"user.pyunionfs.no-such-command")) == errno.ENODATA
        assert control.DROP_CACHES not in [os.fsencode(n) for n in os.listxattr(m)]
        assert sorted(os.listdir(upper)) == []  # nothing stored, nothing copied up


def test_drop_caches_refuses_what_is_not_a_pyunionfs_mount(tmp_path: Path) -> None:
    from pyunionfs.errors import MountError

    with pytest.raises(MountError, match="is not a pyunionfs mount"):
        control.drop_caches(os.fsencode(tmp_path))


def test_the_drop_caches_command(tmp_path: Path, mount: Mount) -> None:
    import subprocess
    import sys

    lower = tmp_path / "lower"
    put(lower / "f", "old")
    m = mount([lower], None).mnt
    assert os.listdir(m) == ["f"]
    put(lower / "g", "new")
    assert os.listdir(m) == ["f"]
    res = subprocess.run([sys.executable, "-m", "pyunionfs", "drop-caches", str(m)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("pyunionfs: dropped the caches of ")
    assert sorted(os.listdir(m)) == ["f", "g"]
    res = subprocess.run([sys.executable, "-m", "pyunionfs", "drop-caches", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr == f"pyunionfs: {tmp_path} is not a pyunionfs mount\n"


def test_drop_caches_forgets_every_name_of_a_hard_link(tmp_path: Path, mount: Mount) -> None:
    """The kernel holds a hard-linked file under each name it looked up; the drop
    must make it forget all of them, not only the name the daemon saw last (a
    name below another directory goes with it; one in the root must go by itself)."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    put(lower / "a", "linked")
    (lower / "e").mkdir()
    os.link(lower / "a", lower / "e/b")
    upper.mkdir()
    m = mount([lower], upper).mnt
    first, second = os.stat(m / "a"), os.stat(m / "e/b")
    assert first.st_ino == second.st_ino and first.st_nlink == 2
    # The lower changes under the mount: a becomes a file of its own.
    (lower / "a").unlink()
    put(lower / "a", "a file of its own")
    assert os.stat(m / "a").st_ino == first.st_ino  # still the cached name

    control.drop_caches(os.fsencode(m))

    assert (m / "a").read_text() == "a file of its own"
    assert (m / "e/b").read_text() == "linked"
    assert os.stat(m / "a").st_ino != os.stat(m / "e/b").st_ino
    assert os.stat(m / "e/b").st_nlink == 1
