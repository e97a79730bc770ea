#!/usr/bin/env bash
# Install what pyunionfs needs on a fresh Debian 12 machine (as root), into ./.venv.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# pyunionfs itself is pure Python and needs only fuse3 (fusermount3, for users'
# mounts); libfuse3-dev, pkg-config and gcc build pyfuse3, the reference
# engine that the test extra installs; fuse-overlayfs is the tests' oracle for
# the options taken from it (tests/mount/test_idmap.py); docker-registry (the
# CNCF distribution registry), skopeo and htpasswd (apache2-utils, the bcrypt
# lines the registry's basic auth reads) serve tests/mount/test_registry.py, with openssl for its
# certificates and signed tokens.
need=()
for pkg in libfuse3-dev fuse3 pkg-config gcc fuse-overlayfs docker-registry skopeo apache2-utils openssl; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
# buildah, runc (crun 1.8 refuses hybrid cgroups), uidmap (newuidmap) and busybox-static (the image's
# only program) build an image rootless with pyunionfs as mount_program in
# tests/mount/test_buildah.py.
for pkg in buildah runc uidmap busybox-static; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
# Debian's own python3 needs these for a venv (and to build pyfuse3's C extension).
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
python3 - <<'PY' 2>/dev/null || need+=(python3-dev)
import os, sysconfig
assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
PY
if [ ${#need[@]} -gt 0 ]; then
    echo "install.sh: apt-get install ${need[*]}" >&2
    apt-get update -q
    # docker-registry's postinst starts a registry on :5000 through invoke-rc.d
    # (and fails the install where it cannot): the tests start their own, so
    # packages start no service here, as in a container build.
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e .
# Byte-compiled now, as a regular (non-editable) install is: where the
# environment sets PYTHONDONTWRITEBYTECODE, every command would otherwise
# compile the package from source, about 60 ms of each mount.
.venv/bin/python -m compileall -q pyunionfs
echo "install.sh: pyunionfs installed in $(pwd)/.venv ($(.venv/bin/pyunionfs --version 2>/dev/null || echo ok))" >&2
