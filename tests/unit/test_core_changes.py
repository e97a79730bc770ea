"""``pyunionfs diff``: what an upper changed, read from its markers (like ``docker diff``).

Why: the change list is how a user sees what a container did, and the same
walk feeds ``commit``.  Every marker format must count (0/0 devices, xattr
whiteouts in ``opaque=x`` directories, OCI ``.wh.`` files, opaque xattrs,
``.wh..wh..opq``, ``.wh.NAME`` beside a directory), and the A/C/D decision
must follow the documented rules: with the lowers known, existence in their
merged view decides; without them, the upper's own records do.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyunionfs import cli
from pyunionfs.changes import LayerError, changes, path_key
from pyunionfs.whiteout import Markers
from tests.unit.conftest import mkfile, mkwhiteout, mkxwhiteout, set_opaque

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: whiteout devices and trusted xattrs")

ORIGIN = b"\x00\xfb\x15\x00\x01" + bytes(16)


def build_upper(up: Path) -> None:
    mkfile(up / "etc/passwd", b"changed")
    os.setxattr(up / "etc/passwd", "trusted.overlay.origin", ORIGIN)
    mkfile(up / "etc/new", b"new")
    mkwhiteout(up / "etc/shadow")
    set_opaque(up / "opt/app")
    mkfile(up / "opt/app/x", b"x")
    os.setxattr(up / "opt/app/x", "trusted.overlay.origin", ORIGIN)  # renamed in: still new here
    mkfile(up / "opt/app/sub/f", b"f")
    mkfile(up / "opt/app/keep/k2", b"k2")
    mkxwhiteout(up / "srv/gone")
    mkwhiteout(up / "srv/stay")
    mkfile(up / "var/.wh.log")
    mkfile(up / "home/user/.wh..wh..opq")
    mkfile(up / "home/user/f", b"f")
    mkfile(up / ".wh.lib")
    mkfile(up / "lib/libc", b"libc")
    mkfile(up / "newfile", b"n")
    os.symlink("newfile", up / "ln")
    mkfile(up / "a\nb", b"odd name")
    mkwhiteout(up / "nothere")


def build_lowers(l0: Path, l1: Path) -> None:
    for rel in ("etc/passwd", "etc/shadow", "opt/app/old", "opt/app/keep/k1", "srv/gone", "srv/stay",
                "var/log/syslog", "home/user/notes", "lib/libc", "lib/libm"):
        mkfile(l0 / rel, b"lower")
    mkfile(l1 / "etc/motd", b"motd")
    mkwhiteout(l1 / "srv/stay")


def test_without_lowers_the_upper_records_decide(tmp_path: Path) -> None:
    up = tmp_path / "upper"
    build_upper(up)
    got = changes(os.fsencode(up), Markers())
    assert got == [
        ("A", b"a\nb"),
        ("C", b"etc"),
        ("A", b"etc/new"),
        ("C", b"etc/passwd"),  # copied up: has an origin record
        ("D", b"etc/shadow"),
        ("C", b"home"),
        ("A", b"home/user"),  # opaque (.wh..wh..opq)
        ("A", b"home/user/f"),
        ("A", b"lib"),  # opaque (.wh.lib beside it)
        ("A", b"lib/libc"),
        ("A", b"ln"),
        ("A", b"newfile"),
        ("D", b"nothere"),
        ("C", b"opt"),
        ("A", b"opt/app"),  # opaque (overlay.opaque=y)
        ("A", b"opt/app/keep"),  # below an added directory: added, whatever its records
        ("A", b"opt/app/keep/k2"),
        ("A", b"opt/app/sub"),
        ("A", b"opt/app/sub/f"),
        ("A", b"opt/app/x"),
        ("C", b"srv"),
        ("D", b"srv/gone"),  # xattr whiteout in an opaque=x directory
        ("D", b"srv/stay"),
        ("C", b"var"),
        ("D", b"var/log"),  # OCI whiteout in the upper
    ]
    assert got == sorted(got, key=lambda c: path_key(c[1]))


def test_with_lowers_existence_decides(tmp_path: Path) -> None:
    up, l0, l1 = tmp_path / "upper", tmp_path / "l0", tmp_path / "l1"
    build_upper(up)
    build_lowers(l0, l1)
    got = changes(os.fsencode(up), Markers(), [os.fsencode(l1), os.fsencode(l0)])
    assert got == [
        ("A", b"a\nb"),
        ("C", b"etc"),
        ("A", b"etc/new"),
        ("C", b"etc/passwd"),
        ("D", b"etc/shadow"),
        ("C", b"home"),
        ("C", b"home/user"),  # opaque, but the lowers had it
        ("A", b"home/user/f"),
        ("D", b"home/user/notes"),  # hidden by the opaque directory
        ("C", b"lib"),
        ("C", b"lib/libc"),
        ("D", b"lib/libm"),
        ("A", b"ln"),
        ("A", b"newfile"),
        # no "nothere": a whiteout of what no lower has deletes nothing
        ("C", b"opt"),
        ("C", b"opt/app"),
        ("C", b"opt/app/keep"),
        ("D", b"opt/app/keep/k1"),  # below an opaque directory, merging stops at every depth
        ("A", b"opt/app/keep/k2"),
        ("D", b"opt/app/old"),
        ("A", b"opt/app/sub"),
        ("A", b"opt/app/sub/f"),
        ("A", b"opt/app/x"),
        ("C", b"srv"),
        ("D", b"srv/gone"),
        # no "srv/stay": already deleted in l1
        ("C", b"var"),
        ("D", b"var/log"),  # only the topmost deleted path, not var/log/syslog
    ]


def test_cli_output_and_errors(tmp_path: Path, capsysbinary) -> None:
    up, l0, l1 = tmp_path / "upper", tmp_path / "l0", tmp_path / "l1"
    build_upper(up)
    build_lowers(l0, l1)
    assert cli.main(["diff", str(up), "--lowers", f"{l1}:{l0}"]) == 0
    out = capsysbinary.readouterr().out.splitlines()
    assert out[:3] == [b"A /a\\nb", b"C /etc", b"A /etc/new"]
    assert b"D /home/user/notes" in out and len(out) == 27
    os.setxattr(up / "opt", "trusted.overlay.redirect", b"/moved")
    assert cli.main(["diff", str(up)]) == 1
    err = capsysbinary.readouterr().err
    assert err.startswith(b"pyunionfs: opt: has an overlay.redirect record") and err.count(b"\n") == 1
    with pytest.raises(LayerError, match="metacopy"):
        os.setxattr(up / "newfile", "user.overlay.metacopy", b"")
        os.removexattr(up / "opt", "trusted.overlay.redirect")
        changes(os.fsencode(up), Markers())
    assert cli.main(["diff", str(tmp_path / "missing")]) == 1


def test_userxattr_reads_only_user_markers(tmp_path: Path) -> None:
    up = tmp_path / "upper"
    set_opaque(up / "t", ns="trusted")
    set_opaque(up / "u", ns="user")
    mkfile(up / "u/x")
    assert changes(os.fsencode(up), Markers(userxattr=True)) == [("C", b"t"), ("A", b"u"), ("A", b"u/x")]
    assert changes(os.fsencode(up), Markers()) == [("A", b"t"), ("A", b"u"), ("A", b"u/x")]


def test_marker_helpers() -> None:
    """The two small additions to whiteout.py that the layer tools rely on."""
    from pyunionfs.whiteout import classify_oci_name

    assert classify_oci_name(b"name") == ("entry", b"name")
    assert classify_oci_name(b"a.wh.b") == ("entry", b"a.wh.b")
    assert classify_oci_name(b".wh..wh..opq") == ("opaque", b"")
    assert classify_oci_name(b".wh.name") == ("whiteout", b"name")
    assert classify_oci_name(b".wh..hidden") == ("whiteout", b".hidden")
    for bad in (b".wh.", b".wh..", b".wh...", b".wh..wh.plnk", b".wh..wh..opq2"):
        assert classify_oci_name(bad)[0] == "invalid", bad
    names = [b"trusted.overlay.origin", b"user.other"]
    assert Markers().has_record(names, b"origin") and not Markers().has_record(names, b"redirect")
    assert not Markers(userxattr=True).has_record(names, b"origin")
    assert Markers(userxattr=True).has_record([b"user.overlay.metacopy"], b"metacopy")
