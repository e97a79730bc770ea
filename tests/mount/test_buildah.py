"""Rootless buildah with pyunionfs as containers/storage's ``mount_program``.

A throwaway user (made with useradd, which gives it a free range of
subordinate IDs in /etc/subuid and /etc/subgid; userdel takes user and ranges
away) runs buildah with ``--storage-driver overlay`` and
``overlay.mount_program`` set to the venv's ``pyunionfs``: buildah makes its
user namespace with newuidmap/newgidmap, containers/storage runs the drop-in
command line inside it (``-o lowerdir=...,upperdir=...,workdir=...,volatile``
and, for a container with its own ID mapping, ``uidmapping=:0:1000:2000``),
``buildah run`` runs busybox on the mount, and containers/storage unmounts it.

The same build runs once more with fuse-overlayfs as the mount program, the
oracle: every committed layer must hold the same tar members (names, types,
owners, modes, link targets, contents; not times), but for one directory where
fuse-overlayfs is wrong (:data:`ORACLE_WRONG`); the layers applied in order
must make the tree the build steps made.  The uppers on disk must store the
container's owners as the user's subordinate IDs, as fuse-overlayfs stores
them, and no process of the user may be left once the containers are removed
(containers/storage unmounted every mount and each daemon ended).

Two things of this kind of machine are worked around inside a private mount
namespace of the test, never for the machine: /dev/fuse may be closed to users
(a 0666 node of the same device is bound over it, Debian's default mode), and
the venv's interpreter may live under a directory users cannot enter, such as
/root/.pyenv (that directory is covered with a tmpfs showing only the path to
the interpreter).  ``buildah run`` runs runc (OCI isolation, no network):
crun 1.8 refuses hybrid cgroup hierarchies, and buildah 1.28's chroot isolation
cannot run a container with an ID mapping of its own.  What the machine must
allow (user namespaces, newuidmap) is checked first, and the test fails saying
which one is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.mounting import require_fuse

ROOT = Path(__file__).resolve().parents[2]
PYUNIONFS = Path(sys.executable).with_name("pyunionfs")
FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
BUSYBOX = "/bin/busybox"

#: The first build step, in a container from scratch (busybox copied in).
BASE_STEP = r"""
B=/bin/busybox
$B mkdir -p /d/sub /gd/inner /keep
echo lower > /d/f && $B chown 7:8 /d/f && $B chmod 640 /d/f
echo data > /x && $B chown 123:456 /x && $B chmod 604 /x
$B ln -s x /l && $B ln /x /d/hard
echo gone > /g && echo old > /gd/inner/o && $B chown -R 2000:3000 /gd
echo k > /keep/k && $B mkfifo /fifo && $B chmod 1777 /keep
"""
#: The second one, over the committed first: copy-ups, owner changes, whiteouts, an opaque directory.
TOP_STEP = r"""
B=/bin/busybox
echo more >> /d/f && $B chown 9:10 /d/f && $B chmod 600 /d/f
$B chown 0:0 /x && $B chmod 4755 /d/sub
$B rm /g && $B rm -r /gd && $B mkdir /gd && echo new > /gd/n && $B chown 65536:65535 /gd/n
$B mkdir -p /new/sub && echo s > /new/sub/s && $B chown -R 1000:1000 /new
$B mv /keep/k /keep/k2 && $B touch /keep/t
$B ls -ln /d /x /gd/n
"""

#: In the container with an ID mapping of its own (its 0-1999 are the user namespace's 1000-2999).
MAPPED_STEP = r"""
B=/bin/busybox
$B ls -ln /x /d/f /mapped
echo m > /m && $B chown 7:8 /m && $B mkdir /md && $B chown 1999:1998 /md
"""
#: ``buildah run`` with runc, without a network (netavark cannot join a rootless network namespace here).
RUN = ("run", "--runtime", "runc", "--network", "none")


@dataclass
class User:
    name: str
    uid: int
    gid: int
    subuid: int  #: first subordinate UID (the container's UID 1)
    subgid: int


def _subid(path: str, name: str) -> int:
    for line in Path(path).read_text().splitlines():
        owner, start, _count = line.split(":")
        if owner == name:
            return int(start)
    pytest.fail(f"useradd gave {name} no range in {path} (SUB_UID_COUNT/SUB_GID_COUNT in /etc/login.defs?)")


def _processes_of(uid: int) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()[1] == str(uid):
                    pids.append(int(pid))
    return pids


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return "?"


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    """A throwaway user with subordinate IDs; removed with its ranges and processes."""
    if os.geteuid() != 0:
        pytest.skip("needs root: it adds a user with subordinate IDs")
    missing = [p for p in ("buildah", "runc", "newuidmap", "newgidmap", "useradd", "setpriv", "unshare")
               if shutil.which(p) is None]
    missing += [p for p in (BUSYBOX, FUSE_OVERLAYFS, str(PYUNIONFS)) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run contrib/install.sh (buildah, runc, uidmap, busybox-static, "
                    "fuse-overlayfs)")
    require_fuse()
    name = f"pyufs-bld{os.getpid()}"
    res = subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    try:
        pw = pwd.getpwnam(name)
        yield User(name, pw.pw_uid, pw.pw_gid, _subid("/etc/subuid", name), _subid("/etc/subgid", name))
    finally:
        uid = pwd.getpwnam(name).pw_uid
        for _ in range(50):
            pids = _processes_of(uid)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        res = subprocess.run(["userdel", name], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        for path in ("/etc/subuid", "/etc/subgid"):
            assert f"\n{name}:" not in "\n" + Path(path).read_text(), f"userdel left {name}'s range in {path}"


def _blocked_parents(paths: list[str]) -> dict[str, set[str]]:
    """Directories on the way to *paths* (and to the targets of the symbolic links
    on it) that other users cannot enter, each with the names under it that must show."""
    out: dict[str, set[str]] = {}
    todo, seen = list(paths), set()
    while todo:
        path = os.path.abspath(todo.pop())
        if path in seen:
            continue
        seen.add(path)
        parts = Path(path).parts
        for i in range(1, len(parts)):
            here = os.path.join(*parts[:i])
            if not os.stat(here).st_mode & stat.S_IXOTH:
                out.setdefault(here, set()).add(parts[i])
                break
            at = os.path.join(here, parts[i])
            if os.path.islink(at):
                todo.append(os.path.join(here, os.readlink(at), *parts[i + 1:]))
                break
    return out


class Builder:
    """buildah as the throwaway user, with *program* as containers/storage's mount program."""

    def __init__(self, user: User, top: Path, program: str) -> None:
        self.user, self.top, self.program = user, top, program
        self.complaints: list[str] = []  #: errors and warnings of containers/storage, and pyunionfs's
        for d in ("home", "run", "graph", "out"):
            (top / d).mkdir(mode=0o700)
            os.chown(top / d, user.uid, user.gid)
        (top / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{top}/run"\ngraphroot = "{top}/graph"\n'
            f'rootless_storage_path = "{top}/graph"\n'
            f'[storage.options.overlay]\nmount_program = "{program}"\n')
        lines = ["set -e"]
        fuse = os.stat("/dev/fuse")
        if fuse.st_mode & 0o006 != 0o006:
            (top / "dev").mkdir()
            lines += [f"mount -t tmpfs -o mode=0755 tmpfs {top}/dev",
                      f"mknod -m 0666 {top}/dev/fuse c {os.major(fuse.st_rdev)} {os.minor(fuse.st_rdev)}",
                      f"mount --bind {top}/dev/fuse /dev/fuse"]
        needed = [sys.executable, sys.prefix, sys.base_prefix, str(ROOT)]
        for n, (parent, names) in enumerate(_blocked_parents(needed).items()):
            stage = top / f"stage{n}"
            stage.mkdir()
            lines += [f"mount --bind {shlex.quote(parent)} {stage}",
                      f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(parent)}"]
            for name in sorted(names):
                at = shlex.quote(os.path.join(parent, name))
                lines += [f"mkdir {at}" if os.path.isdir(os.path.join(parent, name)) else f"touch {at}",
                          f"mount --bind {shlex.quote(str(stage / name))} {at}"]
            lines.append(f"umount {stage}")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": f"{top}/home", "XDG_RUNTIME_DIR": f"{top}/run",
               "CONTAINERS_STORAGE_CONF": f"{top}/storage.conf", "LC_ALL": "C"}
        lines.append(f"exec setpriv --reuid {user.uid} --regid {user.gid} --clear-groups env -i "
                     + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + ' "$@"')
        self.prelude = "\n".join(lines)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """*args* as the user, in a private mount namespace (see the module's docstring)."""
        res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", self.prelude, "sh", *args],
                             capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            pytest.fail(f"{' '.join(args)} with mount program {self.program} exited {res.returncode}:\n"
                        f"{res.stdout}{res.stderr}")
        self.complaints += [line for line in res.stderr.splitlines() if "level=error" in line
                            or "level=warning" in line or line.startswith("pyunionfs")]
        return res

    def buildah(self, *args: str) -> str:
        return self.run("buildah", *args).stdout.strip()

    def upper(self, container: str) -> Path:
        """The upper directory (``diff``) of *container*'s layer."""
        cid = self.buildah("inspect", "--format", "{{.ContainerID}}", container)
        records = json.loads((self.top / "graph/overlay-containers/containers.json").read_text())
        layer = next(r["layer"] for r in records if r["id"] == cid)
        return self.top / "graph/overlay" / layer / "diff"

    def layers(self, image: str) -> list[dict[str, tuple]]:
        """The members of every layer of *image*, committed to a ``dir:`` copy."""
        out = self.top / "out" / image.replace("/", "_")
        self.buildah("push", image, f"dir:{out}")
        manifest = json.loads((out / "manifest.json").read_text())
        return [_members(out / layer["digest"].split(":", 1)[1]) for layer in manifest["layers"]]


