"""No caller can starve the others, and what they may see depends on who they are.

* Fair shares of handles (pyunionfs/handles.py): one uid past its bound gets
  EMFILE for its own opens, opendirs and creates, while other uids and root
  go on; unprivileged callers together leave root a part.
* Shared listings (pyunionfs/cache.py): handles opened on the same version of
  a directory share one listing, freed with the last handle; a handle keeps
  its snapshot across changes until it rewinds.
* ``trusted.*`` xattrs: only a caller with CAP_SYS_ADMIN lists, reads or
  changes them (pyunionfs/callers.py decides from /proc, of real processes here).
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from pyunionfs.config import build_config
from pyunionfs.errors import UsageError
from pyunionfs.fs.callers import Caller, has_sys_admin
from pyunionfs.fs.handles import RESERVE_MIN, FairShare, capacity
from pyunionfs.fs.inodes import ROOT_INO

from .conftest import mkdir, mkfile
from .test_core_writes import ALICE, env, ino_of  # noqa: F401  (env is a fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown, trusted.* xattrs, setpriv")

BOB = Caller(4321, 4321)
ROOT = Caller(0, 0)


def errno_of(call, *args) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


# -- fair shares ---------------------------------------------------------------------------------


def test_capacity_keeps_a_reserve_and_room_for_each_handles_other_fds() -> None:
    assert capacity(1 << 20) == ((1 << 20) - (1 << 16)) // 2  # a sixteenth kept back
    assert capacity(20000) == (20000 - RESERVE_MIN) // 2
    assert capacity(100) >= 1  # a tiny limit still lets something open


def test_share_bounds_each_uid_and_leaves_root_a_part() -> None:
    share = FairShare(total=80, per_uid=30, privileged=frozenset({0}))
    assert share.shared == 70
    for _ in range(30):
        share.take(1000)
    assert errno_of(share.take, 1000) == errno.EMFILE
    for _ in range(30):
        share.take(1001)
    for _ in range(10):
        share.take(1002)
    assert errno_of(share.take, 1002) == errno.ENFILE  # the unprivileged part is used up
    for _ in range(10):
        share.take(0)  # root takes what is left
    assert errno_of(share.take, 0) == errno.ENFILE
    share.give(1000)
    share.take(1003)
    assert share.held() == 80 and share.held(1000) == 29 and share.held(1003) == 1


def test_a_failed_open_gives_its_place_back() -> None:
    share = FairShare(total=10, per_uid=1, privileged=frozenset())
    with pytest.raises(FileNotFoundError), share.admitted(1000):
        raise FileNotFoundError
    with share.admitted(1000):
        pass
    assert share.held(1000) == 1


def test_default_share_is_a_quarter_of_what_unprivileged_callers_may_hold() -> None:
    share = FairShare(total=800)
    assert share.per_uid == 700 // 4
    assert FairShare(total=800, per_uid=10_000).per_uid == 700  # never more than all of them may hold


def test_the_bound_per_uid_is_an_option(tmp_path) -> None:
    for d in ("l", "u", "m"):
        (tmp_path / d).mkdir()
    args = (str(tmp_path / "l"), str(tmp_path / "u"), str(tmp_path / "m"))
    assert build_config(*args, ["max_files_per_uid=50"]).max_files_per_uid == 50
    assert build_config(*args, []).max_files_per_uid == 0  # the default share
    for bad in ("0", "-1", "many", ""):
        with pytest.raises(UsageError, match="max_files_per_uid"):
            build_config(*args, [f"max_files_per_uid={bad}"])


async def test_one_uid_past_its_bound_cannot_open_but_others_can(env):  # noqa: F811
    for i in range(5):
        mkfile(env.l1 / f"d/f{i}", b"x")
    mkfile(env.l1 / "d/w", b"")
    os.chmod(env.l1 / "d", 0o777)
    fs = env.mount(max_files_per_uid=3)
    inos = [ino_of(fs, f"d/f{i}") for i in range(5)]
    d = ino_of(fs, "d")
    held = [fs.open_file(inos[0], os.O_RDONLY, ALICE), fs.opendir(d, ALICE), fs.open(inos[1], os.O_RDONLY, ALICE)]
    assert errno_of(fs.open_file, inos[2], os.O_RDONLY, ALICE) == errno.EMFILE
    assert errno_of(fs.open_file, ino_of(fs, "d/w"), os.O_WRONLY, ALICE) == errno.EMFILE
    assert not (env.u / "d/w").exists()  # refused before the copy-up
    assert errno_of(fs.opendir, d, ALICE) == errno.EMFILE
    assert errno_of(fs.create, d, b"new", 0o644, os.O_WRONLY | os.O_CREAT, ALICE) == errno.EMFILE
    assert not (env.u / "d/new").exists()  # refused before anything was made
    assert errno_of(fs.tmpfile, d, 0o644, os.O_RDWR, ALICE) == errno.EMFILE
    # Others, root included, still open, list and create.
    for caller in (BOB, ROOT):
        fh = fs.open_file(inos[2], os.O_RDONLY, caller)
        dh = fs.opendir(d, caller)
        assert {b"f0", b"f4", b"w"} <= {name for _, name, _, _ in fs.readdir(dh, 0)}
        made, _, _ = fs.create(d, b"by%d" % caller.uid, 0o644, os.O_WRONLY | os.O_CREAT, caller)
        for h in (fh, made):
            fs.release(h)
        fs.releasedir(dh)
    assert fs.usage()["open_files"] == 2 and fs.usage()["open_dirs"] == 1
    # Closing one gives Alice room again.
    fs.releasedir(held[1])
    fs.release(fs.open_file(inos[3], os.O_RDONLY, ALICE))
    for fh in (held[0], held[2]):
        fs.release(fh)
    assert fs.handles.share.held() == 0


# -- shared listings --------------------------------------------------------------------------------


def _big_dir(e, n: int = 300) -> None:
    for i in range(n):
        mkfile(e.l1 / f"big/entry-{i:05d}", b"")
    mkdir(e.l1 / "other")
    for i in range(50):
        mkfile(e.l1 / f"other/o{i}", b"")


def _names(fs, fh: int) -> list[bytes]:
    return [name for _, name, _, _ in fs.readdir(fh, 0)]


async def test_handles_of_one_version_share_one_listing_even_after_the_cache_forgot_it(env):  # noqa: F811
    _big_dir(env)
    fs = env.mount()
    big, other = ino_of(fs, "big"), ino_of(fs, "other")
    fs.resolver.cache.max_entries = 400  # listing "other" makes the cache forget "big"
    handles = []
    for _ in range(20):
        handles.append(fs.opendir(big, ALICE))
        fs.releasedir(fs.opendir(other, ALICE))
        _names(fs, handles[0])  # a rewind of an open handle shares it too
    assert fs.resolver.cache.names(fs.inodes[big].entry.ident) is None, "the cache should have forgotten it"
    assert fs.usage()["listings"] == 1 and fs.usage()["listed_names"] == 300
    for fh in handles:
        fs.releasedir(fh)
    assert fs.usage()["listings"] == 0 and fs.usage()["listed_names"] == 0


async def test_a_change_made_and_undone_lists_the_same_names_and_shares_them(env):  # noqa: F811
    _big_dir(env)
    fs = env.mount()
    big = ino_of(fs, "big")
    handles = []
    for _ in range(10):
        handles.append(fs.opendir(big, ALICE))
        fh, _, _ = fs.create(big, b"tmp", 0o644, os.O_WRONLY | os.O_CREAT, ALICE)
        fs.release(fh)
        fs.unlink(big, b"tmp")
    assert fs.usage()["listings"] == 1
    for fh in handles:
        fs.releasedir(fh)
    assert fs.usage()["listings"] == 0


async def test_a_handle_keeps_its_snapshot_until_it_rewinds(env):  # noqa: F811
    _big_dir(env, 3)
    fs = env.mount()
    big = ino_of(fs, "big")
    before = fs.opendir(big, ALICE)
    first = list(fs.readdir(before, 0))[:3]  # ".", "..", one name: the rest is read later
    seen = first[-1][1]
    gone = sorted({b"entry-00000", b"entry-00001", b"entry-00002"} - {seen})[0]
    fh, _, _ = fs.create(big, b"late", 0o644, os.O_WRONLY | os.O_CREAT, ALICE)
    fs.release(fh)
    fs.unlink(big, gone)
    after = fs.opendir(big, ALICE)
    assert fs.usage()["listings"] == 2
    # Read on from where it was: every name of its version once (a removed
    # one is skipped: it resolves to nothing), the new one not.
    rest = [name for _, name, _, _ in fs.readdir(before, first[-1][0])]
    assert sorted([seen, *rest]) == sorted({b"entry-00000", b"entry-00001", b"entry-00002"} - {gone})
    now = sorted({b"entry-00000", b"entry-00001", b"entry-00002", b"late"} - {gone})
    assert sorted(_names(fs, after)[2:]) == now
    assert sorted(_names(fs, before)[2:]) == now  # rewound
    assert fs.usage()["listings"] == 1  # both on the current version now
    # The directory removed while both are open.
    for name in now:
        fs.unlink(big, name)
    fs.rmdir(ROOT_INO, b"big")
    assert _names(fs, after) == [b".", b".."]
    assert fs.usage()["listings"] == 1  # "before" still holds its snapshot until it reads again
    assert _names(fs, before) == [b".", b".."]
    assert fs.usage()["listings"] == 0
    fs.releasedir(before)
    fs.releasedir(after)
    assert fs.handles.share.held() == 0


# -- trusted.* by capability ----------------------------------------------------------------------------


def _process(*setpriv: str) -> subprocess.Popen:
    """A real process with the credentials *setpriv* gives it, waiting to be asked about."""
    proc = subprocess.Popen(["setpriv", *setpriv, "--", "sh", "-c", "echo ready; exec sleep 60"],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"  # its credentials are set
    return proc


def test_capability_is_read_from_the_callers_process() -> None:
    plain = _process("--reuid=1000", "--regid=1000", "--clear-groups")
    capless_root = _process("--inh-caps=-sys_admin", "--bounding-set=-sys_admin")
    try:
        assert has_sys_admin(os.getpid(), 0)
        assert not has_sys_admin(plain.pid, 1000)
        assert not has_sys_admin(capless_root.pid, 0), "root without CAP_SYS_ADMIN is not capable"
        assert has_sys_admin(0, 0) and not has_sys_admin(0, 1000)  # unknown pid: uid 0 stands for it
        # Another uid than the request's: the id was reused; the request's uid decides.
        assert has_sys_admin(plain.pid, 0) and not has_sys_admin(os.getpid(), 1000)
    finally:
        for p in (plain, capless_root):
            p.kill()
            p.wait()


async def test_trusted_xattrs_only_for_callers_with_cap_sys_admin(env):  # noqa: F811
    f = mkfile(env.l1 / "f", b"x")
    os.setxattr(f, "trusted.t", b"1")
    os.setxattr(f, "user.u", b"2")
    fs = env.mount()
    ino = ino_of(fs, "f")
    capless_root = _process("--inh-caps=-sys_admin", "--bounding-set=-sys_admin")
    try:
        unprivileged = (ALICE, Caller(0, 0, 0, capless_root.pid))
        for caller in unprivileged:
            assert fs.listxattr(ino, caller) == [b"user.u"]
            assert errno_of(fs.getxattr, ino, b"trusted.t", caller) == errno.ENODATA
            assert fs.getxattr(ino, b"user.u", caller) == b"2"
            assert errno_of(fs.setxattr, ino, b"trusted.t", b"3", 0, caller) == errno.EPERM
            assert errno_of(fs.removexattr, ino, b"trusted.t", caller) == errno.EPERM
        assert not (env.u / "f").exists(), "a refused change copied the file up"
        me = Caller(0, 0, 0, os.getpid())
        assert sorted(fs.listxattr(ino, me)) == [b"trusted.t", b"user.u"]
        assert fs.getxattr(ino, b"trusted.t", me) == b"1"
        fs.setxattr(ino, b"trusted.t", b"3", 0, me)
        assert os.getxattr(env.u / "f", "trusted.t") == b"3"
    finally:
        capless_root.kill()
        capless_root.wait()
