"""Images from the store, mounted: ``mount image:NAME[:TAG]``, and ``commit --from`` back.

Why: the store's promise is that an image pulled from a layout, mounted,
shows the tree the image means (its layers applied one over the other,
whiteouts obeyed), and that what is changed in a container made from it
comes back as an image that shows the same tree, wherever it is pushed and
pulled again.  The oracle is ``apply --flatten`` of the layer tars, and the
merged view the mount itself showed before the commit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyunionfs.image.layerapply import apply_layer
from pyunionfs.image.store import Store
from tests.support.ocigen import app_tree, base_tree, make_layer, write_layout
from tests.support.treesnap import Snapshot, diff, snapshot

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: whiteout devices, trusted xattrs"),
    pytest.mark.timeout(120),
]


def _tree(root: Path, *, mtime: bool = False) -> Snapshot:
    """What a user sees below *root* (not the root itself: a mountpoint's root is the mount's)."""
    return snapshot(root, mtime=mtime).subset(lambda path, _: path != b".")


def _cli(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "pyunionfs", *args], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture
def image(tmp_path: Path) -> tuple[str, Path]:
    """A two-layer image pulled into a store whose path holds a ':' (lower lists escape it);
    returns (store, the flattened tree it must show)."""
    out = tmp_path / "tars"
    layers = [make_layer(base_tree(tmp_path / "base"), out), make_layer(app_tree(tmp_path / "app"), out)]
    write_layout(tmp_path / "lay", layers, "v1")
    store = str(tmp_path / "st:ore")
    _cli("pull", f"{tmp_path}/lay:v1", "--tag", "app:v1", "--store", store)
    want = tmp_path / "want"
    for lb in layers:
        apply_layer(str(lb.tar), str(want), mode="flatten")
    return store, want


def test_mount_image_shows_its_layers(tmp_path: Path, image: tuple[str, Path], mount) -> None:
    store, want = image
    d = mount("image:app:v1", None, extra_args=["--store", store])
    assert diff(_tree(want, mtime=True), _tree(d.mnt, mtime=True)) == []
    assert not (d.mnt / "usr" / "share" / "doc").exists()  # deleted by the top layer
    assert (d.mnt / "etc" / "motd").read_bytes() == b"welcome to app\n"
    d.stop()


def test_commit_from_a_mounted_image_round_trip(tmp_path: Path, image: tuple[str, Path], mount) -> None:
    store, _ = image
    upper = tmp_path / "upper"
    upper.mkdir()
    d = mount("image:app:v1", upper, extra_args=["--store", store])
    (d.mnt / "etc" / "motd").write_bytes(b"changed in the container\n")
    os.unlink(d.mnt / "bin" / "tool")
    shutil.rmtree(d.mnt / "srv")
    (d.mnt / "srv").mkdir()
    (d.mnt / "srv" / "new").write_bytes(b"new\n")
    seen = _tree(d.mnt)
    d.stop()

    out = _cli("commit", str(upper), "--from", "app:v1", "--tag", "app:v2", "-m", "edit motd", "--store", store)
    name, _, diff_id = out.split()
    assert name == "app:v2"
    hist = _cli("history", "app:v2", "--store", store).splitlines()
    assert hist[1].startswith(diff_id[7:19]) and "edit motd" in hist[1]
    assert len(hist) == 4  # header, the commit, the two layers of app:v1

    d2 = mount("image:app:v2", None, extra_args=["--store", store])
    assert diff(seen, _tree(d2.mnt)) == []
    d2.stop()

    # export, import into a fresh store, mount again: the same tree
    _cli("push", "app:v2", str(tmp_path / "exported"), "--store", store)
    store2 = str(tmp_path / "store2")
    _cli("pull", str(tmp_path / "exported"), "--store", store2)
    assert Store(store2).image("app:v2").manifest_digest == Store(store).image("app:v2").manifest_digest
    d3 = mount("image:app:v2", None, extra_args=["--store", store2])
    assert diff(seen, _tree(d3.mnt)) == []
    d3.stop()


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed: no third-party reader to compare")
def test_umoci_unpack_agrees(tmp_path: Path, image: tuple[str, Path], mount) -> None:
    store, _ = image
    _cli("push", "app:v1", f"{tmp_path}/pushed:v1", "--store", store)
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{tmp_path}/pushed:v1", str(bundle)], check=True,
                   capture_output=True, timeout=60)
    d = mount("image:app:v1", None, extra_args=["--store", store])
    assert diff(_tree(bundle / "rootfs"), _tree(d.mnt)) == []
    d.stop()
