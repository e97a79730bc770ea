"""The native engine's life as users meet it: installed without a compiler, mounted by a
plain user through fusermount3, ended by every unmount command and by signals.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from pyunionfs.fuse.mountinfo import find_mount
from tests.support.mounting import is_mounted, require_fuse
from tests.support.writecheck import public_dir, put

ROOT = Path(__file__).resolve().parents[2]


def _tree_copy(dest: Path) -> Path:
    """The project's files (what a clone has, plus new files not yet committed), so a build writes
    nothing into ROOT."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
    return dest


@pytest.mark.timeout(600)
def test_pip_install_needs_no_compiler_and_the_mount_works(tmp_path: Path) -> None:
    require_fuse()
    src = _tree_copy(tmp_path / "src")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # No compiler anywhere: PATH has only the venv, and CC fails.
    env = {"PATH": str(env_dir / "bin"), "CC": "/bin/false", "HOME": str(tmp_path), "PIP_NO_INPUT": "1"}
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONFIG_FILE"):
        if key in os.environ:
            env[key] = os.environ[key]
    res = subprocess.run([py, "-m", "pip", "install", "-q", str(src)], env=env, capture_output=True, text=True,
                         timeout=500)
    assert res.returncode == 0, res.stderr
    probe = subprocess.run([py, "-c", "import importlib.util as u; print(u.find_spec('pyfuse3'), u.find_spec('trio'))"],
                           env=env, capture_output=True, text=True)
    assert probe.stdout.split() == ["None", "None"], "the default install pulled in a compiled dependency"
    exe = env_dir / "bin" / "pyunionfs"
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    put(lower / "f", b"from the lower")
    upper.mkdir()
    mnt.mkdir()
    env["PATH"] = f"{env_dir / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin"  # umount, fusermount3
    res = subprocess.run([exe, "mount", lower, upper, mnt], env=env, capture_output=True, text=True, timeout=60)
    try:
        assert res.returncode == 0, res.stderr
        assert (mnt / "f").read_bytes() == b"from the lower"
        (mnt / "g").write_bytes(b"new")
    finally:
        res = subprocess.run([exe, "umount", mnt], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (upper / "g").read_bytes() == b"new"
    assert find_mount(os.fsencode(mnt)) is None


@pytest.mark.timeout(120)
def test_a_plain_user_mounts_through_fusermount3_without_passthrough(tmp_path: Path) -> None:
    """uid 1000 mounts, uses and unmounts; in a private mount namespace whose /dev/fuse is 0666 (as
    Debian ships it; this machine kind has 0600, which keeps users out whatever the daemon does)."""
    require_fuse()
    with public_dir() as pub:
        for d in ("lower", "upper", "work", "mnt"):
            (pub / d).mkdir()
            os.chown(pub / d, 1000, 1000)
        put(pub / "lower" / "f", b"users lower")
        os.chown(pub / "lower" / "f", 1000, 1000)
        m = str(pub / "mnt")
        # The interpreter lives where uid 1000 cannot read: everything is imported before dropping to it
        # (socket too: the engine imports it only for a user's mount).
        code = f"""
import os, socket, subprocess, sys, time
import pyunionfs.cli.commands, pyunionfs.fuse.mount, pyunionfs.fuse.control, pyunionfs.fuse.server
os.setgroups([]); os.setgid(1000); os.setuid(1000)
m = {m!r}
rc = pyunionfs.cli.commands.main(["mount", {str(pub / "lower")!r}, {str(pub / "upper")!r}, m,
                         "-o", "workdir={pub / "work"}"])
assert rc == 0, rc
with open(m + "/new", "wb") as f:
    f.write(b"written by 1000")
print(open(m + "/f", "rb").read().decode(), open(m + "/new", "rb").read().decode(),
      pyunionfs.fuse.control.stats(m.encode())["passthrough_opens"])
print(next(ln for ln in open("/proc/self/mountinfo") if ln.split()[4] == m).strip())
subprocess.run(["fusermount3", "-u", m], check=True)
deadline = time.monotonic() + 20
while pyunionfs.fuse.mount.find_mount(m.encode()) is not None and time.monotonic() < deadline:
    time.sleep(0.01)
print("gone" if pyunionfs.fuse.mount.find_mount(m.encode()) is None else "still mounted")
"""
        dev = tmp_path / "dev"
        dev.mkdir()
        setup = (f"mount -t tmpfs -o mode=0755 none {dev} && mknod -m 0666 {dev}/fuse c 10 229 && "
                 f"mount --bind {dev}/fuse /dev/fuse && exec {sys.executable} -c \"$0\"")
        res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", setup, code],
                             capture_output=True, text=True, timeout=90, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        data, line, gone = res.stdout.splitlines()[-3:]
        assert data == "users lower written by 1000 0"  # no passthrough for a user
        assert "user_id=1000" in line and "nosuid" in line and "nodev" in line
        assert gone == "gone"
        assert (pub / "upper" / "new").read_bytes() == b"written by 1000"
        assert os.stat(pub / "upper" / "new").st_uid == 1000


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_unmounts_and_the_daemon_exits_zero(tmp_path: Path, mount, sig: int) -> None:
    lower = tmp_path / "lower"
    put(lower / "f", b"x")
    (tmp_path / "upper").mkdir()
    d = mount([lower], tmp_path / "upper")
    assert (d.mnt / "f").read_bytes() == b"x"
    d.proc.send_signal(sig)
    assert d.proc.wait(timeout=30) == 0
    assert not is_mounted(d.mnt)
    assert "Traceback" not in d.log_text()


@pytest.mark.timeout(120)
def test_an_aborted_connection_ends_the_daemon_like_an_unmount(tmp_path: Path, mount) -> None:
    lower = tmp_path / "lower"
    put(lower / "f", b"x")
    (tmp_path / "upper").mkdir()
    d = mount([lower], tmp_path / "upper")
    assert (d.mnt / "f").read_bytes() == b"x"
    conns = Path("/sys/fs/fuse/connections")
    mounted_here = not any(conns.iterdir())
    if mounted_here:
        subprocess.run(["mount", "-t", "fusectl", "none", str(conns)], check=True, capture_output=True)
    try:
        found = find_mount(os.fsencode(d.mnt))
        assert found is not None
        (conns / found[1].split(":")[1] / "abort").write_text("1")
    finally:
        if mounted_here:
            subprocess.run(["umount", str(conns)], capture_output=True)
    assert d.proc.wait(timeout=30) == 0
    assert "aborted the FUSE connection" in d.log_text()
    with pytest.raises(OSError) as dead:
        os.stat(d.mnt / "f")
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    subprocess.run(["umount", str(d.mnt)], check=True, capture_output=True, timeout=30)
    assert not is_mounted(d.mnt)
