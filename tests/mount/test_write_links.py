"""Write path: hardlinks, ownership and permissions, unlinked open files -- the kernel with index=on as oracle.

Why: these are the places where a union filesystem's answers depend on
state it must keep itself.  Two names of one lower inode must stay one file
after a copy-up (the kernel needs ``-o index=on`` for that; pyunionfs
always does it), across remounts and whichever name is looked up first.
New entries must belong to the caller, honour set-group-ID directories, and
an unprivileged caller must be refused exactly where a local filesystem
would refuse it.  An unlinked file that is still open must stay usable.

Each scenario is a function of a mount path (and a way to remount it); it
runs on the kernel's overlayfs first, whose results are asserted against the
specification, and then on pyunionfs, whose results must be the same.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.layergen import Stack as LayerStack
from tests.support.layergen import kernel_mount, kernel_umount
from tests.support.mounting import Daemon
from tests.support.treesnap import Snapshot, diff, fmt_path, snapshot
from tests.support.writecheck import (
    default_workdir,
    errname,
    errno_of,
    kill_daemon,
    on_kernel_and_ours,
    public_dir,
    put,
    run_as,
    upper_layout,
    work_entries,
)

Mount = Callable[..., Daemon]
Remount = Callable[[], None]
Obs = dict[str, Any]


# --------------------------------------------------------------------------
# Hardlinks of lower files
# --------------------------------------------------------------------------


def _link_lower(low: Path) -> None:
    put(low / "a", "original\n")
    os.link(low / "a", low / "b")
    (low / "sub").mkdir()
    os.link(low / "a", low / "sub/c")
    put(low / "x", "x data\n")
    os.link(low / "x", low / "y")
    put(low / "single", "single\n")


def _names(m: Path, names: list[str], lower_ino: int) -> Obs:
    """Data, link count and inode agreement of the names of one file, read in the given order."""
    out: Obs = {}
    inos = set()
    for n in names:
        st = os.lstat(m / n)
        out[n] = ((m / n).read_text(), st.st_nlink)
        inos.add(st.st_ino)
    out["one inode"] = len(inos) == 1
    out["inode is the lower one"] = inos == {lower_ino}
    return out


def _hardlink_scenario(m: Path, remount: Remount, low: Path) -> Obs:
    """Writes, links and unlinks on lower hardlinks, with remounts between, recording what each name shows."""
    ino_a, ino_x, ino_single = (os.lstat(low / n).st_ino for n in ("a", "x", "single"))
    obs: Obs = {"start": _names(m, ["a", "b", "sub/c"], ino_a)}
    with open(m / "a", "r+") as f:
        f.write("CHANGED")
    obs["written through a"] = _names(m, ["a", "b", "sub/c"], ino_a)
    obs["link lower single"] = errname(errno_of(os.link, m / "single", m / "single-link"))
    obs["single"] = _names(m, ["single", "single-link"], ino_single)
    obs["unlink alias y"] = errname(errno_of(os.unlink, m / "y"))
    obs["x"] = _names(m, ["x"], ino_x)
    remount()
    obs["remount, b first"] = _names(m, ["b", "sub/c", "a"], ino_a)
    obs["remount single-link first"] = _names(m, ["single-link", "single"], ino_single)
    obs["remount x"] = (_names(m, ["x"], ino_x), errname(errno_of(os.lstat, m / "y")))
    remount()
    obs["remount, sub/c first"] = _names(m, ["sub/c", "a", "b"], ino_a)
    with open(m / "sub/c", "a") as f:  # a second change, through another name
        f.write("again\n")
    obs["appended through sub/c"] = _names(m, ["a", "b", "sub/c"], ino_a)
    obs["link b to d"] = errname(errno_of(os.link, m / "b", m / "d"))
    obs["after link"] = _names(m, ["d", "a", "b", "sub/c"], ino_a)
    obs["unlink a"] = errname(errno_of(os.unlink, m / "a"))
    obs["after unlink"] = _names(m, ["b", "sub/c", "d"], ino_a)
    remount()
    obs["remount, d first"] = _names(m, ["d", "sub/c", "b"], ino_a)
    obs["a is gone"] = errname(errno_of(os.lstat, m / "a"))
    return obs


def test_lower_hardlinks_stay_one_file(tmp_path: Path, mount: Mount) -> None:
    """Names of one lower inode show the same data and st_nlink after writes, links, unlinks and remounts."""
    # the kernel with index=on is the reference
    klow, kup, kwork, kmnt = (tmp_path / "kernel" / n for n in ("low", "up", "work", "mnt"))
    _link_lower(klow)
    kup.mkdir()
    kwork.mkdir()
    kmnt.mkdir()
    kstack = LayerStack(lowers=(klow,), upper=kup, work=kwork)
    kernel_mount(kstack, kmnt, ["index=on"])
    try:
        def kremount() -> None:
            kernel_umount(kmnt)
            kernel_mount(kstack, kmnt, ["index=on"])

        expected = _hardlink_scenario(kmnt, kremount, klow)
    finally:
        kernel_umount(kmnt)
    # what the kernel shows is what the spec asks
    changed = ("CHANGEDl\n", 3)  # "original\n" overwritten at offset 0
    assert expected["written through a"] == {"a": changed, "b": changed, "sub/c": changed,
                                             "one inode": True, "inode is the lower one": True}
    assert expected["remount, d first"]["d"] == ("CHANGEDl\nagain\n", 3)
    assert expected["x"]["x"] == ("x data\n", 1)

    low, up, mnt = tmp_path / "ours" / "low", tmp_path / "ours" / "up", tmp_path / "ours" / "mnt"
    _link_lower(low)
    up.mkdir()
    mnt.mkdir()
    daemons = [mount([low], up, mnt=mnt)]

    def remount() -> None:
        daemons[-1].stop()
        daemons.append(mount([low], up, mnt=mnt))

    got = _hardlink_scenario(mnt, remount, low)
    daemons[-1].stop()
    assert (default_workdir(up) / "index").is_dir(), "no index/ in the work dir after copying up a hardlink"
    wrong = [f"  {k}:\n    kernel    {expected[k]}\n    pyunionfs {got.get(k)}"
             for k in expected if got.get(k) != expected[k]]
    assert not wrong, "differs from the kernel with index=on:\n" + "\n".join(wrong)


def _view(m: Path) -> tuple[Snapshot, dict[bytes, int]]:
    """The tree (hardlink groups included) and every non-directory's st_nlink."""
    snap = snapshot(m)
    nlinks = {p: os.lstat(os.fsencode(m) + b"/" + p).st_nlink for p, e in snap.items() if e.kind != "dir"}
    return snap, nlinks


