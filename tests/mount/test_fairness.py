"""``trusted.*`` stays hidden from callers who may not see it.

* ``listxattr`` shows ``trusted.*`` only to callers with CAP_SYS_ADMIN, as the kernel's overlayfs:
  compared with it as a plain user, as root without CAP_SYS_ADMIN and as root, with system calls,
  a dump as ``getfattr -d -m -`` makes it (each listed name read back) and with ``cp -a`` and
  ``tar --xattrs``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.mounting import BOTH_ENGINES, Daemon
from tests.support.writecheck import on_kernel_and_ours, public_dir, put

Mount = Callable[..., Daemon]

# -- trusted.* by capability, against the kernel ----------------------------------------------------

#: Each xattr call of a caller on a lower file and on an upper one, a dump of every listed name,
#: then cp -a and tar --xattrs: their exit status and whether they complained.
_XATTR_PROBE = r"""
import errno, json, os, subprocess, sys
m, dest = sys.argv[1], sys.argv[2]
def e(fn, *a):
    try:
        r = fn(*a)
    except OSError as x:
        return errno.errorcode.get(x.errno, str(x.errno))
    return sorted(r) if isinstance(r, list) else (r.decode() if isinstance(r, bytes) else "ok")
out = {}
for name in ("lowerfile", "upperfile"):
    p = f"{m}/{name}"
    out[name] = {"list": e(os.listxattr, p), "get": e(os.getxattr, p, "trusted.t"),
                 "get_missing": e(os.getxattr, p, "trusted.none"), "get_user": e(os.getxattr, p, "user.u"),
                 "set": e(os.setxattr, p, "trusted.t", b"new"), "set_new": e(os.setxattr, p, "trusted.n", b"1"),
                 "remove": e(os.removexattr, p, "trusted.t"), "remove_missing": e(os.removexattr, p, "trusted.none")}
cp = subprocess.run(["cp", "-a", f"{m}/lowerfile", f"{dest}/copy"], capture_output=True, text=True)
# getfattr -d -m -: every listed name read back (a listed name that cannot be read is an error).
out["dump"] = {n: e(os.getxattr, f"{m}/lowerfile", n) for n in os.listxattr(f"{m}/lowerfile")}
out["cp -a"] = [cp.returncode, cp.stderr.replace(m, "MNT")]
tar = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-cf", f"{dest}/t.tar", "-C", m, "lowerfile"],
                     capture_output=True, text=True)
out["tar --xattrs"] = [tar.returncode, tar.stderr.replace(m, "MNT")]
print(json.dumps(out))
"""

#: setpriv arguments of each identity the probe runs as.
_WHO = {
    "uid 1000": ["--reuid=1000", "--regid=1000", "--clear-groups"],
    "root without CAP_SYS_ADMIN": ["--inh-caps=-sys_admin", "--bounding-set=-sys_admin"],
    "root": [],
}


def _xattr_lower(low: Path) -> None:
    put(low / "lowerfile", b"l")
    os.setxattr(low / "lowerfile", "trusted.t", b"lower")
    os.setxattr(low / "lowerfile", "user.u", b"u")


def _xattr_story(m: Path) -> dict[str, object]:
    (m / "upperfile").write_bytes(b"u")
    os.setxattr(m / "upperfile", "trusted.t", b"upper")
    os.setxattr(m / "upperfile", "user.u", b"u")
    os.chmod(m / "upperfile", 0o666)
    out: dict[str, object] = {}
    with public_dir("pyunionfs-dest-") as dest:
        for who, args in _WHO.items():
            os.chmod(dest, 0o777)
            res = subprocess.run(["setpriv", *args, "--", sys.executable, "-c", _XATTR_PROBE, str(m), str(dest)],
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, f"the probe as {who} failed:\n{res.stderr}"
            out[who] = json.loads(res.stdout)
            for leftover in dest.iterdir():
                leftover.unlink()
    return out


@BOTH_ENGINES
@pytest.mark.timeout(180)
def test_trusted_xattrs_are_the_kernels_business_by_capability(tmp_path: Path, mount: Mount) -> None:
    with public_dir() as pub:
        results = on_kernel_and_ours(tmp_path, mount, _xattr_lower, _xattr_story, mnt_parent=pub)
    kernel, ours = results["kernel"], results["pyunionfs"]
    # What the kernel says (so that the comparison below compares the right thing).
    plain = kernel["uid 1000"]["lowerfile"]
    assert plain["list"] == ["user.u"] and plain["get"] == "ENODATA" and plain["set"] == "EPERM"
    assert kernel["root"]["lowerfile"]["list"] == ["trusted.t", "user.u"]
    assert kernel["uid 1000"]["cp -a"] == [0, ""]
    for who in _WHO:
        assert ours[who] == kernel[who], f"as {who}:\n  kernel    {kernel[who]}\n  pyunionfs {ours[who]}"
