"""fuse-overlayfs's owner options, with fuse-overlayfs as the oracle.

Why: rootless podman and buildah mount with ``uidmapping=``/``gidmapping=``
(files stored under subordinate IDs show as the container's) or a
``squash_*`` option; pyunionfs took them and ignored them.  Here the same
layers are mounted by fuse-overlayfs and by pyunionfs with the same options,
and what each shows, and what each stores after the same chowns and
creations, must agree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
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


def test_a_malformed_mapping_is_one_line_and_nothing_mounted(tmp_path: Path) -> None:
    lower, upper, work = _layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run([sys.executable, "-m", "pyunionfs", "mount", str(lower), str(upper), str(mnt),
                          "-o", f"workdir={work},uidmapping=0:1000"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "uidmapping must be STORED:SHOWN:COUNT" in res.stderr
    assert not is_mounted(mnt)