def test_hardlink_index_is_shared_with_the_kernel(tmp_path: Path, mount: Mount) -> None:
    """pyunionfs's upper and work dir mount as the kernel's upperdir/workdir with index=on, and back.

    Why: the README promises that the kernel can take over an upper and its
    work directory (index included), so hardlinked copies made by either
    one must be seen as one file, with the same link counts, by the other.
    """
    low, up, mnt = tmp_path / "low", tmp_path / "up", tmp_path / "mnt"
    _link_lower(low)
    up.mkdir()
    mnt.mkdir()
    work = default_workdir(up)
    d = mount([low], up, mnt=mnt)
    with open(mnt / "a", "r+") as f:
        f.write("CHANGED")
    os.link(mnt / "b", mnt / "d")
    os.unlink(mnt / "y")
    os.link(mnt / "single", mnt / "single-link")
    ours = _view(mnt)
    d.stop()
    assert ours[0]["sub/c"].links == (b"a", b"b", b"d", b"sub/c") and ours[1][b"sub/c"] == 4, ours
    assert ours[0]["x"].links == (b"x",) and ours[1][b"x"] == 1, ours

    failures = []
    kstack = LayerStack(lowers=(low,), upper=up, work=work)
    kernel_mount(kstack, mnt, ["index=on"])
    try:
        theirs = _view(mnt)
        if theirs != ours:
            failures.append("pyunionfs live (A) vs kernel index=on over its upper and work dir (B):\n"
                            + "\n".join(diff(ours[0], theirs[0]) + _nlink_diff(ours[1], theirs[1])))
        with open(mnt / "sub/c", "a") as f:  # the kernel changes the same files
            f.write("by the kernel\n")
        os.link(mnt / "x", mnt / "x2")
        os.unlink(mnt / "d")
        kernel_live = _view(mnt)
    finally:
        kernel_umount(mnt)
    assert kernel_live[1][b"a"] == 3 and kernel_live[1][b"x2"] == 2, kernel_live[1]

    d = mount([low], up, mnt=mnt)
    again = _view(mnt)
    d.stop()
    if again != kernel_live:
        failures.append("kernel index=on live (A) vs pyunionfs over the kernel's upper and index (B):\n"
                        + "\n".join(diff(kernel_live[0], again[0]) + _nlink_diff(kernel_live[1], again[1])))
    assert not failures, "\n".join(failures)


