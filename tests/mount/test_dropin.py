"""The drop-in command line: pyunionfs run the way fuse-overlayfs is run.

containers/storage (podman, buildah) runs its ``mount_program`` as
``PROGRAM -o lowerdir=...,upperdir=...,workdir=...[,opts] MNT``; mount(8)
with ``-t fuse.pyunionfs`` runs mount.fuse3, which runs ``pyunionfs SOURCE
MNT -o OPTS``; rootless tools do either inside a user namespace.  Every
mount here is made by the command under test (in the background, as those
callers expect), checked in mountinfo the moment the command returns, and
unmounted the way those callers unmount, with the daemon required to exit.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyunionfs.cli import dropin
from pyunionfs.cli.commands import subcommands
from pyunionfs.errors import UsageError
from pyunionfs.fuse.mountinfo import find_mount
from pyunionfs.options import TABLE, Form, Use, taken_by
from tests.support.mounting import force_unmount, is_mounted, require_fuse, wait_until

SUBCOMMANDS = subcommands()

PYUNIONFS = [sys.executable, "-m", "pyunionfs"]
ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL)


def daemons(mnt: Path) -> list[int]:
    """Live pyunionfs processes serving *mnt*: those whose command line names it,
    absolute or relative with at least a parent (``case0/mnt``, unique to a test)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z" or not any(b"pyunionfs" in c for c in cmd):
                continue
            target = os.fsencode(str(mnt))
            if any(c == target or (b"/" in c.strip(b"/") and target.endswith(b"/" + c.strip(b"/"))) for c in cmd):
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def mount_opts(mnt: Path) -> set[str]:
    """The per-mount flags (nosuid, nodev, ro...) of the mount at *mnt*, from mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt):
                return set(fields[5].split(","))
    raise AssertionError(f"{mnt} is not mounted")


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """tmp_path with lowers A (top) and B, an upper U, a work dir W and a mountpoint mnt."""
    for d in ("A", "B", "U", "W", "mnt"):
        (tmp_path / d).mkdir()
    (tmp_path / "A" / "f").write_text("A")
    (tmp_path / "B" / "f").write_text("B")
    (tmp_path / "B" / "g").write_text("g")
    (tmp_path / "B" / "d").mkdir()
    (tmp_path / "B" / "d" / "inner").write_text("inner")
    yield tmp_path
    mnt = tmp_path / "mnt"
    force_unmount(mnt)
    for pid in daemons(mnt):  # only ours: their command line names this test's mountpoint
        os.kill(pid, signal.SIGKILL)


def unmount_and_wait(mnt: Path, how: list[str]) -> None:
    """Unmount with *how* and require the daemon to be gone soon after."""
    pids = daemons(mnt)
    res = run(how)
    assert res.returncode == 0, res.stderr
    assert not is_mounted(mnt)
    wait_until(lambda: not any(p in daemons(mnt) for p in pids), 20, "the daemon to exit after unmounting")


# -- parsing (no mount) ----------------------------------------------------------------


def test_containers_storage_argv_is_the_overlay_form() -> None:
    argv = ["-o", "lowerdir=l/A:l/B,upperdir=/u,workdir=/w,,volatile,fsync=0", "/mnt"]
    assert dropin.is_overlay_form(argv, SUBCOMMANDS)
    inv = dropin.parse_argv(argv)
    assert (inv.lowers, inv.upper, inv.workdir, inv.mountpoint) == ("l/A:l/B", "/u", "/w", "/mnt")
    assert inv.options == [] and inv.warnings == [] and not inv.foreground


def test_options_after_mnt_repeated_attached_and_a_source() -> None:
    inv = dropin.parse_argv(["overlay", "/mnt", "-o", "lowerdir=/a", "-oupperdir=/u", "-o", "nodev,dev,ro,rw"])
    assert (inv.lowers, inv.upper, inv.workdir, inv.mountpoint) == ("/a", "/u", None, "/mnt")
    assert inv.options == ["nodev", "dev"]  # build_config keeps the last of each pair; rw won over ro
    assert "ro" in dropin.parse_argv(["/mnt", "-o", "lowerdir=/a,rw,ro"]).options


def test_escapes_and_quotes_in_option_values() -> None:
    inv = dropin.parse_argv(["-o", r'lowerdir=/a\:b:/c\,d,upperdir=/u\,v,context="sys:obj:t:s0:c1,c2"', "/m"])
    assert inv.lowers == r"/a\:b:/c\,d"  # split_layers reads the escapes
    assert inv.upper == "/u,v"
    assert inv.warnings == ["context= ignored: no SELinux label is set on the mount"]


@pytest.mark.parametrize("argv, expect", [
    (["-o", "lowerdir=/a,frobnicate", "/m"], "unknown option 'frobnicate'"),
    (["-o", "lowerdir=/a,volatilee", "/m"], "unknown option 'volatilee'"),
    (["-o", "upperdir=/u", "/m"], "no lowerdir= given"),
    (["-o", "lowerdir=/a"], "no mountpoint"),
    (["-o", "lowerdir=/a", "s", "/m", "/x"], "too many arguments"),
    (["-o", "lowerdir=/a,upperdir=", "/m"], "empty upperdir"),
    (["-o", "lowerdir=/a,timeout", "/m"], "needs a value"),
    (["-o", "lowerdir=/a,ro=1", "/m"], "takes no value"),
    (["-x", "-o", "lowerdir=/a", "/m"], "unknown argument '-x'"),
    (["/m", "-o"], "-o needs an argument"),
])
def test_bad_overlay_command_lines(argv, expect) -> None:
    with pytest.raises(UsageError, match=expect):
        dropin.parse_argv(argv)


def test_subcommands_still_win() -> None:
    for argv in (["mount", "L", "U", "M"], ["umount", "M"], ["demo"], ["diff", "U"], ["apply", "x", "y"],
                 ["commit", "U", "-o", "lowerdir=x.tar"], ["install-helper"], ["--help"], ["--version"]):
        assert not dropin.is_overlay_form(argv, SUBCOMMANDS), argv
    # mount.fuse3 with a SOURCE that happens to be a subcommand's name
    assert dropin.is_overlay_form(["mount", "/mnt", "-o", "rw,lowerdir=/a"], SUBCOMMANDS)
    assert dropin.is_overlay_form(["-V"], SUBCOMMANDS)
    assert dropin.is_overlay_form(["pyunionfs", "/mnt", "-o", "x"], SUBCOMMANDS)
    # a mistyped subcommand is argparse's to refuse, unless the line has a lowerdir=
    for argv in (["mout", "L1:L2", "U", "M"], ["umonut", "M"], ["mout", "L", "U", "M", "-o", "ro"], ["frob"]):
        assert not dropin.is_overlay_form(argv, SUBCOMMANDS), argv
    assert dropin.is_overlay_form(["mout", "/mnt", "-o", "lowerdir=/a"], SUBCOMMANDS)
    assert dropin.is_overlay_form(["overlay", "/mnt", "-o", "upperdir=/u"], SUBCOMMANDS)  # says: no lowerdir= given


def test_one_routing_decision_names_the_subcommand_meant() -> None:
    """dropin.route decides once: the drop-in form, a subcommand, or a mistyped one (with the name meant)."""
    R = dropin.Route
    assert dropin.route(["-o", "lowerdir=/a", "/m"], SUBCOMMANDS) == R(True)
    assert dropin.route(["src", "/m", "-o", "lowerdir=/a"], SUBCOMMANDS) == R(True)
    assert dropin.route(["mount", "L", "U", "M"], SUBCOMMANDS) == R(False)
    assert dropin.route(["mout", "L", "U", "M", "-o", "ro"], SUBCOMMANDS) == R(False, "mount")
    assert dropin.route(["umonut", "M"], SUBCOMMANDS) == R(False, "umount")
    assert dropin.route(["imgaes"], SUBCOMMANDS) == R(False, "images")
    assert dropin.route(["zzz"], SUBCOMMANDS) == R(False)  # argparse lists the choices
    assert dropin.route(["zzz", "/m", "-o", "ro"], SUBCOMMANDS) == R(True)  # says: no lowerdir= given
    assert dropin.route([], SUBCOMMANDS) == R(False)


def test_mistyped_subcommands_get_invalid_choice_with_the_closest_name(tmp_path: Path) -> None:
    for argv, meant in ((["mout", "L1:L2", "U", "M"], "mount"), (["umonut", "M"], "umount"),
                        (["comit", "U", "-o", "x.tar"], "commit")):
        res = run(PYUNIONFS + argv, cwd=tmp_path)
        assert res.returncode == 2, res.stderr
        assert res.stderr.splitlines()[-1] == (f"pyunionfs: error: argument COMMAND: invalid choice: {argv[0]!r} "
                                               f"(did you mean {meant!r}?)"), res.stderr
    res = run(PYUNIONFS + ["zzz"])
    assert res.returncode == 2 and "invalid choice: 'zzz' (choose from 'mount'," in res.stderr
    assert os.listdir(tmp_path) == []


def test_source_and_fsname_are_read() -> None:
    assert dropin.parse_argv(["src", "/m", "-o", "lowerdir=/a"]).source == "src"
    assert dropin.parse_argv(["-o", "lowerdir=/a", "/m"]).source is None
    assert dropin.parse_argv(["/m", "-o", r"lowerdir=/a,fsname=a\,b"]).options == [r"fsname=a\,b"]


def test_option_table_is_consistent_and_in_the_docs() -> None:
    """docs/options.md (generated from the table) has a row for every drop-in option, saying what is done."""
    doc = (ROOT / "docs" / "options.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    dropin_options = taken_by(Form.OVERLAY)
    for opt in dropin_options:
        cell = "`" + opt.spelling.replace("|", "\\|") + "`"  # a | inside a table cell is escaped
        row = [r for r in rows if r.split(" | ")[0] == "| " + cell]
        assert len(row) == 1, f"docs/options.md lacks {opt.spelling}"
        assert row[0].split(" | ")[3] == opt.use.value, (opt, row[0])
        if opt.use is Use.HONOURED and opt.key not in ("lowerdir", "upperdir"):
            assert Form.MOUNT in opt.forms, opt  # build_config takes it
    assert len({o.key for o in dropin_options}) == len(dropin_options)
    assert "max_files_per_uid" in {o.key for o in dropin_options}


def test_help_and_version_of_the_overlay_form() -> None:
    res = run(PYUNIONFS + ["-V"])
    assert res.returncode == 0 and res.stdout.startswith("pyunionfs ")
    res = run(PYUNIONFS + ["-o", "lowerdir=/x", "-h"])
    assert res.returncode == 0 and "lowerdir=" in res.stdout and "volatile" in res.stdout


# -- mounting as containers/storage does ----------------------------------------------


@pytest.mark.parametrize("shape", ["options-first", "options-after-mnt", "split-and-relative", "source-mnt"])
def test_mount_program_invocation_returns_live_and_detached(tree: Path, shape: str) -> None:
    require_fuse()
    mnt = tree / "mnt"
    opts = f"lowerdir={tree}/A:{tree}/B,upperdir={tree}/U,workdir={tree}/W,,volatile"
    t = tree.name  # relative paths from tree's parent
    argv, cwd = {
        "options-first": (["-o", opts, str(mnt)], None),
        "options-after-mnt": ([str(mnt), "-o", opts + ",fsync=0"], None),
        "split-and-relative": ([f"-olowerdir={t}/A:{t}/B", f"{t}/mnt", "-o", f"upperdir={t}/U,workdir=./{t}/W",
                                "-o", "nodev"], tree.parent),
        "source-mnt": (["pyunionfs", str(mnt), "-o", "rw," + opts + ",nodev,nosuid,noauto,x-systemd.after=x"], None),
    }[shape]
    res = run(PYUNIONFS + argv, cwd=cwd)
    # live at once: listed in mountinfo the moment the command returned
    found = find_mount(os.fsencode(str(mnt)))
    assert found is not None and found[0] == "fuse.pyunionfs", res.stderr
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stderr
    pids = daemons(mnt)
    assert len(pids) == 1, "one daemon, running on in the background"
    assert os.getsid(pids[0]) == pids[0], "the daemon is a session leader, detached from the caller"
    assert sorted(os.listdir(mnt)) == ["d", "f", "g"]
    assert (mnt / "f").read_text() == "A"
    (mnt / "g").write_text("changed")
    os.unlink(mnt / "f")
    assert (tree / "U" / "g").read_text() == "changed"
    assert stat.S_ISCHR((tree / "U" / "f").lstat().st_mode)  # a whiteout: A and B both have f
    assert (tree / "W" / "work").is_dir(), "the given workdir is the work directory"
    assert {"nosuid", "nodev"} <= mount_opts(mnt)
    unmount_and_wait(mnt, ["umount", str(mnt)])
    assert (tree / "B" / "g").read_text() == "g"  # lowers untouched


def test_lowerdir_only_is_read_only(tree: Path) -> None:
    require_fuse()
    mnt = tree / "mnt"
    res = run(PYUNIONFS + ["-o", f"lowerdir={tree}/A:{tree}/B", str(mnt)])
    assert res.returncode == 0, res.stderr
    assert is_mounted(mnt) and "ro" in mount_opts(mnt)
    assert (mnt / "g").read_text() == "g"
    with pytest.raises(OSError) as info:
        (mnt / "new").write_text("x")
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        os.unlink(mnt / "g")
    assert info.value.errno == errno.EROFS
    unmount_and_wait(mnt, ["fusermount3", "-u", str(mnt)])


@pytest.mark.parametrize("flags, present, absent", [
    ("", {"nosuid", "nodev"}, {"noexec"}),
    ("dev,suid", set(), {"nosuid", "nodev", "noexec"}),
    ("suid,noexec", {"nodev", "noexec"}, {"nosuid"}),
    ("dev,nodev,exec", {"nodev", "nosuid"}, {"noexec"}),  # the last of a pair wins
])
def test_dev_suid_exec_flags_reach_the_mount(tree: Path, flags: str, present: set, absent: set) -> None:
    require_fuse()
    if os.geteuid() != 0:
        pytest.skip("dev and suid mounts need root")
    mnt = tree / "mnt"
    res = run(PYUNIONFS + ["-o", f"lowerdir={tree}/A,upperdir={tree}/U,workdir={tree}/W,{flags}", str(mnt)])
    assert res.returncode == 0, res.stderr
    seen = mount_opts(mnt)
    assert present <= seen and not (absent & seen), seen
    unmount_and_wait(mnt, ["umount", str(mnt)])


def test_every_tolerated_option_is_accepted(tree: Path) -> None:
    """The whole table in one line (values made up where they are ignored anyway)."""
    require_fuse()
    mnt = tree / "mnt"
    values = {"timeout": "5", "oci_whiteouts": "on", "engine": "native", "passthrough": "on", "uring": "on",
              "redirect_dir": "on", "metacopy": "on", "uidmapping": "0:0:1", "gidmapping": "0:0:1",
              "x-": "x-systemd.requires=a.mount"}
    items = []
    for opt in taken_by(Form.OVERLAY):
        if opt.key in ("lowerdir", "upperdir", "workdir", "ro", "noexec", "sync") or opt.use is Use.REFUSED:
            continue
        if opt.key == "x-":
            items.append(values["x-"])
        elif opt.takes_value:
            items.append(f"{opt.key}={values.get(opt.key, '1')}")
        else:
            items.append(opt.key)
    res = run(PYUNIONFS + ["-o", f"lowerdir={tree}/A,upperdir={tree}/U,workdir={tree}/W", "-o", ",".join(items),
                           str(mnt)])
    assert res.returncode == 0, res.stderr
    warned = res.stderr.splitlines()
    assert all(line.startswith("pyunionfs: warning: ") for line in warned), res.stderr
    assert len(warned) == sum(o.use is Use.WARNED for o in TABLE)
    assert (mnt / "f").read_text() == "A"
    unmount_and_wait(mnt, ["umount", str(mnt)])


@pytest.mark.parametrize("opts, expect", [
    ("lowerdir={A},upperdir={U},workdir={W},frobnicate", "unknown option 'frobnicate'"),
    ("lowerdir={A},upperdir={U},workdir={W},timeout=", "timeout must be"),
    ("lowerdir={A}:{A}/nope", "does not exist"),
    ("upperdir={U}", "no lowerdir= given"),
    ("remount,ro,lowerdir={A}", "remount is not supported: unmount {mnt} and mount it again"),
    ("lowerdir={A},fsname=", "empty fsname="),
    ("lowerdir={A},fsname=a\tb", "holds a control character"),
])
def test_failures_are_one_line_exit_2_and_mount_nothing(tree: Path, opts: str, expect: str) -> None:
    mnt = tree / "mnt"
    line = opts.format(A=tree / "A", U=tree / "U", W=tree / "W")
    res = run(PYUNIONFS + ["-o", line, str(mnt)])
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    expect = expect.format(mnt=mnt)
    assert len(lines) == 1 and lines[0].startswith("pyunionfs: ") and expect in lines[0], res.stderr
    assert not is_mounted(mnt) and daemons(mnt) == []


@pytest.mark.parametrize("engine", ["native", "pyfuse3"])
def test_fsname_and_source_are_the_mounts_source(tree: Path, engine: str) -> None:
    """As fuse-overlayfs: ``fsname=`` (else mount.fuse3's SOURCE) is what findmnt -S and df show."""
    require_fuse()
    mnt = tree / "mnt"
    layers = f"lowerdir={tree}/A,upperdir={tree}/U,workdir={tree}/W,engine={engine}"
    for argv, source in (
        (["-o", layers, str(mnt)], "pyunionfs"),
        (["ctr-1", str(mnt), "-o", layers], "ctr-1"),
        (["ctr-1", str(mnt), "-o", layers + r",fsname=odd\,name with\\blanks"], "odd,name with\\blanks"),
        (["mount", f"{tree}/A", f"{tree}/U", str(mnt), "-o", f"workdir={tree}/W,engine={engine},fsname=m,x"],
         None),
    ):
        res = run(PYUNIONFS + argv)
        if source is None:  # the mount form reads -o as the kernel does: "x" is an option of its own
            assert res.returncode == 2 and "unknown option 'x'" in res.stderr, res.stderr
            continue
        assert res.returncode == 0, res.stderr
        found = run(["findmnt", "-n", "-o", "TARGET,FSTYPE", "-S", source])
        # (other mounts on the machine may share the default source: this one must be among them)
        assert [str(mnt), "fuse.pyunionfs"] in [line.split() for line in found.stdout.splitlines()], (source, found)
        assert run(["findmnt", "-n", "-o", "SOURCE", str(mnt)]).stdout.strip() == source
        unmount_and_wait(mnt, PYUNIONFS + ["umount", str(mnt)])  # found by its type, whatever its source
    res = run(PYUNIONFS + ["mount", f"{tree}/A", f"{tree}/U", str(mnt), "-o", rf"fsname=m\,x,engine={engine}"])
    assert res.returncode == 0, res.stderr
    assert run(["findmnt", "-n", "-o", "SOURCE", str(mnt)]).stdout.strip() == "m,x"
    unmount_and_wait(mnt, PYUNIONFS + ["umount", str(mnt)])


@pytest.mark.parametrize("how", ["umount", "fusermount3", "pyunionfs"])
def test_each_unmount_ends_the_daemon(tree: Path, how: str) -> None:
    require_fuse()
    mnt = tree / "mnt"
    res = run(PYUNIONFS + ["-o", f"lowerdir={tree}/A,upperdir={tree}/U,workdir={tree}/W", str(mnt)])
    assert res.returncode == 0, res.stderr
    cmd = {"umount": ["umount"], "fusermount3": ["fusermount3", "-u"], "pyunionfs": PYUNIONFS + ["umount"]}[how]
    unmount_and_wait(mnt, cmd + [str(mnt)])


# -- mount(8) ---------------------------------------------------------------------------


def _mount_fuse3() -> str | None:
    for p in ("/sbin/mount.fuse3", "/usr/sbin/mount.fuse3"):
        if os.path.exists(p):
            return p
    return None


@pytest.fixture
def helper_on_default_path() -> Iterator[Path]:
    """``pyunionfs install-helper`` as the README says: a link in /usr/local/sbin, removed afterwards.

    mount(8) runs mount.fuse3 without PATH, whose /bin/sh then searches
    /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin: so a PATH
    given to mount(8) cannot point at a venv.
    """
    if os.geteuid() != 0:
        pytest.skip("mount(8) of a FUSE filesystem as here needs root")
    if _mount_fuse3() is None:
        pytest.skip("mount.fuse3 is missing (apt-get install fuse3): mount -t fuse.TYPE needs it")
    command = Path(sys.executable).with_name("pyunionfs")
    if not command.exists():
        pytest.skip(f"no pyunionfs command beside {sys.executable} (pip install -e .): nothing to link")
    link = Path(dropin.HELPER_DIR) / "pyunionfs"
    made = False
    if os.path.lexists(link):
        if os.path.realpath(link) != os.path.realpath(command):
            pytest.skip(f"{link} is another pyunionfs ({os.path.realpath(link)}); not replacing it")
    else:
        res = run(PYUNIONFS + ["install-helper"])
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == f"pyunionfs: {link} -> {command}"
        made = True
    try:
        yield link
    finally:
        if made:
            res = run(PYUNIONFS + ["install-helper", "--remove"])
            assert res.returncode == 0 and not os.path.lexists(link), res.stderr


def test_mount_t_fuse_pyunionfs(tree: Path, helper_on_default_path: Path) -> None:
    require_fuse()
    mnt = tree / "mnt"
    opts = f"lowerdir={tree}/A:{tree}/B,upperdir={tree}/U,workdir={tree}/W,nofail,_netdev,x-systemd.requires=a.mount"
    res = run(["mount", "-t", "fuse.pyunionfs", "pyunionfs", str(mnt), "-o", opts])
    assert res.returncode == 0, res.stderr
    assert is_mounted(mnt), "live when mount(8) returns"
    assert len(daemons(mnt)) == 1
    # mount.fuse3 adds dev,suid unless told nodev/nosuid, as mount(8) does for any filesystem
    assert not ({"nosuid", "nodev"} & mount_opts(mnt))
    (mnt / "new").write_text("n")
    assert (tree / "U" / "new").read_text() == "n"
    unmount_and_wait(mnt, ["umount", str(mnt)])

    res = run(["mount", "-t", "fuse.pyunionfs", "pyunionfs", str(mnt), "-o", f"lowerdir={tree}/A,ro,nodev,nosuid"])
    assert res.returncode == 0, res.stderr
    assert {"ro", "nodev", "nosuid"} <= mount_opts(mnt)
    unmount_and_wait(mnt, ["fusermount3", "-u", str(mnt)])

    res = run(["mount", "-t", "fuse.pyunionfs", "pyunionfs", str(mnt), "-o", f"lowerdir={tree}/A,frobnicate"])
    assert res.returncode != 0 and "unknown option 'frobnicate'" in res.stderr
    assert not is_mounted(mnt)


def test_remount_through_mount_fuse3_is_refused_in_one_line(tree: Path, helper_on_default_path: Path) -> None:
    """``mount -o remount,ro``: refused, saying how (unmount, mount again); the mount stays as it was."""
    require_fuse()
    mnt = tree / "mnt"
    res = run(["mount", "-t", "fuse.pyunionfs", "box", str(mnt), "-o",
               f"lowerdir={tree}/A,upperdir={tree}/U,workdir={tree}/W"])
    assert res.returncode == 0, res.stderr
    assert run(["findmnt", "-n", "-o", "SOURCE", str(mnt)]).stdout.strip() == "box"  # mount.fuse3's SOURCE
    res = run(["mount", "-o", "remount,ro", str(mnt)])
    assert res.returncode != 0
    assert f"pyunionfs: remount is not supported: unmount {mnt} and mount it again with the new options" \
        in res.stderr.splitlines(), res.stderr
    assert "ro" not in mount_opts(mnt) and len(daemons(mnt)) == 1
    (mnt / "still-writable").write_text("yes")
    unmount_and_wait(mnt, ["umount", str(mnt)])
    assert (tree / "U/still-writable").read_text() == "yes"


def test_install_helper_refuses_to_replace_a_foreign_file(tmp_path: Path) -> None:
    if not Path(sys.executable).with_name("pyunionfs").exists():
        pytest.skip(f"no pyunionfs command beside {sys.executable} (pip install -e .)")
    (tmp_path / "pyunionfs").write_text("someone else's")
    res = run(PYUNIONFS + ["install-helper", "--dir", str(tmp_path)])
    assert res.returncode == 2 and "exists and is not a link" in res.stderr
    res = run(PYUNIONFS + ["install-helper", "--dir", str(tmp_path), "--remove"])
    assert res.returncode == 2 and "not a symbolic link" in res.stderr
    assert (tmp_path / "pyunionfs").read_text() == "someone else's"
    (tmp_path / "pyunionfs").unlink()
    assert run(PYUNIONFS + ["install-helper", "--dir", str(tmp_path)]).returncode == 0
    assert os.path.realpath(tmp_path / "pyunionfs") == os.path.realpath(Path(sys.executable).with_name("pyunionfs"))
    assert run(PYUNIONFS + ["install-helper", "--dir", str(tmp_path), "--remove"]).returncode == 0
    assert not os.path.lexists(tmp_path / "pyunionfs")


# -- rootless ---------------------------------------------------------------------------


def _userns_works() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is missing (util-linux)"
    res = run(["unshare", "-Urm", "true"], timeout=30)
    if res.returncode != 0:
        return f"cannot make a user namespace here: {res.stderr.strip()}"
    return None


def _xattrs(root: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            p = os.path.join(dirpath, name) if name else dirpath
            try:
                names = os.listxattr(p, follow_symlinks=False)
            except OSError:
                continue
            out[os.path.relpath(p, root)] = {n: os.getxattr(p, n, follow_symlinks=False) for n in names}
    return out


@pytest.mark.parametrize("unmount", ["pyunionfs umount", "umount", "fusermount3 -u"])
def test_rootless_in_a_user_namespace_uses_user_xattrs(tree: Path, unmount: str) -> None:
    require_fuse()
    why = _userns_works()
    if why:
        pytest.skip(why)
    mnt, log = tree / "mnt", tree / "daemon.log"
    py = " ".join(PYUNIONFS)
    script = f"""
set -e
trap 'umount -l {mnt} 2>/dev/null || true' EXIT
{sys.executable} -c 'from pyunionfs.config import trusted_xattrs_usable as t; print("trusted", t(b"{tree}/U"))'
{py} --log {log} -o lowerdir=A:B,upperdir=U,workdir=W,volatile {mnt}
grep -q " {mnt} " /proc/self/mountinfo
echo x > {mnt}/f
rm {mnt}/g
rm {mnt}/d/inner
rmdir {mnt}/d
mkdir {mnt}/d
echo new > {mnt}/d/file
cat {mnt}/f
{py + " umount" if unmount == "pyunionfs umount" else unmount} {mnt}
echo done
"""
    res = run(["unshare", "-Urm", "sh", "-c", script], cwd=tree, timeout=90)
    wait_until(lambda: daemons(mnt) == [], 20, "the daemon in the user namespace to exit")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.split() == ["trusted", "False", "x", "done"], res.stdout + res.stderr
    text = log.read_text() if log.exists() else ""
    assert "Traceback" not in text, text
    up = tree / "U"
    assert (up / "f").read_text() == "x\n"
    st = (up / "g").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, "rm of a lower file leaves a 0/0 whiteout"
    xattrs = _xattrs(up)
    assert xattrs["d"].get("user.overlay.opaque") == b"y", xattrs
    assert "user.overlay.origin" in xattrs["f"], xattrs  # copied up from A, with the kernel's record
    assert not [(p, n) for p, names in xattrs.items() for n in names if n.startswith("trusted.")], xattrs
    assert (up / "d" / "file").read_text() == "new\n"
    # and the host's root, privileged, still gets trusted.* (the probe writes nothing)
    from pyunionfs.config import trusted_xattrs_usable

    if os.geteuid() == 0:
        assert trusted_xattrs_usable(os.fsencode(str(up))) is True
    assert "trusted.pyunionfs.probe" not in os.listxattr(up)


def test_trusted_probe_leaves_nothing(tmp_path: Path) -> None:
    from pyunionfs.config import trusted_xattrs_usable

    before = os.listxattr(tmp_path)
    trusted_xattrs_usable(os.fsencode(str(tmp_path)))
    assert os.listxattr(tmp_path) == before


@pytest.mark.parametrize("flag", ["-f", "-d"])
def test_foreground_flags_keep_the_daemon_in_front(tree: Path, flag: str) -> None:
    require_fuse()
    mnt = tree / "mnt"
    proc = subprocess.Popen(PYUNIONFS + [flag, "-o", f"lowerdir={tree}/A,upperdir={tree}/U", str(mnt)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: is_mounted(mnt), 20, "the foreground mount", proc)
        assert (mnt / "f").read_text() == "A"
        assert (tree / ".U.pyunionfs-work").is_dir(), "no workdir= given: the default one"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert not is_mounted(mnt)
        assert b"Traceback" not in err
        if flag == "-d":
            assert b"DEBUG" in err or b"unique:" in err, "-d logs every request"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
