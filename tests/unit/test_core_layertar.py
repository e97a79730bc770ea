"""Image layers in and out: ``commit`` writes an upper as an OCI layer, ``apply`` unpacks one.

Why these tests: a layer is an interchange format.  What ``commit`` writes
must follow the OCI rules member by member (whiteouts, opaque markers,
hard links, PAX xattrs, no overlay-private records) and be byte-identical
for the same upper, or digests are useless.  What ``apply`` reads is
untrusted: every unsafe member kind must be refused before anything is
written.  And the two must agree with the union itself: the layers below,
plus the committed upper, applied one over the other, must give exactly the
tree the union showed (checked against the union core, no FUSE involved;
tests/mount/test_layers_roundtrip.py does it through the kernel).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import stat
import struct
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from pyunionfs import cli
from pyunionfs.fs.inodes import ROOT_INO
from pyunionfs.errors import LayerError
from pyunionfs.image.layerapply import apply_layer
from pyunionfs.image.layertar import commit
from tests.support.treesnap import Entry, Snapshot, diff, snapshot
from tests.unit.conftest import lookup_path, read_file, readdir_all

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: devices, trusted xattrs, ownership")

#: A valid v2 file capability (VFS_CAP_REVISION_2 | effective): cap_net_bind_service permitted.
CAP = struct.pack("<IIIII", 0x02000000 | 1, 1 << 10, 0, 0, 0)
T0 = 1_700_000_000  # whole seconds: a layer keeps mtimes in seconds, as docker does
NON_UTF8 = b"caf\xe9"
LONG = b"l" * 150  # longer than a ustar name field: needs a PAX path record


# --------------------------------------------------------------------------
# Building trees
# --------------------------------------------------------------------------


def put(root: Path, rel: str | bytes, data: bytes = b"", mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> bytes:
    p = os.fsencode(root) + b"/" + os.fsencode(rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
    os.chown(p, *owner)
    os.chmod(p, mode)
    return p


def mkdirs(root: Path, rel: str | bytes, mode: int = 0o755) -> bytes:
    p = os.fsencode(root) + b"/" + os.fsencode(rel)
    os.makedirs(p, exist_ok=True)
    os.chmod(p, mode)
    return p


def whiteout(root: Path, rel: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def freeze_times(root: Path, sec: int = T0) -> None:
    """Whole-second mtimes everywhere, deepest first (making an entry changes its directory's)."""
    paths = [os.fsencode(root)]
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        paths.extend(dirpath + b"/" + n for n in dirnames + filenames)
    for i, p in enumerate(sorted(paths, key=lambda p: p.count(b"/"), reverse=True)):
        os.utime(p, (sec + i % 7, sec + i % 7), follow_symlinks=False)


def build_base(root: Path) -> None:
    """A plain tree with every entry type a layer can hold."""
    put(root, "etc/passwd", b"root:x:0:0\n")
    put(root, "etc/shadow", b"secret\n", 0o640, (0, 42))
    put(root, "bin/su", b"\x7fELF su", 0o4755)
    put(root, "bin/ping", b"\x7fELF ping", 0o755)
    os.setxattr(root / "bin/ping", "security.capability", CAP)
    put(root, "home/user/notes", b"notes\n" * 100, 0o600, (1000, 1000))
    os.setxattr(root / "home/user/notes", "user.comment", b"hello")
    os.setxattr(root / "home/user/notes", "user.binary", bytes(range(256)))
    mkdirs(root, "home/user/deep/er/est")
    put(root, "home/user/deep/er/est/leaf", b"leaf\n")
    put(root, "home/user/deep/er/sibling", b"sib\n")
    os.chown(root / "home/user", 1000, 1000)
    os.setxattr(root / "home/user", "user.dir", b"d")
    mkdirs(root, "tmp", 0o1777)
    mkdirs(root, "srv/shared", 0o2775)
    os.symlink("../etc/passwd", root / "bin/passwd-link")
    os.symlink("/nowhere/at/all", root / "bin/broken")
    os.setxattr(root / "bin/broken", "trusted.onlink", b"sym", follow_symlinks=False)
    os.mkfifo(root / "srv/fifo", 0o620)
    os.mknod(root / "srv/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "srv/disk", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    put(root, "lib/a.so", b"shared object")
    os.link(root / "lib/a.so", root / "lib/b.so")
    os.link(root / "lib/a.so", root / "bin/c.so")
    put(root, "lib/keep1", b"a group that survives", 0o640, (7, 7))
    os.link(root / "lib/keep1", root / "lib/keep2")
    os.mkfifo(root / "srv/pipe", 0o620)
    put(root, "etc/hosts", b"127.0.0.1 localhost\n", 0o644, (1000, 100))
    os.setxattr(root / "etc/hosts", "user.origin", b"base")
    put(root, b"names/" + NON_UTF8, b"latin-1 name")
    put(root, b"names/" + LONG, b"long name")
    put(root, "names/with space\nand newline", b"odd")
    put(root, "opt/app/old/config", b"old config")
    put(root, "opt/app/old/data/blob", b"blob")
    put(root, "opt/keep", b"keep")
    freeze_times(root)


def build_upper(root: Path, ns: str = "trusted") -> None:
    """An upper in the kernel's format over :func:`build_base`, with markers
    of every kind at several depths and the overlay's private records."""
    put(root, "etc/passwd", b"root:x:0:0\nuser:x:1000:1000\n")
    os.setxattr(root / "etc/passwd", f"{ns}.overlay.origin", b"\x00\xfb\x15\x00\x01" + bytes(16))
    whiteout(root, "etc/shadow")  # depth 1
    whiteout(root, "home/user/deep/er/est/leaf")  # depth 4
    os.setxattr(root / "home/user/deep", f"{ns}.overlay.impure", b"y")
    # the whole old app replaced: rm -r, mkdir (opaque), new contents
    mkdirs(root, "opt/app/old")
    os.setxattr(root / "opt/app/old", f"{ns}.overlay.opaque", b"y")
    put(root, "opt/app/old/fresh", b"fresh")
    mkdirs(root, "opt/app/old/newdir")
    # an OCI-format opaque directory and an OCI whiteout in the same upper
    put(root, "home/user/.wh..wh..opq")
    put(root, "home/user/mine", b"mine", owner=(1000, 1000))
    put(root, "bin/.wh.passwd-link")
    # xattr whiteouts (Linux 6.7+) inside an opaque=x directory
    mkdirs(root, "srv")
    os.setxattr(root / "srv", f"{ns}.overlay.opaque", b"x")
    put(root, "srv/fifo")
    os.setxattr(root / "srv/fifo", f"{ns}.overlay.whiteout", b"")
    # new things
    put(root, "bin/tool", b"#!/bin/sh\n", 0o6755, (0, 50))
    os.setxattr(root / "bin/tool", "security.capability", CAP)
    os.setxattr(root / "bin/tool", f"{ns}.overlay.overlay.esc", b"escaped")  # shows as <ns>.overlay.esc
    os.link(root / "bin/tool", root / "bin/tool-again")
    os.symlink("tool", root / "bin/tool-link")
    os.mknod(root / "bin/zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    put(root, "lib/a.so", b"new shared object")  # breaks the lower hard link group
    freeze_times(root, T0 + 100)


# --------------------------------------------------------------------------
# Reading trees
# --------------------------------------------------------------------------


def _kind(mode: int) -> str:
    return {
        stat.S_IFREG: "reg", stat.S_IFDIR: "dir", stat.S_IFLNK: "lnk", stat.S_IFIFO: "fifo",
        stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFSOCK: "sock",
    }[stat.S_IFMT(mode)]


def core_snapshot(fs, mtime: bool = True) -> Snapshot:
    """A :mod:`treesnap` snapshot of the merged tree as the union core shows it."""
    raw: dict[bytes, dict] = {}
    inos: dict[int, list[bytes]] = {}
    todo = [(b".", ROOT_INO)]
    while todo:
        rel, ino = todo.pop()
        for _, name, _, _ in readdir_all(fs, ino):
            if name in (b".", b".."):
                continue
            crel = name if rel == b"." else rel + b"/" + name
            cino, attr = lookup_path(fs, crel)
            kind = _kind(attr.mode)
            info: dict = {"kind": kind, "mode": stat.S_IMODE(attr.mode), "uid": attr.uid, "gid": attr.gid}
            if kind != "dir":
                info["size"] = attr.size
                inos.setdefault(attr.ino, []).append(crel)
                info["_ino"] = attr.ino
            if kind == "reg":
                info["sha256"] = hashlib.sha256(read_file(fs, cino)).hexdigest()
            elif kind == "lnk":
                info["target"] = fs.readlink(cino)
            elif kind in ("chr", "blk"):
                info["rdev"] = attr.rdev
            info["xattrs"] = tuple(sorted((os.fsdecode(n), fs.getxattr(cino, n)) for n in fs.listxattr(cino)))
            if mtime:
                info["mtime_ns"] = attr.mtime_ns
            raw[crel] = info
            if kind == "dir":
                todo.append((crel, cino))
    entries = []
    for rel in sorted(raw):
        info = raw[rel]
        ino = info.pop("_ino", None)
        if ino is not None:
            info["links"] = tuple(sorted(inos[ino]))
        entries.append((rel, Entry(**info)))
    return Snapshot(tuple(entries))


def tree(root: Path, mtime: bool = True) -> Snapshot:
    """The tree at *root* without its root entry (a layer does not carry the root)."""
    return snapshot(root, mtime=mtime).subset(lambda p, e: p != b".")


def members(tar: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(tar, encoding="utf-8", errors="surrogateescape") as tf:
        return tf.getmembers()


def raw_name(info: tarfile.TarInfo) -> bytes:
    return info.name.encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------
# commit: the archive, member by member
# --------------------------------------------------------------------------


@pytest.fixture
def committed(tmp_path: Path) -> tuple[Path, Path, object]:
    upper = tmp_path / "upper"
    build_upper(upper)
    os.mkfifo(upper / "srv/left-alone")
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(os.fsdecode(upper / "sock"))
    s.close()
    res = commit(str(upper), str(tmp_path / "layer.tar"), gzip_too=True)
    return upper, tmp_path / "layer.tar", res


def test_commit_members_follow_oci_rules(committed) -> None:
    upper, tar, res = committed
    ms = members(tar)
    names = [raw_name(m) for m in ms]
    by_name = {raw_name(m): m for m in ms}
    assert len(set(names)) == len(names), "no duplicate entries"
    assert names == [
        b"bin",
        b"bin/.wh.passwd-link",
        b"bin/tool",
        b"bin/tool-again",
        b"bin/tool-link",
        b"bin/zero",
        b"etc",
        b"etc/.wh.shadow",
        b"etc/passwd",
        b"home",
        b"home/user",
        b"home/user/.wh..wh..opq",
        b"home/user/deep",
        b"home/user/deep/er",
        b"home/user/deep/er/est",
        b"home/user/deep/er/est/.wh.leaf",
        b"home/user/mine",
        b"lib",
        b"lib/a.so",
        b"opt",
        b"opt/app",
        b"opt/app/old",
        b"opt/app/old/.wh..wh..opq",
        b"opt/app/old/fresh",
        b"opt/app/old/newdir",
        b"srv",
        b"srv/.wh.fifo",
        b"srv/left-alone",
    ], "parents first, in each directory markers first, then names sorted; no socket"
    assert res.skipped == (b"sock",)
    for m in ms:
        n = raw_name(m)
        assert not n.startswith((b"/", b"./")), n
        assert m.uname == "" and m.gname == "", n
        assert not {"atime", "ctime"} & set(m.pax_headers), n
        assert not any(k.startswith("SCHILY.xattr.") and ".overlay." in k and "esc" not in k for k in m.pax_headers), n
        if n.rsplit(b"/", 1)[-1].startswith(b".wh."):
            assert m.isreg() and m.size == 0, n
    assert by_name[b"bin/tool"].mode == 0o6755 and by_name[b"bin/tool"].gid == 50
    assert by_name[b"bin/tool"].mtime == os.stat(upper / "bin/tool").st_mtime_ns // 10**9
    tool = by_name[b"bin/tool"].pax_headers
    assert tool["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == CAP
    assert tool["SCHILY.xattr.trusted.overlay.esc"] == "escaped"
    assert "SCHILY.xattr.trusted.overlay.origin" not in by_name[b"etc/passwd"].pax_headers
    link = by_name[b"bin/tool-again"]
    assert link.islnk() and link.linkname == "bin/tool" and link.size == 0
    assert by_name[b"bin/tool-link"].issym() and by_name[b"bin/tool-link"].linkname == "tool"
    zero = by_name[b"bin/zero"]
    assert zero.ischr() and (zero.devmajor, zero.devminor) == (1, 5)
    assert by_name[b"srv/left-alone"].isfifo()
    assert by_name[b"home/user/mine"].uid == 1000
    with tarfile.open(tar) as tf:
        assert tf.extractfile("lib/a.so").read() == b"new shared object"  # type: ignore[union-attr]
    # every header is POSIX ustar (the PAX format's base)
    data = tar.read_bytes()
    assert data[257:265] == b"ustar\x0000"


def test_commit_digest_is_stable(committed, tmp_path: Path) -> None:
    upper, tar, res = committed
    blob = tar.read_bytes()
    assert res.diff_id == "sha256:" + hashlib.sha256(blob).hexdigest()
    gz = Path(res.gzip_path).read_bytes()
    assert res.gzip_digest == "sha256:" + hashlib.sha256(gz).hexdigest()
    assert gz[:2] == b"\x1f\x8b" and gz[3] == 0 and gz[4:8] == b"\0\0\0\0", "no file name, mtime 0"
    assert gzip.decompress(gz) == blob
    # reading every file (atime) and touching atimes changes nothing
    for dirpath, _, filenames in os.walk(upper):
        for n in filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                Path(p).read_bytes()
            os.utime(p, ns=(st.st_atime_ns + 12345, st.st_mtime_ns), follow_symlinks=False)
    again = commit(str(upper), str(tmp_path / "again.tar"), gzip_too=True)
    assert again.diff_id == res.diff_id and again.gzip_digest == res.gzip_digest
    assert (tmp_path / "again.tar").read_bytes() == blob


def test_commit_refuses_output_inside_upper_and_redirects(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    build_upper(upper)
    with pytest.raises(LayerError, match="inside the upper"):
        commit(str(upper), str(upper / "etc/layer.tar"))
    os.setxattr(upper / "opt/app", "trusted.overlay.redirect", b"/elsewhere")
    with pytest.raises(LayerError, match="redirect"):
        commit(str(upper), str(tmp_path / "l.tar"))
    assert not (tmp_path / "l.tar").exists() and not list(tmp_path.glob(".l.tar.tmp-*"))


def test_commit_and_apply_through_the_cli(tmp_path: Path, capsys) -> None:
    upper = tmp_path / "upper"
    build_upper(upper)
    assert cli.main(["commit", str(upper), "-o", str(tmp_path / "l.tar"), "--gzip"]) == 0
    out = capsys.readouterr().out.splitlines()
    blob = (tmp_path / "l.tar").read_bytes()
    assert out[0] == f"sha256:{hashlib.sha256(blob).hexdigest()}  {tmp_path / 'l.tar'}"
    assert out[1].startswith("sha256:") and out[1].endswith("l.tar.gz")
    assert cli.main(["apply", str(tmp_path / "l.tar.gz"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out/bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert cli.main(["apply", "--flatten", "--whiteouts=oci", str(tmp_path / "l.tar"), str(tmp_path / "x")]) == 2
    assert "--flatten" in capsys.readouterr().err


# --------------------------------------------------------------------------
# apply: the three modes
# --------------------------------------------------------------------------


def make_tar(path: Path, items: list[tuple[str, bytes | str, dict]], gz: bool = False) -> Path:
    """A layer from (name, type, fields) items; data for regular files in fields["data"]."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, fields in items:
            info = tarfile.TarInfo(name)
            info.type = kind if isinstance(kind, bytes) else kind.encode()
            data = fields.pop("data", None)
            for k, v in fields.items():
                setattr(info, k, v)
            info.mtime = fields.get("mtime", T0)
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


REG, DIR, SYM, LNK, CHR, FIFO = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, \
    tarfile.FIFOTYPE


def _opaque_layer(tmp_path: Path, gz: bool = False) -> Path:
    """Deletes d/old, makes e opaque with the marker *after* its new entries
    (OCI: it still applies only to what was below), replaces dir r."""
    return make_tar(tmp_path / ("l.tar.gz" if gz else "l.tar"), [
        ("d", DIR, {"mode": 0o755}),
        ("d/.wh.old", REG, {}),
        ("e", DIR, {"mode": 0o700}),
        ("e/new", REG, {"data": b"new", "mode": 0o644}),
        ("e/.wh..wh..opq", REG, {}),
        (".wh.r", REG, {}),
        ("r", DIR, {"mode": 0o755}),
        ("r/only", REG, {"data": b"only"}),
        ("f/.wh.implicit-parent", REG, {}),
    ], gz)


def _below(root: Path) -> None:
    put(root, "d/old", b"old")
    put(root, "d/kept", b"kept")
    put(root, "e/lower", b"lower")
    put(root, "r/lower", b"lower")
    put(root, "f/implicit-parent", b"x")


@pytest.mark.parametrize("gz", [False, True])
def test_apply_flatten_deletes_and_leaves_no_marker(tmp_path: Path, gz: bool) -> None:
    target = tmp_path / "flat"
    _below(target)
    apply_layer(str(_opaque_layer(tmp_path, gz)), str(target), mode="flatten")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == [
        "d", "d/kept", "e", "e/new", "f", "r", "r/only",
    ]
    assert os.listxattr(target / "e") == [] and os.listxattr(target / "r") == []
    assert stat.S_IMODE(os.stat(target / "e").st_mode) == 0o700


def test_apply_device_mode_writes_kernel_markers(tmp_path: Path) -> None:
    target = tmp_path / "layer"
    _below(target)  # what DIR had is removed under the marked names
    apply_layer(str(_opaque_layer(tmp_path)), str(target))
    st = os.lstat(target / "d/old")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (target / "d/kept").read_bytes() == b"kept"
    assert os.getxattr(target / "e", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(target / "e")) == ["new"]
    assert os.getxattr(target / "r", "trusted.overlay.opaque") == b"y", ".wh.r beside a new r: r replaces"
    assert sorted(os.listdir(target / "r")) == ["only"]
    assert stat.S_ISCHR(os.lstat(target / "f/implicit-parent").st_mode)
    assert not list(target.rglob(".wh.*"))


def test_apply_device_mode_userxattr_and_escaping(tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "l.tar", [
        ("o", DIR, {"mode": 0o755}),
        ("o/.wh..wh..opq", REG, {}),
        ("x", REG, {"data": b"", "pax_headers": {"SCHILY.xattr.trusted.overlay.opaque": "y",
                                                  "SCHILY.xattr.user.overlay.origin": "o"}}),
    ])
    apply_layer(str(tar), str(tmp_path / "u"), userxattr=True)
    assert os.getxattr(tmp_path / "u/o", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(tmp_path / "u/o")
    # a layer cannot plant overlay records: they are stored escaped (user. only with userxattr)
    assert sorted(os.listxattr(tmp_path / "u/x")) == ["trusted.overlay.opaque", "user.overlay.overlay.origin"]
    apply_layer(str(tar), str(tmp_path / "t"))
    assert sorted(os.listxattr(tmp_path / "t/x")) == ["trusted.overlay.overlay.opaque", "user.overlay.overlay.origin"]
    apply_layer(str(tar), str(tmp_path / "f"), mode="flatten")
    assert sorted(os.listxattr(tmp_path / "f/x")) == ["trusted.overlay.opaque", "user.overlay.origin"]


def test_apply_oci_mode_keeps_wh_files(tmp_path: Path) -> None:
    target = tmp_path / "oci"
    apply_layer(str(_opaque_layer(tmp_path)), str(target), mode="oci")
    assert (target / "d/.wh.old").is_file() and (target / "e/.wh..wh..opq").is_file()
    assert (target / ".wh.r").is_file() and os.listxattr(target / "e") == []


def test_apply_restores_metadata(tmp_path: Path) -> None:
    base = tmp_path / "base"
    build_base(base)
    commit(str(base), str(tmp_path / "base.tar"))
    out = tmp_path / "out"
    apply_layer(str(tmp_path / "base.tar"), str(out))
    assert diff(tree(base), tree(out)) == []
    assert os.getxattr(out / "bin/ping", "security.capability") == CAP
    assert stat.S_IMODE(os.stat(out / "bin/su").st_mode) == 0o4755
    assert os.stat(out / "lib/a.so").st_ino == os.stat(out / "bin/c.so").st_ino == os.stat(out / "lib/b.so").st_ino


def test_apply_never_writes_through_existing_symlinks(tmp_path: Path) -> None:
    """An entry replacing a symlink replaces the link, never what it points at."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"untouched")
    target = tmp_path / "t"
    target.mkdir()
    os.symlink(outside / "victim", target / "victim")
    os.symlink(outside, target / "dirlink")
    os.symlink(outside, target / "later")
    os.symlink(outside, target / "replaced")  # below it, DIR's names no longer count
    tar = make_tar(tmp_path / "l.tar", [
        ("victim", REG, {"data": b"evil"}),
        ("dirlink", DIR, {"mode": 0o755}),
        ("dirlink/x", REG, {"data": b"inside"}),
        ("later/y", REG, {"data": b"before its directory"}),  # the directory member comes after
        ("later", DIR, {"mode": 0o711}),
        ("later/sym", SYM, {"linkname": "../victim"}),
        ("later/sym-again", LNK, {"linkname": "later/sym"}),  # a hard link to a symlink: the link, not its target
        ("replaced", DIR, {"mode": 0o755}),
        ("replaced/victim/deeper", REG, {"data": b"new"}),  # 'victim' exists in outside/, not in replaced/
    ])
    apply_layer(str(tar), str(target), mode="flatten")
    assert sorted(os.listdir(outside)) == ["victim"] and (outside / "victim").read_bytes() == b"untouched"
    assert (target / "victim").read_bytes() == b"evil" and not (target / "victim").is_symlink()
    assert (target / "dirlink/x").read_bytes() == b"inside" and not (target / "dirlink").is_symlink()
    assert (target / "later/y").read_bytes() == b"before its directory"
    assert stat.S_IMODE(os.lstat(target / "later").st_mode) == 0o711
    assert os.lstat(target / "later/sym").st_ino == os.lstat(target / "later/sym-again").st_ino
    assert (target / "later/sym-again").is_symlink()
    assert (target / "replaced/victim/deeper").read_bytes() == b"new"


# --------------------------------------------------------------------------
# apply: refusals, before anything is written
# --------------------------------------------------------------------------


#: A harmless member put first, so that a refusal after it shows whether anything was written
#: (make_tar pops "data": use copies).
OK = ("ok", REG, {"data": b"ok"})


def CAP_TEXT(value: bytes) -> str:  # noqa: N802 - reads as a constant in the table
    """An xattr value as a PAX record carries it (bytes as surrogate-escaped text)."""
    return value.decode("utf-8", "surrogateescape")


UNSAFE: dict[str, tuple[list[tuple[str, bytes | str, dict]], str]] = {
    "absolute": ([("/etc/evil", REG, {"data": b"x"})], "absolute name"),
    "dotdot": ([("a/../../evil", REG, {"data": b"x"})], "'..' component"),
    "link-absolute": ([("x", LNK, {"linkname": "/etc/passwd"})], "absolute hard link target"),
    "link-dotdot": ([("x", LNK, {"linkname": "../outside"})], "hard link target has a '..'"),
    "link-later": ([("x", LNK, {"linkname": "y"}), ("y", REG, {"data": b"y"})], "not an earlier member"),
    "link-missing": ([("x", LNK, {"linkname": "keep"})], "not an earlier member"),
    "link-dir": ([("d", DIR, {}), ("x", LNK, {"linkname": "d"})], "hard link to directory"),
    "symlink-parent": ([("a", SYM, {"linkname": "/tmp"}), ("a/evil", REG, {"data": b"x"})], "is a symlink in the arch"),
    "symlink-parent-later": ([("a/evil", REG, {"data": b"x"}), ("a", SYM, {"linkname": "/"})], "is a symlink in the a"),
    "symlink-parent-in-dir": ([("up/evil", REG, {"data": b"x"})], "is a symlink in the target"),
    "file-parent": ([("f", REG, {"data": b""}), ("f/x", REG, {"data": b""})], "not a directory in the archive"),
    "file-parent-in-dir": ([("keep/x", REG, {"data": b""})], "not a directory in the target"),
    "duplicate": ([("a", REG, {"data": b"1"}), ("a", REG, {"data": b"2"})], "duplicate entry"),
    "duplicate-dot-slash": ([("d", DIR, {}), ("./d/", DIR, {})], "duplicate entry"),
    "unsupported-type": ([("v", b"V", {})], "unsupported member type"),
    "whiteout-device": ([("w", CHR, {"devmajor": 0, "devminor": 0})], "0/0"),
    "marker-self": ([("d/.wh..", REG, {})], "reserved whiteout name"),
    "marker-reserved": ([(".wh..wh.plnk", REG, {})], "reserved whiteout name"),
    "whiteout-dir": ([(".wh.x", DIR, {})], "whiteout must be a regular file"),
    "root-not-dir": ([("./", REG, {"data": b""})], "root must be a directory"),
    # owners, modes, times, devices, targets: what chown, utimensat, mknod, symlink would refuse half way
    "uid-pax-2^40": ([OK, ("b", REG, {"data": b"b", "pax_headers": {"uid": str(2**40)}})], "uid 1099511627776 is not"),
    "uid-(uid_t)-1": ([OK, ("b", REG, {"data": b"b", "pax_headers": {"uid": str(2**32 - 1)}})], "not a valid owner"),
    "gid-(gid_t)-1": ([OK, ("b", DIR, {"pax_headers": {"gid": str(2**32 - 1)}})], "gid 4294967295 is not a valid"),
    "uid-pax-not-decimal": ([OK, ("b", REG, {"data": b"b", "pax_headers": {"uid": "0x10"}})], "not a decimal number"),
    "size-pax-not-decimal": ([OK, ("b", REG, {"data": b"", "pax_headers": {"size": "1e3"}})], "not a decimal number"),
    "mtime-pax-nan": ([OK, ("b", REG, {"data": b"b", "pax_headers": {"mtime": "nan"}})], "not a decimal time"),
    "mtime-pax-huge": ([OK, ("b", REG, {"data": b"b", "pax_headers": {"mtime": "9" * 30}})], "not fit in a time_t"),
    "device-major": ([OK, ("c", CHR, {"devmajor": 4096, "devminor": 1})], "device number 4096:1 is out of range"),
    "device-minor": ([OK, ("c", b"4", {"devmajor": 8, "devminor": 1 << 20})], "is out of range"),
    "symlink-target-long": ([OK, ("s", SYM, {"linkname": "t" * 4096})], "symlink target longer than 4095"),
    "name-nul": ([OK, ("n", REG, {"data": b"", "pax_headers": {"path": "a\0b"}})], "NUL byte"),
    # xattrs: what setxattr would refuse half way
    "xattr-70000": ([OK, ("b", REG, {"data": b"b", "pax_headers": {"SCHILY.xattr.user.big": "x" * 70_000}})],
                    "value of 70000 bytes, more than 65536"),
    "xattr-namespace": ([OK, ("b", REG, {"data": b"", "pax_headers": {"SCHILY.xattr.os2.x": "1"}})],
                        "is not NAMESPACE.NAME"),
    "xattr-namespace-only": ([OK, ("b", REG, {"data": b"", "pax_headers": {"SCHILY.xattr.user.": "1"}})],
                             "is not NAMESPACE.NAME"),
    "xattr-name-long": ([OK, ("b", REG, {"data": b"", "pax_headers": {"SCHILY.xattr.user." + "n" * 251: "1"}})],
                        "longer than 255 bytes"),
    "xattr-names-total": ([OK, ("b", REG, {"data": b"", "pax_headers": {
        f"SCHILY.xattr.user.{i:04}" + "n" * 240: "" for i in range(270)}})], "more than 65536 (listxattr"),
    "xattr-user-on-symlink": ([OK, ("s", SYM, {"linkname": "t", "pax_headers": {"SCHILY.xattr.user.a": "1"}})],
                              "only on regular files and directories"),
    "acl-default-on-file": ([OK, ("b", REG, {"data": b"", "pax_headers": {
        "SCHILY.xattr.system.posix_acl_default": CAP_TEXT(struct.pack("<I", 2))}})], "default ACL belongs to a dir"),
    "acl-malformed": ([OK, ("d", DIR, {"pax_headers": {  # tried by the kernel: a header and half an entry
        "SCHILY.xattr.system.posix_acl_default": CAP_TEXT(struct.pack("<IHH", 2, 1, 7))}})], "Invalid argument"),
    "capability-3-bytes": ([OK, ("b", REG, {"data": b"", "pax_headers": {
        "SCHILY.xattr.security.capability": "\x01\x02\x03"}})], "malformed file capability (3 bytes)"),
    "capability-v1": ([OK, ("b", REG, {"data": b"", "pax_headers": {
        "SCHILY.xattr.security.capability": CAP_TEXT(struct.pack("<III", 0x01000000, 1, 0))}})],
                      "unknown or obsolete revision 1"),
    "capability-v2-size": ([OK, ("b", REG, {"data": b"", "pax_headers": {
        "SCHILY.xattr.security.capability": CAP_TEXT(CAP + bytes(4))}})], "revision 2 is 20 bytes, not 24"),
    "capability-v3-rootid": ([OK, ("b", REG, {"data": b"", "pax_headers": {
        "SCHILY.xattr.security.capability": CAP_TEXT(struct.pack("<IIIIII", 0x03000000, 1, 0, 0, 0, 2**32 - 1))}})],
                             "root uid 4294967295"),
    "capability-flags": ([OK, ("b", REG, {"data": b"", "pax_headers": {
        "SCHILY.xattr.security.capability": CAP_TEXT(struct.pack("<IIIII", 0x02000004, 1, 0, 0, 0))}})],
                         "unknown flags 0x4"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_apply_refuses_unsafe_members(tmp_path: Path, case: str, capsys) -> None:
    items, message = UNSAFE[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    put(target, "keep", b"keep")
    os.symlink(outside, target / "up")
    tar = make_tar(tmp_path / "bad.tar", [(n, k, dict(f)) for n, k, f in items] + [("zz-after", REG, {"data": b"z"})])
    before = snapshot(tmp_path, mtime=True)
    for mode in ("device", "oci", "flatten"):
        if mode == "oci" and case.startswith(("marker", "whiteout-dir")) and "reserved" not in message:
            continue  # in oci mode .wh. names are ordinary names
        with pytest.raises(LayerError) as info:
            apply_layer(str(tar), str(target), mode=mode)
        assert message in str(info.value) and "\n" not in str(info.value), (mode, str(info.value))
    assert diff(before, snapshot(tmp_path, mtime=True)) == [], "nothing written"
    if not case.endswith("-in-dir"):  # (those are unsafe only over what DIR holds)
        with pytest.raises(LayerError):
            apply_layer(str(tar), str(tmp_path / "fresh"))
        assert not (tmp_path / "fresh").exists(), "a refused layer does not even create DIR"
    assert cli.main(["apply", str(tar), str(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyunionfs: ") and err.count("\n") == 1 and message in err


def test_apply_refuses_other_compressions_and_garbage(tmp_path: Path) -> None:
    (tmp_path / "z.tar.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(100))
    with pytest.raises(LayerError, match="zstd"):
        apply_layer(str(tmp_path / "z.tar.zst"), str(tmp_path / "out"))
    (tmp_path / "junk").write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(LayerError, match="not a readable tar"):
        apply_layer(str(tmp_path / "junk"), str(tmp_path / "out"))
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(b"\0" * 100)[:-6])
    with pytest.raises(LayerError):
        apply_layer(str(tmp_path / "trunc.gz"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_apply_refuses_what_the_target_filesystem_cannot_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits of the filesystem, not of the format, found before the first write too: ext4
    keeps all of a file's xattrs in one block, and the data must fit in the free space."""
    target = tmp_path / "target"
    put(target, "keep", b"keep")
    many = make_tar(tmp_path / "many.tar", [("ok", REG, {"data": b"ok"}), ("b", REG, {"data": b"", "pax_headers": {
        f"SCHILY.xattr.user.x{i}": "v" * 3000 for i in range(3)}})])
    big = make_tar(tmp_path / "big.tar", [("ok", REG, {"data": b"ok"}), ("b", REG, {"data": bytes(100_000)})])
    before = snapshot(tmp_path, mtime=True)
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    if fs.startswith("ext"):
        for where in (target, tmp_path / "new"):
            with pytest.raises(LayerError, match="member 'b': xattr user.x[0-9]: No space left on device"):
                apply_layer(str(many), str(where))
    real = os.statvfs(tmp_path)
    small = os.statvfs_result((real.f_bsize, 4096, real.f_blocks, 10, 10, *tuple(real)[5:]))
    monkeypatch.setattr(os, "statvfs", lambda path: small)
    for where in (target, tmp_path / "new"):
        with pytest.raises(LayerError, match="needs at least 100002 bytes in 2 entries, 40960 bytes free"):
            apply_layer(str(big), str(where))
    monkeypatch.undo()
    assert diff(before, snapshot(tmp_path, mtime=True)) == []


def test_apply_into_a_new_dir_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error while writing (no check can foresee one) leaves no DIR and no temporary."""
    tar = make_tar(tmp_path / "l.tar", [("d", DIR, {}), ("d/a", REG, {"data": b"a"}), ("b", REG, {"data": b"b"})])
    real, calls = os.utime, []

    def failing(*args: object, **kwargs: object) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "utime", failing)
    with pytest.raises(LayerError, match="Input/output error"):
        apply_layer(str(tar), str(tmp_path / "new"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["l.tar"]
    assert apply_layer(str(tar), str(tmp_path / "new")) == 3
    assert sorted(os.listdir(tmp_path)) == ["l.tar", "new"] and (tmp_path / "new/d/a").read_bytes() == b"a"


# --------------------------------------------------------------------------
# Round trip: layers + upper through the union == the layers applied one over the other
# --------------------------------------------------------------------------


def build_middle(root: Path) -> None:
    """L1, an upper-format layer over the base: markers of both kinds, a changed hard link."""
    whiteout(root, "etc/passwd")
    put(root, "etc/motd", b"welcome\n")
    mkdirs(root, "home/user/deep")
    os.setxattr(root / "home/user/deep", "trusted.overlay.opaque", b"y")
    put(root, "home/user/deep/replacement", b"r")
    put(root, "lib/b.so", b"b replaced")  # a.so and c.so keep their link
    mkdirs(root, "var/log", 0o750)
    put(root, "var/log/syslog", b"log\n", 0o640, (0, 4))
    os.chown(root / "home", 0, 0)
    freeze_times(root, T0 + 50)


@pytest.mark.parametrize("ns", ["trusted", "user"])
def test_round_trip_equals_the_merged_tree(tmp_path: Path, make_fs: Callable, ns: str) -> None:
    src0, src1, upper = tmp_path / "src0", tmp_path / "src1", tmp_path / "upper"
    build_base(src0)
    build_middle(src1)
    build_upper(upper, ns)
    layers = []
    for name, src in (("l0", src0), ("l1", src1), ("up", upper)):
        layers.append(tmp_path / f"{name}.tar")
        commit(str(src), str(layers[-1]))
    # the layers below as lowers in the kernel's format, made by apply
    lowers = []
    for tar in layers[:2]:
        lowers.append(tmp_path / ("dev-" + tar.stem))
        apply_layer(str(tar), str(lowers[-1]))
    merged = core_snapshot(make_fs(list(reversed(lowers)), upper, readonly=True))
    gone = ["etc/shadow", "home/user/deep/er/est/leaf", "home/user/notes", "opt/app/old/config", "srv/fifo",
            "bin/passwd-link"]
    assert not [p for p in gone if p in merged], "every kind of marker hides"
    assert "etc/motd" in merged and "bin/tool" in merged and "srv/null" in merged and "srv/pipe" in merged
    assert merged["lib/keep1"].links == (b"lib/keep1", b"lib/keep2")
    assert merged["etc/hosts"].xattrs == (("user.origin", b"base"),)
    assert merged["lib/a.so"].links == (b"lib/a.so",) and merged["bin/c.so"].links == (b"bin/c.so",)
    assert merged["bin/tool"].links == (b"bin/tool", b"bin/tool-again")

    flat = tmp_path / "flat"
    for tar in layers:
        apply_layer(str(tar), str(flat), mode="flatten")
    assert diff(merged, tree(flat), limit=None) == []

    # the committed upper stacked as one more lower (device markers), and all three as OCI layers
    stacked = tmp_path / "dev-up"
    apply_layer(str(layers[2]), str(stacked))
    assert diff(merged, core_snapshot(make_fs([stacked, *reversed(lowers)])), limit=None) == []
    oci = []
    for tar in layers:
        oci.append(tmp_path / ("oci-" + tar.stem))
        apply_layer(str(tar), str(oci[-1]), mode="oci")
    assert diff(merged, core_snapshot(make_fs(list(reversed(oci))))) == []