def _nlink_diff(a: dict[bytes, int], b: dict[bytes, int]) -> list[str]:
    return [f"{fmt_path(p)}: st_nlink {a.get(p)} != {b.get(p)}"
            for p in sorted(set(a) | set(b)) if a.get(p) != b.get(p)]


# --------------------------------------------------------------------------
# Ownership, set-group-ID directories, permission checks
# --------------------------------------------------------------------------


def _owner_lower(low: Path) -> None:
    for d, mode, gid in (("pub", 0o777, 0), ("sg", 0o2777, 1234), ("priv", 0o755, 0), ("sticky", 0o1777, 0)):
        (low / d).mkdir(parents=True)
        os.chown(low / d, 0, gid)
        os.chmod(low / d, mode)
    put(low / "rootfile", "root's\n", 0o644)
    put(low / "secret", "root only\n", 0o600)
    put(low / "sticky/other", "someone else's\n", 0o666)
    os.chown(low / "sticky/other", 1234, 1234)
    put(low / "mine", "uid 1000's\n", 0o644)
    os.chown(low / "mine", 1000, 1000)
    put(low / "sg/existing", "e", 0o666)
    put(low / "pub/own", "uid 1000's, in a shared dir\n", 0o644)
    os.chown(low / "pub/own", 1000, 1000)
    put(low / "pub/theirs", "uid 1234's, in a shared dir\n", 0o644)
    os.chown(low / "pub/theirs", 1234, 1234)
    put(low / "pub/locked", "uid 1000's, mode 000\n", 0o000)
    os.chown(low / "pub/locked", 1000, 1000)
    for name, mode, gid in (("suid", 0o4755, 1000), ("sgid-other-group", 0o2775, 1234)):
        put(low / "pub" / name, "#!/bin/sh\n")
        os.chown(low / "pub" / name, 1000, gid)
        os.chmod(low / "pub" / name, mode)


