"""Markers: the on-disk whiteout/opaque formats and the xattr name mapping.

Each format is recognised through the one interface (:class:`Markers` over a
real :class:`LayerStack`), and no other module of the package tests a 0/0
device, an ``overlay.*`` marker xattr or a ``.wh.`` name itself.
"""

from __future__ import annotations

import ast
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pyunionfs
from pyunionfs.fs.layers import LayerStack
from pyunionfs.fs.markers import OCI_OPAQUE, OCI_PREFIX, Markers
from tests.unit.conftest import mkfile, mkwhiteout, mkxwhiteout, set_opaque


def test_device_whiteout_shape(tmp_path):
    os.mknod(tmp_path / "w", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(tmp_path / "blk0", stat.S_IFBLK | 0o600, os.makedev(0, 0))
    (tmp_path / "f").write_bytes(b"")
    assert Markers.is_device_whiteout(os.lstat(tmp_path / "w"))
    assert not Markers.is_device_whiteout(os.lstat(tmp_path / "null"))
    assert not Markers.is_device_whiteout(os.lstat(tmp_path / "blk0"))
    assert not Markers.is_device_whiteout(os.lstat(tmp_path / "f"))


def test_oci_names():
    m = Markers()
    assert OCI_PREFIX == b".wh." and OCI_OPAQUE == b".wh..wh..opq"
    assert m.oci_whiteout_name(b"foo") == b".wh.foo"
    assert m.oci_whiteout_name(b"x" * 251) == b".wh." + b"x" * 251
    assert m.oci_whiteout_name(b"x" * 252) is None
    assert m.is_oci_marker(b".wh.foo")
    assert m.is_oci_marker(OCI_OPAQUE)
    assert not m.is_oci_marker(b"wh.foo")
    assert not m.is_oci_marker(b"a.wh.b")
    off = Markers(oci=False)
    assert off.oci_whiteout_name(b"foo") is None
    assert not off.is_oci_marker(b".wh.foo")


@pytest.mark.parametrize(
    ("stored", "visible"),
    [
        (b"user.x", b"user.x"),
        (b"security.selinux", b"security.selinux"),
        (b"trusted.other", b"trusted.other"),
        (b"trusted.overlayx", b"trusted.overlayx"),
        (b"trusted.overlay.opaque", None),
        (b"trusted.overlay.whiteout", None),
        (b"user.overlay.origin", None),
        (b"trusted.overlay.overlay.foo", b"trusted.overlay.foo"),
        (b"user.overlay.overlay.bar", b"user.overlay.bar"),
        (b"trusted.overlay.overlay.overlay.n", b"trusted.overlay.overlay.n"),
    ],
)
def test_visible_xattr(stored, visible):
    assert Markers().visible_xattr(stored) == visible


def test_visible_xattr_userxattr_mode():
    u = Markers(userxattr=True)
    assert u.visible_xattr(b"user.overlay.opaque") is None
    assert u.visible_xattr(b"user.overlay.overlay.q") == b"user.overlay.q"
    assert u.write_prefix == b"user.overlay."
    assert Markers().write_prefix == b"trusted.overlay."


_xname = st.builds(
    lambda pre, rest: pre + rest,
    st.sampled_from([b"user.", b"trusted.", b"trusted.overlay.", b"user.overlay.", b"security.",
                     b"trusted.overlay.overlay.", b"user.overlay.overlay."]),
    st.binary(min_size=0, max_size=12).filter(lambda b: b"\0" not in b),
)


@given(_xname, st.booleans())
def test_xattr_name_mapping_roundtrips(stored, userxattr):
    m = Markers(userxattr=userxattr)
    visible = m.visible_xattr(stored)
    if visible is not None:
        assert m.stored_xattr(visible) == stored
        assert m.visible_xattr(m.stored_xattr(visible)) == visible
    else:
        # A private name: asking for it by name through the mount reaches something else.
        assert m.stored_xattr(stored) != stored


# -- every format through the interface ---------------------------------


@pytest.fixture
def view(tmp_path: Path) -> Iterator[tuple[Path, LayerStack]]:
    """One read-only layer at tmp_path/layer, as the resolver reads layers."""
    root = tmp_path / "layer"
    root.mkdir()
    stack = LayerStack((os.fsencode(root),), writable_top=False)
    try:
        yield root, stack
    finally:
        stack.close()


def _whiteout(m: Markers, stack: LayerStack, rel: bytes, in_xdir: bool = False) -> bool:
    parent, _, name = rel.rpartition(b"/")
    st = stack.lstat(0, parent, name)
    assert st is not None, rel
    return m.is_whiteout(st, in_xdir, stack, 0, parent, name)


def test_device_whiteout_through_the_interface(view):
    root, stack = view
    mkwhiteout(root / "w")
    os.mknod(root / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(root / "blk0", stat.S_IFBLK | 0o600, os.makedev(0, 0))
    mkfile(root / "f")
    m = Markers()
    for in_xdir in (False, True):
        assert _whiteout(m, stack, b"w", in_xdir)
        assert not _whiteout(m, stack, b"null", in_xdir)
        assert not _whiteout(m, stack, b"blk0", in_xdir)
        assert not _whiteout(m, stack, b"f", in_xdir)
    assert _whiteout(Markers(userxattr=True, oci=False), stack, b"w")
    assert Markers.is_whiteout_node(stat.S_IFCHR | 0o644, 0)
    assert not Markers.is_whiteout_node(stat.S_IFCHR, os.makedev(1, 3))
    assert not Markers.is_whiteout_node(stat.S_IFBLK, 0)
    assert not Markers.is_whiteout_node(stat.S_IFREG, 0)


@pytest.mark.parametrize("ns", ["trusted", "user"])
def test_xattr_whiteout_only_in_an_x_directory(view, ns):
    root, stack = view
    mkxwhiteout(root / "x" / "gone", ns=ns)
    mkfile(root / "x" / "kept")
    full = mkfile(root / "x" / "full", b"data")
    os.setxattr(full, f"{ns}.overlay.whiteout".encode(), b"")
    m = Markers()
    assert _whiteout(m, stack, b"x/gone", in_xdir=True)
    assert not _whiteout(m, stack, b"x/gone", in_xdir=False), "only inside an overlay.opaque=x directory"
    assert not _whiteout(m, stack, b"x/kept", in_xdir=True)
    assert not _whiteout(m, stack, b"x/full", in_xdir=True), "an xattr whiteout is empty"
    assert m.opaque(stack, 0, b"x") == b"x"
    assert _whiteout(Markers(userxattr=True), stack, b"x/gone", in_xdir=True) == (ns == "user")


@pytest.mark.parametrize("ns", ["trusted", "user"])
def test_opaque_values(view, ns):
    root, stack = view
    set_opaque(root / "y", b"y", ns)
    set_opaque(root / "x", b"x", ns)
    set_opaque(root / "n", b"n", ns)
    (root / "plain").mkdir()
    os.setxattr(root / "plain", b"user.other", b"y")
    m = Markers()
    assert m.opaque(stack, 0, b"y") == b"y"
    assert m.opaque(stack, 0, b"x") == b"x"
    assert m.opaque(stack, 0, b"n") == b"n"
    assert m.opaque(stack, 0, b"plain") is None
    assert m.opaque(stack, 0, b"") is None
    names = stack.listxattr(0, b"y")
    assert m.opaque(stack, 0, b"y", names) == b"y"
    assert m.opaque(stack, 0, b"y", []) is None, "the names given are the ones read"
    assert Markers(userxattr=True).opaque(stack, 0, b"y") == (b"y" if ns == "user" else None)


def test_set_opaque_is_read_back(view, tmp_path):
    root, stack = view
    (root / "d").mkdir()
    for m, ns in ((Markers(), b"trusted"), (Markers(trusted_ok=False), b"user"), (Markers(userxattr=True), b"user")):
        os.makedirs(root / "d", exist_ok=True)
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        try:
            path = f"/proc/self/fd/{fd}/d".encode()
            assert not m.is_set_opaque(path)
            m.set_opaque(path)
            assert m.is_set_opaque(path)
            assert os.getxattr(root / "d", ns + b".overlay.opaque") == b"y"
            assert m.opaque(stack, 0, b"d") == b"y"
        finally:
            os.close(fd)
        os.rmdir(root / "d")


def test_make_whiteout_is_read_back(view):
    root, stack = view
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        Markers.make_whiteout(fd, b"w")
        with pytest.raises(FileExistsError):
            Markers.make_whiteout(fd, b"w")
    finally:
        os.close(fd)
    assert _whiteout(Markers(), stack, b"w")
    assert Markers.is_device_whiteout(os.lstat(root / "w"))


def test_oci_whiteout_and_opacity(view):
    root, stack = view
    mkfile(root / ".wh.gone")
    (root / "d").mkdir()
    mkfile(root / ".wh.d")
    mkfile(root / "o" / OCI_OPAQUE.decode())
    (root / "plain").mkdir()
    m = Markers()
    assert m.oci_whiteout(stack, 0, b"", b"gone")
    assert not m.oci_whiteout(stack, 0, b"", b"other")
    assert m.oci_opaque(stack, 0, b"", b"d"), ".wh.NAME beside a directory NAME"
    assert m.oci_opaque(stack, 0, b"", b"o"), ".wh..wh..opq inside"
    assert m.oci_opaque_inside(stack, 0, b"o") and not m.oci_opaque_inside(stack, 0, b"d")
    assert not m.oci_opaque(stack, 0, b"", b"plain")
    off = Markers(oci=False)
    assert not off.oci_whiteout(stack, 0, b"", b"gone")
    assert not off.oci_opaque(stack, 0, b"", b"d")
    assert not off.oci_opaque(stack, 0, b"", b"o")
    assert not off.oci_opaque_inside(stack, 0, b"o")
    assert not m.oci_whiteout(stack, 0, b"", b"x" * 252), "no .wh. form for a name this long"


def test_record_names():
    assert Markers().record_names(b"origin") == (b"trusted.overlay.origin", b"user.overlay.origin")
    assert Markers(userxattr=True).nlink_names == (b"user.overlay.nlink",)
    assert Markers().whiteout_names == (b"trusted.overlay.whiteout", b"user.overlay.whiteout")
    assert Markers(trusted_ok=False).opaque_xattr == b"user.overlay.opaque"


# -- nobody else knows the formats ------------------------------------------

_PACKAGE = Path(pyunionfs.__file__).parent
#: Bytes that only a marker check (or a marker name) contains.
_MARKER_BYTES = (b"overlay.", b"opaque", b"whiteout", OCI_PREFIX)
#: Markers' own tables, read only through its methods elsewhere.
_PRIVATE_ATTRS = {"prefixes", "opaque_names", "whiteout_names", "write_prefix", "opaque_xattr"}
#: Values of ``overlay.opaque``: compared to :data:`OPAQUE` / :data:`XWHITEOUTS` elsewhere.
_OPAQUE_VALUES = (b"y", b"x")
#: A 0/0 device is a whiteout: its numbers are compared to 0 only in markers.py.
_DEVICE_NUMBERS = {"st_rdev", "devmajor", "devminor"}


def _format_knowledge(tree: ast.AST) -> list[str]:
    """What in *tree* tests or spells a marker format itself."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in {"S_ISCHR"} | _PRIVATE_ATTRS:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Name) and node.id == "S_ISCHR":
            found.append(f"line {node.lineno}: S_ISCHR")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "makedev":
            if all(isinstance(a, ast.Constant) and a.value == 0 for a in node.args):
                found.append(f"line {node.lineno}: makedev(0, 0)")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr in _DEVICE_NUMBERS for s in sides) and any(
                isinstance(s, ast.Constant) and s.value == 0 for s in sides
            ):
                found.append(f"line {node.lineno}: a device number compared to 0")
            if any(isinstance(s, ast.Constant) and s.value in _OPAQUE_VALUES for s in sides):
                found.append(f"line {node.lineno}: an overlay.opaque value compared")
        elif isinstance(node, ast.Constant) and isinstance(node.value, bytes):
            if any(m in node.value for m in _MARKER_BYTES):
                found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(".wh."):
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


def test_format_checker_catches_each_form():
    """The check below can fail: each way of assembling a check is caught."""
    samples = [
        "stat.S_ISCHR(st.st_mode)",
        "S_ISCHR(m)",
        "st.st_rdev == 0",
        "0 != st.st_rdev",
        "info.devmajor == 0 and info.devminor == 0",
        "value == b'y'",
        "b'x' != v",
        "os.getxattr(p, m.opaque_xattr)",
        "os.makedev(0, 0)",
        "names = [b'trusted.overlay.opaque']",
        "x = p + b'whiteout'",
        "x = p + b'opaque'",
        "n = b'.wh.' + name",
        "n = f'.wh.{name}'",
        "m.prefixes",
        "m.whiteout_names",
    ]
    for src in samples:
        assert _format_knowledge(ast.parse(src)), src
    fine = "os.makedev(1, 3); st.st_rdev; os.mknod(n, m, st.st_rdev); b'trusted.'; 'a layer says .wh.NAME'"
    assert _format_knowledge(ast.parse(fine)) == []


def test_no_module_but_markers_knows_the_formats():
    modules = sorted(p for p in _PACKAGE.rglob("*.py") if p != _PACKAGE / "fs" / "markers.py")
    assert len(modules) > 40 and _PACKAGE / "fs" / "resolve.py" in modules
    offenders = {
        str(p.relative_to(_PACKAGE)): found
        for p in modules
        if (found := _format_knowledge(ast.parse(p.read_bytes(), str(p))))
    }
    assert offenders == {}, "marker formats are tested or spelled outside fs/markers.py"
