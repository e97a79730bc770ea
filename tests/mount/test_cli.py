"""The command line: background mounts, failures, unmounting, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.mounting import Daemon, force_unmount, is_mounted, require_fuse, wait_until
from tests.support.writecheck import public_dir

PYUNIONFS = [sys.executable, "-m", "pyunionfs"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(PYUNIONFS + list(args), capture_output=True, text=True, timeout=60, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def daemon_pids(mnt: Path) -> list[int]:
    """Processes whose command line names *mnt* (the background daemon)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pyunionfs" in cmd and os.fsencode(str(mnt)) in cmd:
            pids.append(int(pid))
    return pids


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    lower1, lower2, upper, mnt = (tmp_path / n for n in ("l1", "l2", "up", "mnt"))
    for d in (lower1, lower2, upper, mnt):
        d.mkdir()
    (lower2 / "f").write_text("lower2")
    (lower1 / "f").write_text("lower1")
    (lower2 / "g").write_text("g")
    yield lower1, lower2, upper, mnt
    force_unmount(mnt)


def test_background_mount_is_live_on_return_and_umount_ends_daemon(layers) -> None:
    require_fuse()
    lower1, lower2, upper, mnt = layers
    res = run("mount", f"{lower1}:{lower2}", str(upper), str(mnt))
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""
    # usable on the very next line: no waiting
    assert (mnt / "f").read_text() == "lower1"
    assert sorted(os.listdir(mnt)) == ["f", "g"]
    pids = daemon_pids(mnt)
    assert len(pids) == 1
    res = run("umount", str(mnt))
    assert res.returncode == 0, res.stderr
    assert not is_mounted(mnt)
    wait_until(lambda: not Path(f"/proc/{pids[0]}").exists() or _zombie(pids[0]), 10, "the daemon to exit")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def test_relative_paths_and_escaped_colons(tmp_path) -> None:
    require_fuse()
    weird = tmp_path / "odd:name\\x"
    plain = tmp_path / "plain"
    mnt = tmp_path / "mnt"
    for d in (weird, plain, mnt):
        d.mkdir()
    (weird / "w").write_text("w")
    (plain / "p").write_text("p")
    escaped = "odd\\:name\\\\x"
    res = run("mount", f"{escaped}:plain", "", "mnt", cwd=tmp_path)
    try:
        assert res.returncode == 0, res.stderr
        assert sorted(os.listdir(mnt)) == ["p", "w"]
    finally:
        run("umount", str(mnt))
        force_unmount(mnt)


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing-lower", "does not exist"),
        ("lower-is-file", "is not a directory"),
        ("missing-mountpoint", "does not exist"),
        ("same-layer-twice", "given twice"),
        ("unknown-option", "unknown option"),
        ("misspelt-option", "unknown option 'timout' (did you mean 'timeout'?)"),
        ("flag-with-a-value", "option 'userxattr' takes no value"),
        ("already-mounted", "already a mount point"),
        ("upper-in-lower", "must not nest"),
        ("mountpoint-in-lower", "must not nest"),
        ("workdir-in-lower", "must be outside the layers"),
        ("workdir-in-mountpoint", "must be outside the layers"),
        ("workdir-on-other-fs", "is not on the upper's filesystem"),
        ("upper-is-file", "is not a directory"),
        ("missing-upper", "does not exist"),
        ("mountpoint-is-file", "is not a directory"),
        ("bad-timeout", "timeout must be a number of seconds"),
    ],
)
def test_failed_mount_says_one_line_and_leaves_nothing(layers, case, expect) -> None:
    require_fuse()
    lower1, lower2, upper, mnt = layers
    args = ["mount", f"{lower1}:{lower2}", str(upper), str(mnt)]
    if case == "missing-lower":
        args[1] = f"{lower1}:{lower2}/nope"
    elif case == "lower-is-file":
        args[1] = f"{lower1}:{lower2 / 'f'}"
    elif case == "missing-mountpoint":
        args[3] = str(mnt / "nope")
    elif case == "same-layer-twice":
        args[1] = f"{lower1}:{lower1}"
    elif case == "unknown-option":
        args += ["-o", "frobnicate"]
    elif case == "misspelt-option":
        args += ["-o", "ro,timout=5"]
    elif case == "flag-with-a-value":
        args += ["-o", "userxattr=1"]
    elif case == "upper-in-lower":
        (lower1 / "sub").mkdir()
        args[2] = str(lower1 / "sub")
    elif case == "mountpoint-in-lower":
        (lower1 / "sub").mkdir()
        args[3] = str(lower1 / "sub")
    elif case == "workdir-in-lower":
        args += ["-o", f"workdir={lower1}/work"]
    elif case == "workdir-in-mountpoint":
        args += ["-o", f"workdir={mnt}/work"]
    elif case == "workdir-on-other-fs":
        args += ["-o", "workdir=/dev/shm/pyunionfs-test-work"]
    elif case == "upper-is-file":
        args[2] = str(lower2 / "f")
    elif case == "missing-upper":
        args[2] = str(upper / "nope")
    elif case == "mountpoint-is-file":
        args[3] = str(lower2 / "g")
    elif case == "bad-timeout":
        args += ["-o", "timeout=soon"]
    daemon = None
    if case == "already-mounted":
        daemon = Daemon([lower1], None, mnt)
    try:
        res = run(*args)
        assert res.returncode != 0
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pyunionfs: ") and expect in lines[0], res.stderr
        if daemon is None:
            assert not is_mounted(mnt)
        work = upper.parent / f".{upper.name}.pyunionfs-work"
        assert not work.exists() and not Path("/dev/shm/pyunionfs-test-work").exists(), "a failed mount left a work dir"
    finally:
        if daemon is not None:
            daemon.stop()