_AS_USER = r"""
mkfile(m + "/pub/f")
os.mkdir(m + "/pub/d")
os.symlink("target", m + "/pub/l")
os.mkfifo(m + "/pub/p")
mkfile(m + "/sg/f")
os.mkdir(m + "/sg/d")
mkfile(m + "/sg/d/g")
os.mkdir(m + "/sg/d/e")
out["errors"] = {
    "create in 0755 root dir": err(mkfile, m + "/priv/x"),
    "mkdir in 0755 root dir": err(os.mkdir, m + "/priv/y"),
    "write root's 0644 file": err(openw, m + "/rootfile"),
    "read root's 0600 file": err(open, m + "/secret"),
    "chmod root's file": err(os.chmod, m + "/rootfile", 0o666),
    "chown own file to root": err(os.chown, m + "/mine", 0, 0),
    "utime root's file": err(os.utime, m + "/rootfile", (1, 1)),
    "touch root's file": err(os.utime, m + "/rootfile"),
    "setxattr on root's file": err(os.setxattr, m + "/rootfile", "user.x", b"1"),
    "unlink in 0755 root dir": err(os.unlink, m + "/rootfile"),
    "unlink other's file in sticky dir": err(os.unlink, m + "/sticky/other"),
    "rename other's file in sticky dir": err(os.rename, m + "/sticky/other", m + "/sticky/mine-now"),
    "hardlink root's file": err(os.link, m + "/rootfile", m + "/pub/hl"),
    "write own file": err(openw, m + "/mine"),
    "chmod own file": err(os.chmod, m + "/mine", 0o600),
    "setxattr own file": err(os.setxattr, m + "/mine", "user.mine", b"1"),
    "write other's 0666 file": err(openw, m + "/sg/existing"),
    "rename own lower file": err(os.rename, m + "/pub/own", m + "/pub/own2"),
    "truncate own file": err(os.truncate, m + "/pub/own2", 3),
    "link own file": err(os.link, m + "/pub/own2", m + "/pub/own3"),
    "unlink other's file in 0777 dir": err(os.unlink, m + "/pub/theirs"),
    "symlink in 0755 root dir": err(os.symlink, "x", m + "/priv/l"),
    "rmdir own new dir": err(os.rmdir, m + "/pub/d"),
    "chown own file to own group": err(os.chown, m + "/mine", -1, 1000),
    "chown own file to another group": err(os.chown, m + "/mine", -1, 1234),
    "setxattr own mode-000 file": err(os.setxattr, m + "/pub/locked", "user.x", b"1"),
    "read own mode-000 file": err(open, m + "/pub/locked"),
    "chmod own mode-000 file": err(os.chmod, m + "/pub/locked", 0o400),
    "read it now": err(open, m + "/pub/locked"),
    "write own set-user-ID file": err(openw, m + "/pub/suid"),
    "write own set-group-ID file of another group": err(openw, m + "/pub/sgid-other-group"),
}
for p in ("pub/suid", "pub/sgid-other-group"):  # a write by the owner drops set-ID bits, as anywhere
    with open(m + "/" + p, "a") as f:
        f.write("echo\n")
out["stat"] = {}
for p in ("pub/f", "pub/l", "pub/p", "sg/f", "sg/d", "sg/d/g", "sg/d/e", "mine", "sg/existing", "pub/own2",
          "pub/suid", "pub/sgid-other-group", "pub/locked"):
    st = os.lstat(m + "/" + p)
    out["stat"][p] = [st.st_uid, st.st_gid, oct(st.st_mode)]
"""

#: Created entries whose owner on disk (in the upper) must be the caller's.
_CREATED = ("pub/f", "pub/l", "pub/p", "sg/f", "sg/d", "sg/d/g", "sg/d/e")


def _on_disk(up: Path) -> dict[str, list[Any]]:
    out = {}
    for p in _CREATED + ("mine",):
        st = os.lstat(up / p)
        out[p] = [st.st_uid, st.st_gid, oct(st.st_mode)]
    return out


def test_new_entries_belong_to_the_caller_and_permissions_are_checked(tmp_path: Path, mount: Mount) -> None:
    """As uid 1000: new entries are 1000's (gid of a set-group-ID parent), and refusals match the kernel's."""
    with public_dir() as pub:
        results = on_kernel_and_ours(tmp_path, mount, _owner_lower, lambda m: run_as(1000, 1000, m, _AS_USER), pub)
    k_out, p_out = results["kernel"], results["pyunionfs"]
    k_disk, p_disk = (_on_disk(tmp_path / side / "up") for side in ("kernel", "pyunionfs"))
    # the spec, as the kernel shows it
    assert k_out["stat"]["pub/f"][:2] == [1000, 1000] and k_out["stat"]["sg/f"][:2] == [1000, 1234]
    assert k_out["stat"]["sg/d"] == [1000, 1234, oct(stat.S_IFDIR | 0o2755)]
    assert k_out["stat"]["sg/d/e"] == [1000, 1234, oct(stat.S_IFDIR | 0o2755)]
    assert k_out["errors"]["create in 0755 root dir"] == "EACCES"
    assert k_out["errors"]["write root's 0644 file"] == "EACCES"
    assert k_out["errors"]["unlink other's file in sticky dir"] == "EPERM"
    assert k_out["errors"]["write own file"] == "ok"
    assert all(k_disk[p] == k_out["stat"][p] for p in _CREATED), (k_disk, k_out["stat"])
    wrong = [f"  {k}: kernel {v}, pyunionfs {p_out['errors'].get(k)}" for k, v in k_out["errors"].items()
             if p_out["errors"].get(k) != v]
    assert not wrong, "permission checks differ from the kernel's:\n" + "\n".join(wrong)
    wrong = [f"  {k}: kernel {v}, pyunionfs {p_out['stat'].get(k)}" for k, v in k_out["stat"].items()
             if p_out["stat"].get(k) != v]
    assert not wrong, "owner/mode seen through the mount differ from the kernel's:\n" + "\n".join(wrong)
    wrong = [f"  {k}: kernel {v}, pyunionfs {p_disk.get(k)}" for k, v in k_disk.items() if p_disk.get(k) != v]
    assert not wrong, "owner/mode stored in the upper differ from the kernel's:\n" + "\n".join(wrong)