def _members(blob: Path) -> dict[str, tuple]:
    found = {}
    with tarfile.open(blob, "r:*") as tar:
        for m in tar:
            data = tar.extractfile(m).read() if m.isreg() else b""  # type: ignore[union-attr]
            found[m.name.rstrip("/")] = (m.type, oct(m.mode & 0o7777), m.uid, m.gid, m.linkname,
                                         hashlib.sha256(data).hexdigest()[:16] if m.isreg() else None)
    return found


def _on_disk(upper: Path) -> dict[str, tuple[str, int, int, str]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, upper)] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid,
                                              f"{os.major(st.st_rdev)}/{os.minor(st.st_rdev)}")
    return out


@dataclass
class Build:
    """What the build steps left: each image's layers (tar members by name), the
    containers' uppers on disk (by path), and what ``ls -ln`` showed inside."""

    layers: dict[str, list[dict[str, tuple]]]
    uppers: dict[str, dict[str, tuple[str, int, int, str]]]
    shown: str
    complaints: list[str]  #: containers/storage's error and warning lines, pyunionfs's own


def _build(user: User, program: str) -> Build:
    """The build steps with *program* as the mount program."""
    top = Path(tempfile.mkdtemp(prefix="pyunionfs-buildah-"))
    os.chmod(top, 0o755)
    b = Builder(user, top, program)
    try:
        res = b.run("buildah", "unshare", "cat", "/proc/self/uid_map", check=False)
        if res.returncode != 0:
            pytest.fail(f"rootless buildah cannot make its user namespace on this machine "
                        f"(user namespaces, newuidmap, /etc/subuid): {res.stderr.strip()}")
        res = b.run("buildah", "unshare", program, "--version", check=False)
        if res.returncode != 0:
            pytest.fail(f"the user cannot run {program} in its user namespace: {res.stderr.strip()}")
        uppers = {}
        c = b.buildah("from", "scratch")
        b.buildah("copy", c, BUSYBOX, "/bin/busybox")
        b.buildah(*RUN, c, "--", "/bin/busybox", "sh", "-ec", BASE_STEP)
        uppers["base"] = _on_disk(b.upper(c))
        b.buildah("commit", "-q", c, "localhost/base")
        b.buildah("rm", c)
        c = b.buildah("from", "localhost/base")
        shown = b.buildah(*RUN, c, "--", "/bin/busybox", "sh", "-ec", TOP_STEP)
        uppers["top"] = _on_disk(b.upper(c))
        b.buildah("commit", "-q", c, "localhost/top")
        # a container with an ID mapping of its own: containers/storage passes uidmapping=/gidmapping=
        c = b.buildah("from", "--userns-uid-map", "0:1000:2000", "--userns-gid-map", "0:1000:2000",
                      "localhost/base")
        b.buildah("copy", "--chown", "321:654", c, BUSYBOX, "/mapped")
        b.buildah("copy", c, "/etc/hostname", "/mapped-root")
        shown += b.buildah(*RUN, c, "--", "/bin/busybox", "sh", "-ec", MAPPED_STEP)
        uppers["mapped"] = _on_disk(b.upper(c))
        b.buildah("commit", "-q", c, "localhost/mapped")
        layers = {image: b.layers(f"localhost/{image}") for image in ("base", "top", "mapped")}
        b.buildah("rm", "--all")
        b.buildah("rmi", "--all", "--force")
        deadline = time.monotonic() + 10
        while _processes_of(user.uid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {pid: _cmdline(pid) for pid in _processes_of(user.uid)}
        assert not left, f"processes left after the containers were removed: {left}"
        return Build(layers, uppers, shown, b.complaints)
    finally:
        b.run("buildah", "rm", "--all", check=False)
        for pid in _processes_of(user.uid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def builds(user: User) -> dict[str, Build]:
    return {"pyunionfs": _build(user, str(PYUNIONFS)), "fuse-overlayfs": _build(user, FUSE_OVERLAYFS)}


def _apply(layers: list[dict[str, tuple]]) -> dict[str, tuple]:
    """The tree an image's layers make, applied in order with the OCI whiteout rules."""
    tree: dict[str, tuple] = {}
    for layer in layers:
        for name in sorted(layer):
            parent, base = os.path.split(name)
            gone = parent if base == ".wh..wh..opq" else os.path.join(parent, base[4:]) if base.startswith(".wh.") \
                else None
            if gone is None:
                tree[name] = layer[name]
            else:
                for old in [k for k in tree if k.startswith(gone + "/") or (k == gone and base != ".wh..wh..opq")]:
                    if old not in layer:
                        del tree[old]
    return tree


#: Where fuse-overlayfs (1.10, with buildah 1.28's containers/storage, rootless) is
#: wrong: it marks the directory made again after ``rm -r /gd`` opaque only with its
#: own ``user.fuseoverlayfs.opaque`` and ``.wh..opq`` files, which containers/storage
#: does not read, so its layer lets the old ``/gd/inner/o`` show again.
ORACLE_WRONG = "gd/"


def test_committed_layers_match_fuse_overlayfs(builds: dict[str, Build]) -> None:
    ours, oracle = builds["pyunionfs"], builds["fuse-overlayfs"]
    for image in ("base", "top", "mapped"):
        assert len(ours.layers[image]) == len(oracle.layers[image]) == (1 if image == "base" else 2), image
        for n, (mine, theirs) in enumerate(zip(ours.layers[image], oracle.layers[image], strict=True)):
            differ = {k: (mine.get(k), theirs.get(k)) for k in mine.keys() | theirs.keys()
                      if mine.get(k) != theirs.get(k) and not k.startswith(ORACLE_WRONG)}
            assert not differ, f"{image} layer {n}: (pyunionfs, fuse-overlayfs) differ: {differ}"
    first, last, mapped = ours.layers["base"][0], ours.layers["top"][1], ours.layers["mapped"][1]
    assert first["x"][2:4] == (123, 456) and first["d/f"][2:4] == (7, 8) and first["gd/inner/o"][2:4] == (2000, 3000)
    assert {first["d/hard"][0], first["x"][0]} == {tarfile.REGTYPE, tarfile.LNKTYPE}  # one is a hard link
    assert first["l"][4] == "x" and first["fifo"][0] == tarfile.FIFOTYPE
    assert last["d/f"][1:4] == (oct(0o600), 9, 10) and last["x"][2:4] == (0, 0)
    assert last["d/sub"][1] == oct(0o4755) and last["gd/n"][2:4] == (65536, 65535)
    assert ".wh.g" in last and "keep/.wh.k" in last and last["new/sub/s"][2:4] == (1000, 1000)
    assert mapped["mapped"][2:4] == (321, 654) and mapped["mapped-root"][2:4] == (0, 0)
    assert mapped["m"][2:4] == (7, 8) and mapped["md"][2:4] == (1999, 1998)
    # shown through uidmapping=/gidmapping= to the container, as stored
    assert "-rw----r--    2 123      456" in ours.shown and "-rw-r-----    1 7        8" in ours.shown
    assert "-rwxr-xr-x    1 321      654" in ours.shown
    assert "-rw-------    1 9        10" in ours.shown  # ls -ln inside the container
    assert ours.complaints == []  # no failed unmount, no option pyunionfs warned about
    # the image: the layers applied, as a runtime unpacks them
    tree = _apply(ours.layers["top"])
    assert sorted(k for k in tree if k.startswith("gd")) == ["gd", "gd/n"]
    assert "g" not in tree and "keep/k" not in tree and tree["keep/k2"][0] == tarfile.REGTYPE
    theirs = _apply(oracle.layers["top"])
    assert {k: v for k, v in tree.items() if not k.startswith(ORACLE_WRONG)} \
        == {k: v for k, v in theirs.items() if not k.startswith(ORACLE_WRONG)}


#: The two names of one file in the first layer.
HARD_LINKS = {"x", "d/hard"}


def test_uppers_store_subordinate_ids_as_fuse_overlayfs(builds: dict[str, Build], user: User) -> None:
    ours, oracle = builds["pyunionfs"], builds["fuse-overlayfs"]
    for name in ("base", "top", "mapped"):
        mine, theirs = ours.uppers[name], oracle.uppers[name]
        # Each writes its own markers (fuse-overlayfs adds .wh. files), and a chown of one of two hard
        # links copies up that name (pyunionfs, the kernel's index=on: the other follows through the
        # index) or the first name it met (fuse-overlayfs): the mounts and layers still agree.
        common = mine.keys() & theirs.keys()
        assert {k: (mine.get(k), theirs.get(k)) for k in mine.keys() ^ theirs.keys()
                if not os.path.basename(k).startswith(".wh.") and k not in HARD_LINKS} == {}, name
        assert {k: mine[k][1:3] for k in common} == {k: theirs[k][1:3] for k in common}, name
    base, top, mapped = ours.uppers["base"], ours.uppers["top"], ours.uppers["mapped"]
    assert base["x"][1:3] == (user.subuid + 122, user.subgid + 455)  # container 123:456
    assert base["bin"][1:3] == (user.uid, user.gid)  # the container's root is the user
    assert top["d/f"][1:3] == (user.subuid + 8, user.subgid + 9)
    assert top["gd/n"][1:3] == (user.subuid + 65535, user.subgid + 65534)
    assert mapped["mapped"][1:3] == (user.subuid + 320, user.subgid + 653)
    assert mapped["mapped-root"][1:3] == (user.uid, user.gid)
    assert mapped["m"][1:3] == (user.subuid + 6, user.subgid + 7)
    assert mapped["md"][1:3] == (user.subuid + 1998, user.subgid + 1997)
