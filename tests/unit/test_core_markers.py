"""Markers: the on-disk whiteout/opaque formats and the xattr name mapping."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyunionfs.fs.markers import OCI_OPAQUE, OCI_PREFIX, Markers


def test_device_whiteout_shape(tmp_path):
    os.mknod(tmp_path / "w", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(tmp_path / "blk0", stat.S_IFBLK | 0o600, os.makedev(0, 0))
    (tmp_path / "f").write_bytes(b"")
    assert Markers.is_device_whiteout(os.lstat(tmp_path / "w"))
    assert not Markers.is_device_whiteout(os.lstat(tmp_path / "null"))
    assert not Markers.is_device_whiteout(os.lstat(tmp_path / "blk0"))
    assert not Markers.is_device_whiteout(os.lstat(tmp_path / "f"))


def test_xwhiteout_shape(tmp_path):
    m = Markers()
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "full").write_bytes(b"x")
    (tmp_path / "d").mkdir()
    assert m.may_be_xwhiteout(os.lstat(tmp_path / "empty"))
    assert not m.may_be_xwhiteout(os.lstat(tmp_path / "full"))
    assert not m.may_be_xwhiteout(os.lstat(tmp_path / "d"))
    assert m.has_whiteout_xattr([b"user.a", b"trusted.overlay.whiteout"])
    assert m.has_whiteout_xattr([b"user.overlay.whiteout"])
    assert not m.has_whiteout_xattr([b"trusted.overlay.opaque"])
    u = Markers(userxattr=True)
    assert not u.has_whiteout_xattr([b"trusted.overlay.whiteout"])
    assert u.has_whiteout_xattr([b"user.overlay.whiteout"])


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


def test_opaque_value():
    m = Markers()
    vals = {b"trusted.overlay.opaque": b"y", b"user.overlay.opaque": b"x"}
    assert m.opaque_value(vals.__getitem__, [b"trusted.overlay.opaque"]) == b"y"
    assert m.opaque_value(vals.__getitem__, [b"user.overlay.opaque"]) == b"x"
    assert m.opaque_value(vals.__getitem__, [b"user.other"]) is None
    assert Markers(userxattr=True).opaque_value(vals.__getitem__, [b"trusted.overlay.opaque"]) is None


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