# --------------------------------------------------------------------------
# Unlinked open files
# --------------------------------------------------------------------------


def _unlinked_lower(low: Path) -> None:
    put(low / "copied", "lower data of copied\n")
    put(low / "plain", "lower data of plain\n")
    put(low / "dir/deep", "deep\n")


def _unlinked_scenario(m: Path) -> Obs:
    """Files unlinked while open (lower copied up by the open, lower read-only, upper-only) stay usable."""
    obs: Obs = {}
    put(m / "fresh", "upper-only data\n")
    fds = {
        "copied": os.open(m / "copied", os.O_RDWR),
        "plain": os.open(m / "plain", os.O_RDONLY),
        "fresh": os.open(m / "fresh", os.O_RDWR),
        "dir/deep": os.open(m / "dir/deep", os.O_RDWR),
    }
    try:
        for name, fd in fds.items():
            obs[f"unlink {name}"] = errname(errno_of(os.unlink, m / name))
            obs[f"lstat {name}"] = errname(errno_of(os.lstat, m / name))
            st = os.fstat(fd)
            obs[f"fstat {name}"] = (st.st_nlink, st.st_size, stat.S_ISREG(st.st_mode))
        for name in ("copied", "fresh", "dir/deep"):
            fd = fds[name]
            os.pwrite(fd, b"WRITTEN AFTER UNLINK", 0)
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, b"+more")
            os.fsync(fd)
            obs[f"read back {name}"] = os.pread(fd, 100, 0)
        obs["read plain"] = os.pread(fds["plain"], 100, 0)
        obs["listing"] = sorted(os.listdir(m))
        obs["listing dir"] = sorted(os.listdir(m / "dir"))
        put(m / "copied", "a new file under the old name\n")  # independent of the open one
        obs["new copied"] = (m / "copied").read_bytes()
        obs["old copied"] = os.pread(fds["copied"], 100, 0)
    finally:
        for fd in fds.values():
            os.close(fd)
    obs["listing after close"] = sorted(os.listdir(m))
    return obs


def test_unlinked_open_file_stays_usable(tmp_path: Path, mount: Mount) -> None:
    """Unlinking an open file hides the name at once, keeps the data usable through the fd (st_nlink 0)."""
    results = on_kernel_and_ours(tmp_path, mount, _unlinked_lower, _unlinked_scenario)
    k_obs, p_obs = results["kernel"], results["pyunionfs"]
    k_layout, p_layout = (upper_layout(tmp_path / side / "up") for side in ("kernel", "pyunionfs"))
    assert k_obs["fstat copied"][0] == 0 and k_obs["fstat fresh"][0] == 0
    assert k_obs["lstat copied"] == "ENOENT"
    assert k_obs["read back copied"].startswith(b"WRITTEN AFTER UNLINK")
    assert k_obs["read plain"] == b"lower data of plain\n"
    assert k_layout["copied"][0] == "reg" and k_layout["plain"] == ("whiteout",) and "fresh" not in k_layout
    wrong = [f"  {k}: kernel {v!r}, pyunionfs {p_obs.get(k)!r}" for k, v in k_obs.items() if p_obs.get(k) != v]
    assert not wrong, "differs from the kernel:\n" + "\n".join(wrong)
    assert p_layout == k_layout, f"upper after close:\nkernel    {k_layout}\npyunionfs {p_layout}"


def _reader_scenario(m: Path) -> Obs:
    """A descriptor opened read-only on a lower file, then a write through another one (copy-up)."""
    r = os.open(m / "f", os.O_RDONLY)
    try:
        obs: Obs = {"before": os.pread(r, 100, 0)}
        w = os.open(m / "f", os.O_WRONLY)
        try:
            os.pwrite(w, b"UPPER", 0)
        finally:
            os.close(w)
        obs["after, old reader"] = os.pread(r, 100, 0)
        obs["same inode"] = os.fstat(r).st_ino == os.lstat(m / "f").st_ino
        obs["fresh reader"] = (m / "f").read_bytes()
    finally:
        os.close(r)
    return obs


