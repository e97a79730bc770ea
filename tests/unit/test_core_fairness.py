"""No caller can starve the others, and what they may see depends on who they are.

* ``trusted.*`` xattrs: only a caller with CAP_SYS_ADMIN lists, reads or
  changes them (pyunionfs/callers.py decides from /proc, of real processes here).
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from pyunionfs.callers import Caller, has_sys_admin

from .conftest import mkfile
from .test_core_writes import ALICE, env, ino_of  # noqa: F401  (env is a fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown, trusted.* xattrs, setpriv")

def errno_of(call, *args) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


# -- trusted.* by capability ----------------------------------------------------------------------------


def _process(*setpriv: str) -> subprocess.Popen:
    """A real process with the credentials *setpriv* gives it, waiting to be asked about."""
    proc = subprocess.Popen(["setpriv", *setpriv, "--", "sh", "-c", "echo ready; exec sleep 60"],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"  # its credentials are set
    return proc


def test_capability_is_read_from_the_callers_process() -> None:
    plain = _process("--reuid=1000", "--regid=1000", "--clear-groups")
    capless_root = _process("--inh-caps=-sys_admin", "--bounding-set=-sys_admin")
    try:
        assert has_sys_admin(os.getpid(), 0)
        assert not has_sys_admin(plain.pid, 1000)
        assert not has_sys_admin(capless_root.pid, 0), "root without CAP_SYS_ADMIN is not capable"
        assert has_sys_admin(0, 0) and not has_sys_admin(0, 1000)  # unknown pid: uid 0 stands for it
        # Another uid than the request's: the id was reused; the request's uid decides.
        assert has_sys_admin(plain.pid, 0) and not has_sys_admin(os.getpid(), 1000)
    finally:
        for p in (plain, capless_root):
            p.kill()
            p.wait()


async def test_trusted_xattrs_only_for_callers_with_cap_sys_admin(env):  # noqa: F811
    f = mkfile(env.l1 / "f", b"x")
    os.setxattr(f, "trusted.t", b"1")
    os.setxattr(f, "user.u", b"2")
    fs = env.mount()
    ino = ino_of(fs, "f")
    capless_root = _process("--inh-caps=-sys_admin", "--bounding-set=-sys_admin")
    try:
        unprivileged = (ALICE, Caller(0, 0, 0, capless_root.pid))
        for caller in unprivileged:
            assert fs.listxattr(ino, caller) == [b"user.u"]
            assert errno_of(fs.getxattr, ino, b"trusted.t", caller) == errno.ENODATA
            assert fs.getxattr(ino, b"user.u", caller) == b"2"
            assert errno_of(fs.setxattr, ino, b"trusted.t", b"3", 0, caller) == errno.EPERM
            assert errno_of(fs.removexattr, ino, b"trusted.t", caller) == errno.EPERM
        assert not (env.u / "f").exists(), "a refused change copied the file up"
        me = Caller(0, 0, 0, os.getpid())
        assert sorted(fs.listxattr(ino, me)) == [b"trusted.t", b"user.u"]
        assert fs.getxattr(ino, b"trusted.t", me) == b"1"
        fs.setxattr(ino, b"trusted.t", b"3", 0, me)
        assert os.getxattr(env.u / "f", "trusted.t") == b"3"
    finally:
        capless_root.kill()
        capless_root.wait()
