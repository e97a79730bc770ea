"""The kernel's overlayfs is the oracle: same layers, same merged tree.

Random layer stacks (files, dirs, symlinks, hardlinks, fifos, xattrs, whiteouts
and opaque dirs in the kernel's formats; see tests/support/layergen.py) are
mounted once with ``mount -t overlay`` and once with pyunionfs, and the two
trees must be identical in names, types, modes, owners, sizes, contents,
symlink targets, xattrs and hardlink grouping.

OCI layers (``.wh.`` files) have no kernel counterpart: the stack is converted
to OCI format, mounted by pyunionfs, and compared with the kernel's view of the
kernel-format original, which is the expected tree.
"""

from __future__ import annotations

import os

import pytest

from tests.support.layergen import build_stack, kernel_mounted, to_oci
from tests.support.mounting import EACH_ENGINE
from tests.support.treesnap import diff, snapshot

#: Run on both FUSE engines: each must agree with the kernel.
pytestmark = EACH_ENGINE

SEEDS = range(int(os.environ.get("PYUNIONFS_DIFF_SEEDS", "12")))
VARIANTS = ["upper", "lowers-only", "userxattr", "oci", "oci-lowers-only"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_merged_tree_matches_kernel(tmp_path, mount, seed: int, variant: str) -> None:
    with_upper = "lowers-only" not in variant
    stack = build_stack(
        tmp_path / "stack", seed, n_lowers=3, upper=with_upper,
        xattr_ns="user" if variant == "userxattr" else "trusted",
    )
    ours = to_oci(stack, tmp_path / "oci") if variant.startswith("oci") else stack
    kmnt = tmp_path / "kernel"
    kmnt.mkdir()
    with kernel_mounted(stack, kmnt):
        expected = snapshot(kmnt)
    options = ["userxattr"] if variant == "userxattr" else []
    d = mount(list(ours.lowers), ours.upper, *options)
    got = snapshot(d.mnt)
    problems = diff(expected, got)
    assert not problems, f"seed {seed} {variant}: kernel (A) vs pyunionfs (B):\n" + "\n".join(problems)
    assert len(got) > 20, "the generator should make non-trivial trees"
