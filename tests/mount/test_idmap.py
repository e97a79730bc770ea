"""fuse-overlayfs's owner options, with fuse-overlayfs as the oracle.

Why: rootless podman and buildah mount with ``uidmapping=``/``gidmapping=``
(files stored under subordinate IDs show as the container's) or a
``squash_*`` option; pyunionfs took them and ignored them.  Here the same
layers are mounted by fuse-overlayfs and by pyunionfs with the same options,
and what each shows, and what each stores after the same chowns and
creations, must agree.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.mounting import Daemon, force_unmount, is_mounted, require_fuse
from tests.support.writecheck import put


#: Stored 1000 shows as 0, stored 100000-165535 as 1-65536: a rootless user's container.
MAPPING = "1000:0:1:100000:1:65536"
OWNERS = {"root-file": (0, 0), "user-file": (1000, 1000), "sub-file": (100000, 100000),
          "sub-dir": (100041, 100042), "far-file": (300000, 300001), "link": (100007, 100007)}


def _layers(root: Path) -> tuple[Path, Path, Path]:
    lower, upper, work = root / "lower", root / "upper", root / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    for name, (uid, gid) in OWNERS.items():
        p = lower / name
        if name == "link":
            os.symlink("root-file", p)
        elif name.endswith("dir"):
            p.mkdir()
            put(p / "inside", b"in")
        else:
            put(p, name.encode())
        os.lchown(p, uid, gid)
    return lower, upper, work


@contextmanager
def _fuse_overlayfs(lower: Path, upper: Path, work: Path, mnt: Path, options: str) -> Iterator[Path]:
    require_fuse()
    assert shutil.which("fuse-overlayfs"), "fuse-overlayfs is missing: contrib/install.sh installs it"
    mnt.mkdir()
    subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={lower},upperdir={upper},workdir={work},{options}", str(mnt)],
                   check=True, capture_output=True, timeout=30)
    try:
        assert is_mounted(mnt, "fuse.fuse-overlayfs")
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        force_unmount(mnt)


@contextmanager
def _ours(lower: Path, upper: Path, work: Path, mnt: Path, options: str) -> Iterator[Path]:
    mnt.mkdir()
    with Daemon([lower], upper, mnt, [f"workdir={work}", *options.split(",")]):
        yield mnt


def _story(m: Path) -> dict[str, object]:
    """What the mount shows, then the same changes on both."""
    shown = {n: (os.lstat(m / n).st_uid, os.lstat(m / n).st_gid) for n in sorted(os.listdir(m))}
    shown["sub-dir/inside"] = (os.lstat(m / "sub-dir" / "inside").st_uid, os.lstat(m / "sub-dir" / "inside").st_gid)
    os.chown(m / "root-file", 5, 6)  # shown 5 and 6: stored 100004 and 100005
    os.chown(m / "user-file", 70000, -1)  # shown outside every range
    os.lchown(m / "link", 0, 0)
    (m / "new-file").write_bytes(b"made by root")  # the caller's 0 is stored as 1000
    os.mkdir(m / "new-dir")
    after = {n: (os.lstat(m / n).st_uid, os.lstat(m / n).st_gid) for n in sorted(os.listdir(m))}
    return {"shown": shown, "after": after}


def _stored(upper: Path) -> dict[str, tuple[int, int]]:
    return {n: (os.lstat(upper / n).st_uid, os.lstat(upper / n).st_gid) for n in sorted(os.listdir(upper))}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("options", [
    f"uidmapping={MAPPING},gidmapping={MAPPING}",
    f"uidmapping={MAPPING}",
    "squash_to_root",
    f"squash_to_uid=7,gidmapping={MAPPING}",
    "squash_to_gid=9",
])
def test_owners_shown_and_stored_as_fuse_overlayfs_does(tmp_path: Path, options: str) -> None:
    seen, stored = {}, {}
    for side, mount in (("fuse-overlayfs", _fuse_overlayfs), ("pyunionfs", _ours)):
        lower, upper, work = _layers(tmp_path / side)
        with mount(lower, upper, work, tmp_path / side / "mnt", options) as m:
            seen[side] = _story(m)
        stored[side] = _stored(upper)
        assert {n: (os.lstat(lower / n).st_uid, os.lstat(lower / n).st_gid) for n in OWNERS} == OWNERS  # untouched
    assert seen["pyunionfs"] == seen["fuse-overlayfs"]
    assert stored["pyunionfs"] == stored["fuse-overlayfs"]
    if options.startswith("uidmapping"):
        assert seen["pyunionfs"]["shown"]["user-file"][0] == 0
        assert stored["pyunionfs"]["root-file"][0] == 100004
        assert stored["pyunionfs"]["new-file"][0] == 1000


@pytest.mark.parametrize(("option", "message"), [
    ("uidmapping=0:1000", "pyunionfs: uidmapping must be STORED:SHOWN:COUNT"),
    ("xattr_permissions=3", "pyunionfs: xattr_permissions must be one of 0, 1, 2, not '3'"),
])
def test_a_bad_owner_option_is_one_line_and_nothing_mounted(tmp_path: Path, option: str, message: str) -> None:
    lower, upper, work = _layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run([sys.executable, "-m", "pyunionfs", "mount", str(lower), str(upper), str(mnt),
                          "-o", f"workdir={work},{option}"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(message), res.stderr
    assert not is_mounted(mnt)


# -- xattr_permissions= (owners and modes in an override_stat record) ---------------------------------

PRIVILEGED = "security.fuseoverlayfs.override_stat"
USER = "user.fuseoverlayfs.override_stat"
CONTAINERS = "user.containers.override_stat"
SECURITY_CONTAINERS = "security.containers.override_stat"  # read by no fuse-overlayfs we follow
RECORDS = {"fo-user": (USER, b"1000:1000:0600"), "fo-sec": (PRIVILEGED, b"100002:100003:0640"),
           "cont": (CONTAINERS, b"100004:100005:0444"), "sec-cont": (SECURITY_CONTAINERS, b"100006:100006:0404"),
           "typed": (USER, b"100007:100008:100711")}


def _record_layers(root: Path, root_mark: str | None) -> tuple[Path, Path, Path]:
    """A lower of files with and without records; with *root_mark* the lower's
    root says its entries carry that record (and then every one does: a
    fuse-overlayfs lookup of one without fails)."""
    lower, upper, work = root / "lower", root / "upper", root / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    for name in ("plain", *RECORDS):
        put(lower / name, name.encode())
        os.chmod(lower / name, 0o644)
    (lower / "dir").mkdir()
    put(lower / "dir" / "inside", b"in")
    os.symlink("plain", lower / "link")
    for name, (xattr, value) in RECORDS.items():
        os.setxattr(lower / name, xattr, value)
    if root_mark is not None:
        os.setxattr(lower, root_mark, b"0:0:755")
        for p in (lower / "dir", *(lower / n for n in RECORDS)):
            if root_mark not in os.listxattr(p):
                os.setxattr(p, root_mark, b"100010:100011:0750")
        for p in (lower / "plain", lower / "dir" / "inside"):  # chmodded: owned 0:0 (see _record_story)
            os.setxattr(p, root_mark, b"0:0:0640")
    return lower, upper, work


def _shown(p: Path) -> tuple[object, ...]:
    """Mode, owner and group of *p*, and its xattrs, through the mount."""
    st = os.lstat(p)
    names = sorted(os.listxattr(p, follow_symlinks=False))
    xattrs: dict[str, object] = {}
    for n in [*names, USER]:
        try:
            xattrs[n] = os.getxattr(p, n, follow_symlinks=False)
        except OSError as exc:  # (EACCES where a chown recorded an ID the kernel cannot map: the mode decides)
            xattrs[n] = exc.errno
    return oct(st.st_mode), st.st_uid, st.st_gid, xattrs


def _tree(m: Path) -> dict[str, tuple[object, ...]]:
    return {n: _shown(m / n) for n in [*sorted(os.listdir(m)), "dir/inside"]}


def _record_story(m: Path, links: bool) -> dict[str, object]:
    """What the mount shows, then the same changes on both, then what it shows.

    A chmod only of what is owned 0:0: fuse-overlayfs 1.10 records 0:0 on
    every chmod (docs/semantics.md says why pyunionfs keeps the owner)."""
    shown = _tree(m)
    old = os.umask(0o022)
    try:
        os.chmod(m / "plain", 0o600)  # copy-up, then a record with the mode
        os.chown(m / "fo-user", 5, 6)
        os.chown(m / "cont", 7, -1)  # the group left alone: recorded as -1
        os.chown(m / "dir", 8, 9)  # a directory copied up, then its record
        os.chmod(m / "dir" / "inside", 0o604)
        with open(m / "fo-sec", "ab") as f:  # copy-up by a write: the lower's security. record travels
            f.write(b"more")
        with open(m / "typed", "ab") as f:
            f.write(b"more")
        os.mkdir(m / "new-dir", 0o700)
        (m / "new-dir" / "deeper").write_bytes(b"new")
        fd = os.open(m / "new-file", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.chown(m / "new-file", 11, 12)
        if links:  # (with xattr_permissions=1 fuse-overlayfs fails them: docs/semantics.md)
            os.symlink("plain", m / "new-link")
            os.lchown(m / "link", 13, 14)
        setx = {}
        for name in (USER, CONTAINERS, PRIVILEGED):
            try:
                os.setxattr(m / "new-dir", name, b"1:1:777")
                setx[name] = 0
            except OSError as exc:
                setx[name] = exc.errno
    finally:
        os.umask(old)
    return {"shown": shown, "after": _tree(m), "setxattr": setx}


def _record_stored(upper: Path) -> dict[str, object]:
    """Real mode and owner of every upper entry, and the records it holds
    (not fuse-overlayfs's own opaque-directory markers: a format difference)."""
    out: dict[str, object] = {}
    for p in sorted(q for q in upper.rglob("*") if not q.name.startswith(".wh.")):
        st = os.lstat(p)
        names = os.listxattr(p, follow_symlinks=False)
        records = {n: os.getxattr(p, n, follow_symlinks=False) for n in (PRIVILEGED, USER, CONTAINERS) if n in names}
        out[str(p.relative_to(upper))] = (oct(st.st_mode), st.st_uid, st.st_gid, records)
    st = os.lstat(upper)
    out["."] = (oct(st.st_mode), st.st_uid, st.st_gid,
                {n: os.getxattr(upper, n) for n in (PRIVILEGED, USER) if n in os.listxattr(upper)})
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("options, root_mark", [
    ("xattr_permissions=1", None),
    ("xattr_permissions=2", None),
    (f"xattr_permissions=2,uidmapping={MAPPING},gidmapping={MAPPING}", None),
    (f"xattr_permissions=1,uidmapping={MAPPING},gidmapping={MAPPING}", None),
    ("xattr_permissions=2,squash_to_root", None),
    ("xattr_permissions=2", CONTAINERS),
    ("xattr_permissions=1", PRIVILEGED),
    ("xattr_permissions=0", USER),
    (f"xattr_permissions=0,uidmapping={MAPPING}", CONTAINERS),
])
def test_owners_and_modes_in_records_as_fuse_overlayfs_keeps_them(tmp_path: Path, options: str,
                                                                   root_mark: str | None) -> None:
    seen, stored = {}, {}
    links = "xattr_permissions=1" not in options
    for side, mount in (("fuse-overlayfs", _fuse_overlayfs), ("pyunionfs", _ours)):
        lower, upper, work = _record_layers(tmp_path / side, root_mark)
        with mount(lower, upper, work, tmp_path / side / "mnt", options) as m:
            seen[side] = _record_story(m, links)
        stored[side] = _record_stored(upper)
    assert seen["pyunionfs"] == seen["fuse-overlayfs"]
    assert stored["pyunionfs"] == stored["fuse-overlayfs"]
    if options == "xattr_permissions=2" and root_mark is None:
        after = seen["pyunionfs"]["after"]
        assert isinstance(after, dict)
        assert after["fo-user"][1:3] == (5, 6) and after["new-dir"][0] == oct(0o40755)  # 0755 added, as fo does
        assert stored["pyunionfs"]["cont"] == (oct(0o100755), 0, 0, {USER: b"7:-1:100644", CONTAINERS:
                                                                     RECORDS["cont"][1]})


@pytest.mark.timeout(120)
def test_a_chmod_after_a_chown_keeps_the_recorded_owner(tmp_path: Path) -> None:
    """Where pyunionfs differs on purpose: fuse-overlayfs 1.10 records 0:0 here."""
    lower, upper, work = _record_layers(tmp_path, None)
    with _ours(lower, upper, work, tmp_path / "mnt", "xattr_permissions=2") as m:
        os.chown(m / "plain", 5, 6)
        os.chmod(m / "plain", 0o640)
        st = os.lstat(m / "plain")
        assert (st.st_uid, st.st_gid, oct(st.st_mode)) == (5, 6, oct(0o100640))
    assert os.getxattr(upper / "plain", USER) == b"5:6:100640"


def _errno_or(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except OSError as exc:
        return exc.errno


@pytest.mark.timeout(120)
def test_malformed_records_fail_as_in_fuse_overlayfs(tmp_path: Path) -> None:
    """A record sscanf cannot read: its lookup and a listing holding it fail
    with EINVAL; one longer than fuse-overlayfs reads: ERANGE."""
    values = {"garbage": b"garbage", "short": b"1:2", "not-octal": b"1:2:9", "loose": b" 12: +13:0644junk",
              "typed": b"5:6:100711", "long": b"1:2:0" + b"1" * 70}
    seen = {}
    for side, mount in (("fuse-overlayfs", _fuse_overlayfs), ("pyunionfs", _ours)):
        lower, upper, work = (tmp_path / side / d for d in ("lower", "upper", "work"))
        for d in (lower, upper, work):
            d.mkdir(parents=True)
        os.setxattr(lower, CONTAINERS, b"0:0:755")
        for name, value in values.items():
            put(lower / name, b"x")
            os.setxattr(lower / name, CONTAINERS, value)
        with mount(lower, upper, work, tmp_path / side / "mnt", "xattr_permissions=0") as m:
            seen[side] = {n: _errno_or(lambda n=n: oct(os.lstat(m / n).st_mode) + f" {os.lstat(m / n).st_uid}")
                          for n in values}
            seen[side]["."] = _errno_or(lambda: sorted(os.listdir(m)))
    assert seen["pyunionfs"] == seen["fuse-overlayfs"]
    assert seen["pyunionfs"]["garbage"] == errno.EINVAL and seen["pyunionfs"]["loose"] == "0o100644 12"


def _write_as(uid: int, fd: int, data: bytes) -> None:
    """write(2) *data* to *fd* from a child process that is *uid* (no CAP_FSETID)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = 0 if os.write(fd, data) == len(data) else 1
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0


@pytest.mark.timeout(120)
def test_a_write_by_another_user_drops_the_recorded_set_id_bits_as_fuse_overlayfs(tmp_path: Path) -> None:
    """The stored file has no set-ID bits (0755 is what a new object gets), its
    record has: a write by a caller without CAP_FSETID must drop them there."""
    seen = {}
    for side, mount in (("fuse-overlayfs", _fuse_overlayfs), ("pyunionfs", _ours)):
        lower, upper, work = _record_layers(tmp_path / side, None)
        with mount(lower, upper, work, tmp_path / side / "mnt", "xattr_permissions=2") as m:
            fd = os.open(m / "set-id", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o777)
            try:
                os.chmod(m / "set-id", 0o6777)
                before = oct(os.lstat(m / "set-id").st_mode)
                _write_as(1000, fd, b"more")
            finally:
                os.close(fd)
            seen[side] = (before, oct(os.lstat(m / "set-id").st_mode))
        seen[side] += (os.getxattr(upper / "set-id", USER), oct(os.lstat(upper / "set-id").st_mode))
    assert seen["pyunionfs"] == seen["fuse-overlayfs"]
    assert seen["pyunionfs"][1] == oct(0o100777)