def test_reader_opened_before_copy_up_sees_later_writes(tmp_path: Path, mount: Mount) -> None:
    """A file stays one file across its copy-up: an earlier read-only descriptor sees the new data."""
    results = on_kernel_and_ours(tmp_path, mount, lambda low: put(low / "f", "lower data\n"), _reader_scenario)
    assert results["kernel"]["after, old reader"] == b"UPPER data\n"
    assert results["pyunionfs"] == results["kernel"]


def test_unlinked_open_files_leave_nothing_after_close_or_crash(tmp_path: Path, mount: Mount) -> None:
    """An unlinked open file leaves no trace in the upper or the work dir: after close, and after kill -9."""
    low, up, mnt = tmp_path / "low", tmp_path / "up", tmp_path / "mnt"
    _unlinked_lower(low)
    up.mkdir()
    mnt.mkdir()
    work = default_workdir(up)
    expected = {"copied": ("whiteout",), "plain": ("whiteout",)}
    d = mount([low], up, mnt=mnt)
    for round_ in ("close", "crash"):
        put(mnt / "fresh", "upper-only data\n")
        fds = [os.open(mnt / name, os.O_RDWR) for name in ("copied", "fresh")]
        fds.append(os.open(mnt / "plain", os.O_RDONLY))
        for name in ("copied", "fresh", "plain"):
            os.unlink(mnt / name)
        for fd in fds[:2]:
            os.pwrite(fd, b"x" * 100_000, 0)
        if round_ == "close":
            for fd in fds:
                os.close(fd)
            d.stop()
        else:
            kill_daemon(d)
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        d = mount([low], up, mnt=mnt)
        assert sorted(os.listdir(mnt)) == ["dir"], f"after {round_}"
        assert upper_layout(up) == expected, f"after {round_}: upper is {upper_layout(up)}"
        assert work_entries(work) == [], f"after {round_}: work dir has {work_entries(work)}"
        put(mnt / "copied", "again")  # the next round unlinks lower-backed names again
        put(mnt / "plain", "again")
    d.stop()


def _held_after_replace(m: Path) -> Obs:
    """Hold files by O_PATH descriptors (nothing open in the filesystem), replace or unlink them, create more.

    Why: the kernel keeps the inode of a held file; the filesystem must not
    hand its number (the FUSE node id) to another file while that is so, or
    the kernel declares the held inode stale and every use of it fails
    with EIO.  On the upper's filesystem the number of a deleted file is
    free again at once, so new files soon get it.
    """
    put(m / "a", "old\n")
    put(m / "u", "unlinked\n")
    held = {name: os.open(m / name, os.O_PATH) for name in ("a", "u")}
    try:
        before = {name: os.fstat(fd).st_ino for name, fd in held.items()}
        put(m / "b", "replacement\n")
        os.rename(m / "b", m / "a")
        os.unlink(m / "u")
        for k in range(50):
            put(m / f"c{k}", "new\n")
        inos = {os.lstat(m / f"c{k}").st_ino for k in range(50)} | {os.lstat(m / "a").st_ino}
        obs: Obs = {}
        for name, fd in held.items():
            try:
                st = os.fstat(fd)
                obs[f"held {name}"] = (st.st_ino == before[name], st.st_nlink, st.st_size)
            except OSError as exc:
                obs[f"held {name}"] = errname(exc.errno or 0)
            obs[f"number of {name} reused"] = before[name] in inos
        return obs
    finally:
        for fd in held.values():
            os.close(fd)


def test_replaced_file_held_by_the_kernel_keeps_its_identity(tmp_path: Path, mount: Mount) -> None:
    """A file replaced or unlinked while still held stays valid (st_nlink 0) and its number is not reused."""
    results = on_kernel_and_ours(tmp_path, mount, lambda low: None, _held_after_replace)
    assert results["kernel"] == {"held a": (True, 0, 4), "number of a reused": False,
                                 "held u": (True, 0, 9), "number of u reused": False}
    assert results["pyunionfs"] == results["kernel"]
