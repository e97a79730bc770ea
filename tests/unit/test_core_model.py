"""Property test: the core's merged tree equals a tiny reference model of overlayfs.

Random stacks of up to three layers over a small shared name pool (so that
names collide), with files, symlinks, directories (opaque by trusted xattr,
user xattr or OCI marker), kernel whiteouts, xattr whiteouts and OCI
whiteouts.  The model below is the overlayfs lookup rule written as plainly
as possible; the core is walked with lookup/readdir/open/readlink only.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyunionfs.config import MountConfig
from pyunionfs.fs.inodes import ROOT_INO
from pyunionfs.fs.union import UnionFS

NAMES = ["a", "b", "c"]

# Nodes: ("f", bytes) file, ("l", str) symlink, ("w",) device whiteout,
# ("x",) xattr whiteout, ("o",) OCI .wh. whiteout, ("d", {name: node}, opacity)
# where opacity is None, "trusted", "user" or "oci".
_leaf = st.one_of(
    st.tuples(st.just("f"), st.binary(max_size=4)),
    st.tuples(st.just("l"), st.sampled_from(["/etc", "a", "../b"])),
    st.just(("w",)),
    st.just(("x",)),
    st.just(("o",)),
)


def _dir(children):
    return st.tuples(
        st.just("d"),
        st.dictionaries(st.sampled_from(NAMES), children, max_size=3),
        st.sampled_from([None, None, None, None, "trusted", "user", "oci"]),
    )


_tree = st.recursive(_leaf, _dir, max_leaves=8)
_layer = st.dictionaries(st.sampled_from(NAMES), _tree, max_size=3)
_stack = st.lists(_layer, min_size=1, max_size=3)


def _effective_opacity(children: dict, opacity: str | None) -> str | None:
    """One opaque xattr cannot say both x and y: such a dir is made opaque the OCI way."""
    if opacity in ("trusted", "user") and any(node[0] == "x" for node in children.values()):
        return "oci"
    return opacity


def _write_dir(path: str, children: dict, opacity: str | None) -> None:
    has_x = any(node[0] == "x" for node in children.values())
    opacity = _effective_opacity(children, opacity)
    for name, node in children.items():
        p = os.path.join(path, name)
        kind = node[0]
        if kind == "f":
            with open(p, "wb") as f:
                f.write(node[1])
        elif kind == "l":
            os.symlink(node[1], p)
        elif kind == "w":
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        elif kind == "x":
            open(p, "wb").close()
            os.setxattr(p, b"trusted.overlay.whiteout", b"")
        elif kind == "o":
            open(os.path.join(path, ".wh." + name), "wb").close()
        else:
            os.mkdir(p)
            _write_dir(p, node[1], node[2])
    if has_x:
        os.setxattr(path, b"trusted.overlay.opaque", b"x")
    if opacity in ("trusted", "user"):
        os.setxattr(path, f"{opacity}.overlay.opaque".encode(), b"y")
    elif opacity == "oci":
        open(os.path.join(path, ".wh..wh..opq"), "wb").close()


def as_seen(children: dict, oci: bool, userxattr: bool) -> dict:
    """A layer tree with the markers this mount ignores turned into what they are on disk."""
    out = {}
    for name, node in children.items():
        kind = node[0]
        if kind == "o" and not oci:
            out[".wh." + name] = ("f", b"")
        elif kind == "x" and userxattr:  # written with trusted.* xattrs
            out[name] = ("f", b"")
        elif kind == "d":
            opacity = _effective_opacity(node[1], node[2])
            sub = as_seen(node[1], oci, userxattr)
            if opacity == "trusted" and userxattr:
                opacity = None
            elif opacity == "oci" and not oci:
                opacity = None
                sub[".wh..wh..opq"] = ("f", b"")
            out[name] = ("d", sub, opacity)
        else:
            out[name] = node
    return out


def model(dirs: list[dict]) -> dict:
    """overlayfs: the merged view of directories (children dicts), topmost first."""
    out = {}
    for name in sorted(set().union(*dirs)):
        merged: list[tuple] = []
        for children in dirs:
            node = children.get(name)
            if node is None:
                continue
            if node[0] in ("w", "x", "o"):
                break
            if node[0] != "d":
                if not merged:
                    out[name] = node
                break
            merged.append(node)
            if node[2] is not None:
                break
        if merged:
            out[name] = ("d", model([n[1] for n in merged]))
    return out


def walk(fs: UnionFS, ino: int) -> dict:
    out = {}
    fh = fs.opendir(ino)
    try:
        entries = list(fs.readdir(fh, 0))
    finally:
        fs.releasedir(fh)
    names = [e[1] for e in entries]
    assert names[:2] == [b".", b".."]
    assert len(names) == len(set(names))
    for _, name, _, attr in entries[2:]:
        node, lattr = fs.lookup(ino, name)
        assert lattr == attr
        key = os.fsdecode(name)
        if stat.S_ISDIR(attr.mode):
            out[key] = ("d", walk(fs, node.ino))
        elif stat.S_ISLNK(attr.mode):
            out[key] = ("l", os.fsdecode(fs.readlink(node.ino)))
        else:
            assert stat.S_ISREG(attr.mode), (key, oct(attr.mode))
            fh = fs.open(node.ino, os.O_RDONLY)
            try:
                out[key] = ("f", fs.read(fh, 0, 100))
            finally:
                fs.release(fh)
    return out


def normalise(view: dict) -> dict:
    return {k: ("d", normalise(v[1])) if v[0] == "d" else v for k, v in view.items()}


def absent_names(view: dict, children_per_layer: list[dict], prefix: str = "") -> list[str]:
    """Names some layer has that the view does not (to check lookup gives ENOENT)."""
    out = []
    for name in NAMES:
        if name not in view and any(name in c for c in children_per_layer):
            out.append(prefix + name)
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_stack, st.booleans(), st.booleans())
def test_core_matches_overlay_model(layers, oci, userxattr):
    tmp = tempfile.mkdtemp(prefix="pyunionfs-model-")
    try:
        paths = []
        for i, children in enumerate(layers):
            p = os.path.join(tmp, f"l{i}")
            os.mkdir(p)
            _write_dir(p, children, None)
            paths.append(os.fsencode(p))
        cfg = MountConfig(
            lowers=tuple(paths),
            upper=None,
            mountpoint=b"/unused",
            readonly=True,
            oci_whiteouts=oci,
            userxattr=userxattr,
        )
        fs = UnionFS(cfg)
        try:
            expected = normalise(model([as_seen(c, oci, userxattr) for c in layers]))
            assert walk(fs, ROOT_INO) == expected
            for name in absent_names(expected, list(layers)):
                try:
                    fs.lookup(ROOT_INO, name.encode())
                except FileNotFoundError:
                    pass
                else:
                    raise AssertionError(f"{name} is hidden but lookup found it")
        finally:
            fs.close()
    finally:
        shutil.rmtree(tmp)