def test_umount_refuses_what_is_not_ours(tmp_path) -> None:
    res = run("umount", str(tmp_path))
    assert res.returncode == 1 and "is not mounted" in res.stderr
    res = run("umount", "/proc")
    assert res.returncode == 1 and "not a pyunionfs mount" in res.stderr


@pytest.mark.parametrize("how", ["fusermount3", "umount", "pyunionfs", "SIGTERM", "SIGINT"])
def test_every_way_of_unmounting_exits_zero(layers, how) -> None:
    lower1, lower2, upper, mnt = layers
    d = Daemon([lower1, lower2], upper, mnt)
    assert (mnt / "g").read_text() == "g"
    if how.startswith("SIG"):
        d.proc.send_signal(getattr(signal, how))
        assert d.proc.wait(timeout=30) == 0
        assert not is_mounted(mnt), "the daemon must unmount itself on a signal"
        assert d.stop() == 0
    else:
        cmd = {
            "fusermount3": ["fusermount3", "-u", str(mnt)],
            "umount": ["umount", str(mnt)],
            "pyunionfs": PYUNIONFS + ["umount", str(mnt)],
        }[how]
        assert d.stop(how=cmd) == 0
    assert not is_mounted(mnt)


def test_mount_raises_readahead(layers) -> None:
    """Cold sequential reads want a larger readahead than FUSE's 128 KiB default."""
    require_fuse()
    from pyunionfs.fuse.mountinfo import READ_AHEAD_KB, find_mount

    lower1, lower2, upper, mnt = layers
    res = run("mount", f"{lower1}:{lower2}", str(upper), str(mnt))
    assert res.returncode == 0, res.stderr
    found = find_mount(os.fsencode(str(mnt)))
    assert found is not None
    knob = Path(f"/sys/class/bdi/{found[1]}/read_ahead_kb")
    wait_until(lambda: knob.read_text().strip() == str(READ_AHEAD_KB), 10, "readahead to be raised")
    assert run("umount", str(mnt)).returncode == 0


def test_a_user_who_cannot_mount_is_told_what_to_do() -> None:
    """/dev/fuse closed to users (as on this kind of machine): the one line names the fix."""
    if os.stat("/dev/fuse").st_mode & 0o006 == 0o006:
        pytest.skip("/dev/fuse is open to every user here: users may mount")
    with public_dir() as pub:
        lower, mnt = pub / "lower", pub / "mnt"
        for d in (lower, mnt):
            d.mkdir()
            os.chown(d, 1000, 1000)
        res = subprocess.run(["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups", *PYUNIONFS,
                              "mount", str(lower), "", str(mnt)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 1, res.stderr
        assert res.stderr.startswith("pyunionfs: /dev/fuse is not readable and writable for this user: mount as root")
        assert len(res.stderr.splitlines()) == 1
        assert not is_mounted(mnt)


def test_a_machine_without_dev_fuse_is_told_what_to_do(layers) -> None:
    """In a mount namespace whose /dev lacks fuse: one line saying how to get it, nothing mounted."""
    lower1, _, upper, mnt = layers
    script = f"mount -t tmpfs tmpfs /dev && exec {' '.join(PYUNIONFS)} mount {lower1} {upper} {mnt}"
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert res.stderr == ("pyunionfs: /dev/fuse is missing: load the fuse module (modprobe fuse) "
                          "or run with --device /dev/fuse\n")
    assert not is_mounted(mnt)
    assert not (upper.parent / f".{upper.name}.pyunionfs-work").exists()


def test_log_is_relative_to_the_callers_directory(layers, tmp_path) -> None:
    """--log rel.log lands in the caller's directory, not in / where the daemon moves."""
    require_fuse()
    lower1, lower2, upper, mnt = layers
    assert not Path("/rel-h15.log").exists()
    try:
        res = run("mount", f"{lower1}:{lower2}", str(upper), str(mnt), "--log", "rel-h15.log", "-o", "debug",
                  cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert (mnt / "f").read_text() == "lower1"
        assert run("umount", str(mnt)).returncode == 0
        assert not Path("/rel-h15.log").exists()
        assert "DEBUG" in (tmp_path / "rel-h15.log").read_text()
        assert "rel-h15.log" in os.listdir(tmp_path)
    finally:
        Path("/rel-h15.log").unlink(missing_ok=True)
    res = run("mount", f"{lower1}:{lower2}", str(upper), str(mnt), "--log", str(tmp_path / "no/such.log"))
    assert res.returncode == 1
    assert res.stderr == f"pyunionfs: log file {tmp_path}/no/such.log: No such file or directory\n"
    assert not is_mounted(mnt)


def test_debug_implies_foreground_as_documented(layers) -> None:
    require_fuse()
    lower1, lower2, upper, mnt = layers
    assert "implies -f" in run("mount", "--help").stdout
    proc = subprocess.Popen(PYUNIONFS + ["mount", f"{lower1}:{lower2}", str(upper), str(mnt), "--debug"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: is_mounted(mnt), 20, "the --debug mount", proc)
        assert (mnt / "g").read_text() == "g"
        proc.send_signal(signal.SIGTERM)  # a foreground daemon: the command itself serves the mount
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert not is_mounted(mnt)
        assert b"DEBUG" in err and b"Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_remount_is_refused_in_one_line(layers) -> None:
    lower1, lower2, upper, mnt = layers
    res = run("mount", f"{lower1}:{lower2}", str(upper), str(mnt), "-o", "remount,ro")
    assert res.returncode == 2
    assert res.stderr == f"pyunionfs: remount is not supported: unmount {mnt} and mount it again with the new options\n"
    assert not is_mounted(mnt)
