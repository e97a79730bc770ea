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
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from pyunionfs import cli
from pyunionfs.errors import LayerError
from pyunionfs.fs.markers import Markers
from pyunionfs.image.changes import changes, path_key
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
    assert err.startswith(b"pyunionfs: opt: is a directory renamed with redirect_dir=on") and err.count(b"\n") == 1
    assert b"--lowers" in err
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
    """The two small additions to markers.py (once whiteout.py) that the layer tools rely on."""
    from pyunionfs.fs.markers import classify_oci_name

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


# --------------------------------------------------------------------------
# Lower hard links copied up through one name (index=on)
# --------------------------------------------------------------------------
#
# Why: a layer must hold what the container saw.  A lower file with several
# names is copied up once, to the work dir's index/, and only the names that
# were written or linked are in the upper; the others stay lower-only yet
# show the copy.  ``diff`` and ``commit`` must find those names through the
# index and the lowers, and only the ones the merged view still shows.  The
# layout is built by hand exactly as the kernel leaves it (origin record from
# the lower file's handle, index named by its hex, ``U%+d`` nlink record on
# the copy, upper names hard links of it); tests/mount/test_export_links.py
# has the kernel make it.

T1 = 1_700_000_000


def index_copy(lower: Path, rel: str, work: Path, upper: Path, names: list[str], data: bytes, merged: int) -> Path:
    """Copy lower hard link *rel* to ``work/index`` with new *data*, link it at
    *names* in *upper*, and record *merged* as its merged link count."""
    from pyunionfs.fs import origin

    src = lower / rel
    fd = os.open(src.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        record = origin.of(fd, os.fsencode(src.name))
    finally:
        os.close(fd)
    assert record is not None
    copy = mkfile(work / "index" / origin.index_name(record).decode(), data, mode=0o751)
    os.chown(copy, 7, 8)
    os.setxattr(copy, "trusted.overlay.origin", record)
    os.setxattr(copy, "user.note", b"copied")
    os.utime(copy, (T1, T1))
    for n in names:
        (upper / n).parent.mkdir(parents=True, exist_ok=True)
        os.link(copy, upper / n)
    os.setxattr(copy, "trusted.overlay.nlink", origin.nlink_record(merged, os.stat(copy).st_nlink))
    return copy


def linked_lower(low: Path) -> None:
    """gunzip, uncompress, zcat and sbin/gz: four names of one file; a pair not copied up."""
    mkfile(low / "usr/bin/gunzip", b"old\n")
    for n in ("usr/bin/uncompress", "usr/bin/zcat", "sbin/gz"):
        (low / n).parent.mkdir(parents=True, exist_ok=True)
        os.link(low / "usr/bin/gunzip", low / n)
    os.chmod(low / "sbin", 0o750)
    os.chown(low / "sbin", 3, 4)
    os.setxattr(low / "sbin", "user.dir", b"lower")
    mkfile(low / "etc/a", b"a")
    os.link(low / "etc/a", low / "etc/b")


def collect() -> tuple[list[str], Callable[[str], None]]:
    got: list[str] = []
    return got, got.append


def test_lower_only_names_of_a_copied_up_hard_link_are_changed(tmp_path: Path) -> None:
    up, low, work = tmp_path / "upper", tmp_path / "low", tmp_path / ".upper.pyunionfs-work"  # the default
    linked_lower(low)
    index_copy(low, "usr/bin/gunzip", work, up, ["usr/bin/uncompress"], b"old\nmore\n", merged=4)
    warnings, warn = collect()
    got = changes(os.fsencode(up), Markers(), [os.fsencode(low)], warn=warn)
    assert got == [
        ("C", b"sbin"),  # not in the upper: a lower directory leading to a name of the copy
        ("C", b"sbin/gz"),
        ("C", b"usr"),
        ("C", b"usr/bin"),
        ("C", b"usr/bin/gunzip"),
        ("C", b"usr/bin/uncompress"),
        ("C", b"usr/bin/zcat"),
    ]  # etc/a and etc/b: hard links too, but never copied up
    assert warnings == []


def test_without_lowers_or_index_the_missing_names_are_counted(tmp_path: Path, capsys) -> None:
    up, low, work = tmp_path / "upper", tmp_path / "low", tmp_path / "work"
    linked_lower(low)
    index_copy(low, "usr/bin/gunzip", work, up, ["usr/bin/uncompress"], b"new\n", merged=4)
    only_upper = [("C", b"usr"), ("C", b"usr/bin"), ("C", b"usr/bin/uncompress")]
    warnings, warn = collect()
    assert changes(os.fsencode(up), Markers(), workdir=os.fsencode(work), warn=warn) == only_upper
    assert warnings == ["3 name(s) of hard-linked lower files copied up (index=on) are only in the lower "
                        "layers and are left out: finding them needs its lower layers (--lowers)"]
    # A kernel upper committed without its workdir=: the upper name's nlink record still tells.
    warnings.clear()
    assert changes(os.fsencode(up), Markers(), [os.fsencode(low)], warn=warn) == only_upper
    assert len(warnings) == 1 and "needs the work directory the upper was mounted with (--workdir; none at " \
        f"{tmp_path}/.upper.pyunionfs-work)" in warnings[0]
    # The command line: once on stderr, the list unchanged; a work dir given must exist.
    assert cli.main(["diff", str(up), "--lowers", str(low)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("pyunionfs: warning: 3 name(s) of hard-linked") and err.count("\n") == 1
    assert cli.main(["diff", str(up), "--lowers", str(low), "--workdir", str(work)]) == 0
    out, err = capsys.readouterr()
    assert "C /sbin/gz\n" in out and err == ""
    assert cli.main(["diff", str(up), "--workdir", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err == f"pyunionfs: work directory {tmp_path}/nowhere: No such file or directory\n"
    # Lowers that are not the ones mounted (a name gone since): the count still tells.
    os.unlink(low / "usr/bin/zcat")
    warnings.clear()
    assert len(changes(os.fsencode(up), Markers(), [os.fsencode(low)], os.fsencode(work), warn)) == 6
    assert warnings == ["1 name(s) of hard-linked lower files copied up (index=on) were not found in the lower "
                        "layers given: are they, and the work directory, the ones the upper was mounted with?"]


def test_only_names_the_merged_view_still_shows(tmp_path: Path) -> None:
    """Whited out, replaced, below an opaque directory, hidden by a higher
    lower, or another object's name: not the copy's."""
    up, l0, l1, work = tmp_path / "upper", tmp_path / "l0", tmp_path / "l1", tmp_path / "work"
    mkfile(l0 / "a/one", b"old")
    for n in ("a/two", "a/gone", "a/replaced", "b/hidden/x", "b/opaque/y", "c/under-l1", "c/moved-in-l1", "d/kept"):
        (l0 / n).parent.mkdir(parents=True, exist_ok=True)
        os.link(l0 / "a/one", l0 / n)
    (l1 / "d").mkdir(parents=True)
    os.chmod(l1 / "d", 0o700)  # the top lower's directory is the one shown
    mkwhiteout(l1 / "c/under-l1")  # a higher lower deleted it
    mkfile(l1 / "c/moved-in-l1", b"other object")  # a higher lower replaced it
    mkwhiteout(up / "a/gone")  # the container deleted it
    mkfile(up / "a/replaced", b"fresh")  # ... or wrote a new file there
    mkwhiteout(up / "b/hidden")  # ... or removed the directory
    set_opaque(up / "b/opaque")  # ... or made it again
    index_copy(l0, "a/one", work, up, ["a/one"], b"new", merged=3)
    warnings, warn = collect()
    got = changes(os.fsencode(up), Markers(), [os.fsencode(l1), os.fsencode(l0)], os.fsencode(work), warn)
    assert got == [
        ("C", b"a"),
        ("D", b"a/gone"),
        ("C", b"a/one"),
        ("C", b"a/replaced"),  # the upper's new file
        ("C", b"a/two"),  # the one name of the copy the upper lacks in a
        ("C", b"b"),
        ("D", b"b/hidden"),
        ("C", b"b/opaque"),
        ("D", b"b/opaque/y"),
        ("C", b"d"),  # not in the upper at all
        ("C", b"d/kept"),
    ]  # nothing in c: what l1 hides or replaces there is not the copy
    assert warnings == []
    from pyunionfs.image.layertar import commit

    commit(str(up), str(tmp_path / "l.tar"), lowers=[str(l1), str(l0)], workdir=str(work))
    with tarfile.open(tmp_path / "l.tar") as tf:
        assert tf.getmember("d").mode == 0o700
        assert tf.getmember("d/kept").linkname == "a/one"


def test_a_copy_whose_names_were_all_removed_adds_nothing(tmp_path: Path) -> None:
    up, low, work = tmp_path / "upper", tmp_path / "low", tmp_path / "work"
    linked_lower(low)
    up.mkdir()
    copy = index_copy(low, "usr/bin/gunzip", work, up, [], b"new\n", merged=0)
    assert os.getxattr(copy, "trusted.overlay.nlink") == b"U-1"
    warnings, warn = collect()
    assert changes(os.fsencode(up), Markers(), [os.fsencode(low)], os.fsencode(work), warn) == []
    assert warnings == []


def test_commit_writes_every_name_as_one_hard_link_group(tmp_path: Path) -> None:
    from pyunionfs.image.layertar import commit

    up, low, work = tmp_path / "upper", tmp_path / "low", tmp_path / "work"
    linked_lower(low)
    index_copy(low, "usr/bin/gunzip", work, up, ["usr/bin/uncompress", "usr/bin/unzip"], b"old\nmore\n", merged=5)
    tar = tmp_path / "layer.tar"
    commit(str(up), str(tar), lowers=[str(low)], workdir=str(work))
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
        assert [(m.name, m.type, m.linkname) for m in members] == [
            ("sbin", tarfile.DIRTYPE, ""),
            ("sbin/gz", tarfile.REGTYPE, ""),  # first in member order: it carries the data
            ("usr", tarfile.DIRTYPE, ""),
            ("usr/bin", tarfile.DIRTYPE, ""),
            ("usr/bin/gunzip", tarfile.LNKTYPE, "sbin/gz"),
            ("usr/bin/uncompress", tarfile.LNKTYPE, "sbin/gz"),
            ("usr/bin/unzip", tarfile.LNKTYPE, "sbin/gz"),
            ("usr/bin/zcat", tarfile.LNKTYPE, "sbin/gz"),
        ]
        gz = members[1]
        assert tf.extractfile(gz).read() == b"old\nmore\n"  # type: ignore[union-attr]
        assert (gz.mode, gz.uid, gz.gid, gz.mtime) == (0o751, 7, 8, T1)  # the copy's, not the lower's
        assert gz.pax_headers.get("SCHILY.xattr.user.note") == "copied"
        assert not any("overlay" in k for m in members for k in m.pax_headers)
        sbin = members[0]
        assert (sbin.mode, sbin.uid, sbin.gid) == (0o750, 3, 4)  # the lower directory's
        assert sbin.pax_headers.get("SCHILY.xattr.user.dir") == "lower"


def test_commit_after_every_upper_name_was_removed(tmp_path: Path, capsys) -> None:
    """The copy's only link is the index one (st_nlink 1), yet the lower
    names left are still one file in the layer."""
    up, low, work = tmp_path / "upper", tmp_path / "low", tmp_path / "work"
    linked_lower(low)
    copy = index_copy(low, "usr/bin/gunzip", work, up, [], b"new\n", merged=3)
    os.removexattr(copy, "trusted.overlay.origin")  # the index name is the record's hex: enough
    mkwhiteout(up / "usr/bin/uncompress")
    out = tmp_path / "layer.tar"
    assert cli.main(["commit", str(up), "-o", str(out), "--lowers", str(low), "--workdir", str(work)]) == 0
    assert capsys.readouterr().err == ""
    with tarfile.open(out) as tf:
        assert [(m.name, m.type, m.linkname) for m in tf.getmembers()] == [
            ("sbin", tarfile.DIRTYPE, ""),
            ("sbin/gz", tarfile.REGTYPE, ""),
            ("usr", tarfile.DIRTYPE, ""),
            ("usr/bin", tarfile.DIRTYPE, ""),
            ("usr/bin/.wh.uncompress", tarfile.REGTYPE, ""),
            ("usr/bin/gunzip", tarfile.LNKTYPE, "sbin/gz"),
            ("usr/bin/zcat", tarfile.LNKTYPE, "sbin/gz"),
        ]
    assert cli.main(["commit", str(up), "-o", str(tmp_path / "bare.tar"), "--workdir", str(work)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("pyunionfs: warning: 3 name(s)") and "(--lowers)" in err
