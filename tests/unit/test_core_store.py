"""The layer store, without FUSE: pull, push, images, history, rmi, commit --tag.

Why these tests: a store is only useful if what comes out is what went in
(digests survive pull -> push -> pull), if layers are shared rather than
copied (two images on one base use one directory), and if bad input or a
crash never leaves anything a later mount would use: a corrupted or
truncated blob is refused with the store unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyunionfs import cli
from pyunionfs.errors import ImageError, LayerError, StoreError, UsageError
from pyunionfs.image.layerapply import apply_layer
from pyunionfs.image.ocilayout import split_layout_arg
from pyunionfs.image.listing import format_history, format_images
from pyunionfs.image.progress import Progress, human
from pyunionfs.image.records import default_store, parse_ref
from pyunionfs.image.store import Store
from tests.support.ocigen import LayerBlob, app_tree, base_tree, make_layer, put, whiteout, write_layout
from tests.support.treesnap import Snapshot, diff, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: whiteout devices, trusted xattrs")


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, LayerBlob]:
    """base, and two different layers on top of it (app1, app2)."""
    out = tmp_path / "tars"
    return {
        "base": make_layer(base_tree(tmp_path / "base"), out),
        "app1": make_layer(app_tree(tmp_path / "app1", "one"), out),
        "app2": make_layer(app_tree(tmp_path / "app2", "two"), out),
    }


def _same(a: Path | str, b: Path | str) -> list[str]:
    """Differences between two unpacked layers: everything, mtimes too except where a
    layer has none to give (the root, and whiteout devices made by apply)."""
    def timed(root: Path | str) -> Snapshot:
        return snapshot(root, mtime=True).subset(lambda path, e: path != b"." and not (e.kind == "chr" and e.rdev == 0))

    return diff(snapshot(a), snapshot(b)) + diff(timed(a), timed(b))


def _store_contents(store: Path) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(store / sub)) for sub in ("blobs/sha256", "layers", "images", "tmp")}


def _empty(store: Path) -> bool:
    return all(not v for v in _store_contents(store).values())


def _cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# -- names --------------------------------------------------------------------------


def test_parse_ref() -> None:
    assert parse_ref("alpine") == "alpine:latest"
    assert parse_ref("alpine:3.19") == "alpine:3.19"
    assert parse_ref("localhost:5000/app") == "localhost:5000/app:latest"
    assert parse_ref("localhost:5000/app:v1") == "localhost:5000/app:v1"
    for bad in ("", "Alpine", "a b", "a:", "a:-x", "../x", "a:b/c:"):
        with pytest.raises(UsageError):
            parse_ref(bad)


def test_split_layout_arg(tmp_path: Path) -> None:
    (tmp_path / "odd:name").mkdir()
    (tmp_path / "lay").mkdir()
    assert split_layout_arg(str(tmp_path / "lay"), must_exist=True) == (str(tmp_path / "lay"), None)
    assert split_layout_arg(f"{tmp_path}/lay:v1", must_exist=True) == (f"{tmp_path}/lay", "v1")
    assert split_layout_arg(f"{tmp_path}/odd:name", must_exist=True) == (f"{tmp_path}/odd:name", None)
    assert split_layout_arg(f"{tmp_path}/new:v2", must_exist=False) == (f"{tmp_path}/new", "v2")


def test_default_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYUNIONFS_STORE", raising=False)
    assert default_store() == "/var/lib/pyunionfs"  # root
    monkeypatch.setenv("PYUNIONFS_STORE", "/elsewhere")
    assert default_store() == "/elsewhere"
    monkeypatch.delenv("PYUNIONFS_STORE")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", "/home/u/.data")
    assert default_store() == "/home/u/.data/pyunionfs"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert default_store() == "/home/u/.local/share/pyunionfs"


# -- pull ----------------------------------------------------------------------------


@pytest.mark.parametrize("gzip", [True, False], ids=["gzip", "tar"])
def test_pull_unpacks_verified_layers(tmp_path: Path, layers: dict[str, LayerBlob], gzip: bool) -> None:
    digests = write_layout(tmp_path / "lay", [layers["base"], layers["app1"]], "v1", gzip=gzip)
    store = Store(str(tmp_path / "store"))
    img = store.pull(str(tmp_path / "lay"))
    assert img.name == "lay:v1"
    assert img.manifest_digest == digests["manifest"] and img.config_digest == digests["config"]
    assert img.diff_ids == [layers["base"].diff_id, layers["app1"].diff_id]
    for lb in (layers["base"], layers["app1"]):
        want = tmp_path / f"want-{lb.diff_id[7:19]}"
        apply_layer(str(lb.tar), str(want))
        got = Path(store.layer_dir(lb.diff_id))
        assert _same(want, got) == []
        meta = json.loads((got.parent / "meta.json").read_text())
        assert meta["diff_id"] == lb.diff_id and meta["size"] == lb.tar.stat().st_size
    assert store.lowers("lay:v1") == [store.layer_dir(layers["app1"].diff_id), store.layer_dir(layers["base"].diff_id)]
    # the app layer's whiteout became a kernel whiteout
    st = os.lstat(Path(store.layer_dir(layers["app1"].diff_id)) / "usr/share/doc")
    assert st.st_rdev == 0 and (st.st_mode & 0o170000) == 0o020000
    assert os.listdir(tmp_path / "store" / "tmp") == []


def test_pull_by_tag_from_a_layout_with_several_images(tmp_path: Path, layers: dict[str, LayerBlob]) -> None:
    write_layout(tmp_path / "lay", [layers["base"]], "base")
    first = json.loads((tmp_path / "lay" / "index.json").read_text())["manifests"]
    write_layout(tmp_path / "lay", [layers["base"], layers["app2"]], "two", extra_index=first)
    store = Store(str(tmp_path / "store"))
    with pytest.raises(UsageError, match="holds 2 images"):
        store.pull(str(tmp_path / "lay"))
    assert store.pull(f"{tmp_path}/lay:two").name == "lay:two"
    assert store.pull(f"{tmp_path}/lay:base", name="mybase").name == "mybase:latest"
    with pytest.raises(ImageError, match="no image tagged"):
        store.pull(f"{tmp_path}/lay:nope")


def test_two_images_share_their_base(tmp_path: Path, layers: dict[str, LayerBlob]) -> None:
    write_layout(tmp_path / "one", [layers["base"], layers["app1"]])
    write_layout(tmp_path / "two", [layers["base"], layers["app2"]])
    store = Store(str(tmp_path / "store"))
    store.pull(str(tmp_path / "one"))
    base_ino = os.stat(store.layer_dir(layers["base"].diff_id)).st_ino
    store.pull(str(tmp_path / "two"))
    one, two = store.lowers("one"), store.lowers("two")
    assert one[-1] == two[-1] == store.layer_dir(layers["base"].diff_id)
    assert os.stat(two[-1]).st_ino == base_ino  # the same directory, not a copy
    assert len(os.listdir(tmp_path / "store" / "layers")) == 3
    table = format_images(store)
    lines = table.splitlines()
    assert lines[0].split() == ["REPOSITORY:TAG", "IMAGE", "ID", "LAYERS", "SIZE", "SHARED", "SIZE"]
    base_size = layers["base"].tar.stat().st_size

    for line, app in zip(lines[1:3], ("app1", "app2"), strict=True):
        cols = line.split()
        assert cols[2] == "2"
        assert cols[3] == human(base_size + layers[app].tar.stat().st_size)
        assert cols[4] == human(base_size)
    assert lines[3].startswith("2 images, 3 layers")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "flip-manifest", "flip-config", "missing"])
def test_damaged_blob_is_refused_and_nothing_stored(tmp_path: Path, layers: dict[str, LayerBlob], damage: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    digests = write_layout(tmp_path / "lay", [layers["base"], layers["app1"]])
    victim = {"flip-manifest": digests["manifest"], "flip-config": digests["config"]}.get(damage, digests["layers"][1])
    path = tmp_path / "lay" / "blobs" / "sha256" / victim[7:]
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "missing":
        path.unlink()
    else:
        _flip(path, path.stat().st_size // 2)
    store = tmp_path / "store"
    rc, out, err = _cli("pull", str(tmp_path / "lay"), "--store", str(store), capsys=capsys)
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and f"blob {victim}" in err, err
    assert _empty(store), _store_contents(store)


def test_wrong_diff_id_is_refused(tmp_path: Path, layers: dict[str, LayerBlob]) -> None:
    # a config that lies about the uncompressed content: the blobs match their digests
    lb = layers["app1"]
    fake = LayerBlob(lb.tar, layers["app2"].diff_id, lb.gz, lb.gz_digest)
    write_layout(tmp_path / "lay", [layers["base"], fake])
    store = Store(str(tmp_path / "store"))
    with pytest.raises(ImageError, match=f"blob {lb.gz_digest}: uncompressed content has DiffID {lb.diff_id}"):
        store.pull(str(tmp_path / "lay"))
    assert _empty(tmp_path / "store")


def test_zstd_layers_need_zstandard(tmp_path: Path, layers: dict[str, LayerBlob]) -> None:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("zstandard is installed: the refusal cannot be seen")
    digests = write_layout(tmp_path / "lay", [layers["base"]])
    man_path = tmp_path / "lay/blobs/sha256" / digests["manifest"][7:]
    manifest = json.loads(man_path.read_text())
    manifest["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+zstd"
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "lay/blobs/sha256" / digest).write_bytes(data)
    index = json.loads((tmp_path / "lay/index.json").read_text())
    index["manifests"][0].update(digest="sha256:" + digest, size=len(data))
    (tmp_path / "lay/index.json").write_text(json.dumps(index))
    with pytest.raises(LayerError, match="zstd-compressed layers need the Python package 'zstandard'"):
        Store(str(tmp_path / "store")).pull(str(tmp_path / "lay"))
    assert _empty(tmp_path / "store")


def test_crash_before_commit_leaves_nothing(tmp_path: Path, layers: dict[str, LayerBlob],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    write_layout(tmp_path / "lay", [layers["base"]])
    store = Store(str(tmp_path / "store"))

    def boom(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "move_in", boom)
    with pytest.raises(KeyboardInterrupt):
        store.pull(str(tmp_path / "lay"))
    assert _empty(tmp_path / "store")
    # a killed process cannot clean up: its tmp directory (lock no longer held) goes at the next command
    stale = tmp_path / "store" / "tmp" / "work-dead"
    put(stale / "layers" / "x" / "diff" / "f", b"half")
    (stale / ".lock").touch()
    os.utime(stale, (1, 1))
    monkeypatch.undo()
    store.pull(str(tmp_path / "lay"))
    assert os.listdir(tmp_path / "store" / "tmp") == []


def test_concurrent_pulls_of_the_same_image(tmp_path: Path, layers: dict[str, LayerBlob]) -> None:
    write_layout(tmp_path / "lay", [layers["base"], layers["app1"]])
    cmd = [sys.executable, "-m", "pyunionfs", "pull", str(tmp_path / "lay"), "--store", str(tmp_path / "store")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    store = Store(str(tmp_path / "store"))
    assert sorted(os.listdir(tmp_path / "store" / "layers")) == sorted(
        [layers["base"].diff_id[7:], layers["app1"].diff_id[7:]])
    assert os.listdir(tmp_path / "store" / "tmp") == []
    want = tmp_path / "want"
    apply_layer(str(layers["app1"].tar), str(want))
    assert diff(snapshot(want), snapshot(store.layer_dir(layers["app1"].diff_id))) == []


# -- push ------------------------------------------------------------------------------


def test_push_pull_round_trip_keeps_digests(tmp_path: Path, layers: dict[str, LayerBlob]) -> None:
    digests = write_layout(tmp_path / "lay", [layers["base"], layers["app1"]], "v1")
    store = Store(str(tmp_path / "store"))
    store.pull(str(tmp_path / "lay"), name="app:v1")
    _, tag, mdesc = store.push("app:v1", f"{tmp_path}/out:v2")
    assert tag == "v2" and mdesc.digest == digests["manifest"]  # gzip layers are copied as they are
    assert json.loads((tmp_path / "out" / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "v2"
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    for blob in (tmp_path / "out" / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    other = Store(str(tmp_path / "store2"))
    img = other.pull(str(tmp_path / "out"))
    assert img.name == "app:v2"  # the full name travels in io.containerd.image.name
    assert img.manifest_digest == digests["manifest"]
    for d in img.diff_ids:
        assert _same(store.layer_dir(d), other.layer_dir(d)) == []


def test_push_gzips_plain_layers_deterministically(tmp_path: Path, layers: dict[str, LayerBlob]) -> None:
    write_layout(tmp_path / "lay", [layers["base"]], gzip=False)
    store = Store(str(tmp_path / "store"))
    img = store.pull(str(tmp_path / "lay"))
    _, _, m1 = store.push(img.name, str(tmp_path / "out1"))
    _, _, m2 = store.push(img.name, str(tmp_path / "out2"))
    assert m1.digest == m2.digest and m1.digest != img.manifest_digest
    manifest = json.loads((tmp_path / "out1" / "blobs" / "sha256" / m1.digest[7:]).read_bytes())
    assert manifest["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    layer = (tmp_path / "out1" / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]).read_bytes()
    assert layer[:2] == b"\x1f\x8b" and layer[4:8] == b"\0\0\0\0"  # gzip, mtime 0
    assert Store(str(tmp_path / "store2")).pull(str(tmp_path / "out1")).diff_ids == img.diff_ids


def test_push_adds_to_an_existing_layout(tmp_path: Path, layers: dict[str, LayerBlob]) -> None:
    write_layout(tmp_path / "one", [layers["base"], layers["app1"]])
    write_layout(tmp_path / "two", [layers["base"], layers["app2"]])
    store = Store(str(tmp_path / "store"))
    store.pull(str(tmp_path / "one"))
    store.pull(str(tmp_path / "two"))
    store.push("one", f"{tmp_path}/out:one")
    store.push("two", f"{tmp_path}/out:two")
    store.push("two", f"{tmp_path}/out:two")  # replaces, does not duplicate
    refs = [m["annotations"]["org.opencontainers.image.ref.name"]
            for m in json.loads((tmp_path / "out" / "index.json").read_text())["manifests"]]
    assert refs == ["one", "two"]


# -- history, rmi ---------------------------------------------------------------------


def test_history_newest_first(tmp_path: Path, layers: dict[str, LayerBlob], capsys: pytest.CaptureFixture[str]) -> None:
    write_layout(tmp_path / "lay", [layers["base"], layers["app1"]], created_by=["ADD base /", "RUN make app"])
    store = Store(str(tmp_path / "store"))
    store.pull(str(tmp_path / "lay"))
    lines = format_history(store, "lay").splitlines()
    assert lines[0].split() == ["LAYER", "CREATED", "CREATED", "BY", "SIZE", "COMMENT"]
    assert lines[1].startswith(layers["app1"].diff_id[7:19]) and "2024-01-02 00:00:00 UTC" in lines[1]
    assert "RUN make app" in lines[1] and "ADD base /" in lines[2]
    rc, out, _ = _cli("history", "lay", "--store", str(tmp_path / "store"), capsys=capsys)
    assert rc == 0 and out.splitlines() == lines


def test_rmi_keeps_shared_layers(tmp_path: Path, layers: dict[str, LayerBlob],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    d1 = write_layout(tmp_path / "one", [layers["base"], layers["app1"]])
    d2 = write_layout(tmp_path / "two", [layers["base"], layers["app2"]])
    store = Store(str(tmp_path / "store"))
    store.pull(str(tmp_path / "one"))
    store.pull(str(tmp_path / "two"))
    rc, out, _ = _cli("rmi", "one", "--store", str(tmp_path / "store"), capsys=capsys)
    assert rc == 0
    assert out.splitlines() == ["Untagged: one:latest", f"Deleted: {layers['app1'].diff_id}"]
    assert store.lowers("two") == [store.layer_dir(layers["app2"].diff_id), store.layer_dir(layers["base"].diff_id)]
    blobs = set(os.listdir(tmp_path / "store" / "blobs" / "sha256"))
    assert {d[7:] for d in [d2["manifest"], d2["config"], *d2["layers"]]} == blobs
    assert d1["manifest"][7:] not in blobs
    rc, _, err = _cli("rmi", "one", "--store", str(tmp_path / "store"), capsys=capsys)
    assert rc == 1 and "no image one:latest" in err
    store.remove(store.image("two").id)  # by IMAGE ID, as docker allows
    assert _empty(tmp_path / "store")


# -- commit --tag ------------------------------------------------------------------------


def test_commit_from_history_push_round_trip(tmp_path: Path, layers: dict[str, LayerBlob],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    write_layout(tmp_path / "lay", [layers["base"]], created_by=["ADD base /"])
    s = str(tmp_path / "store")
    store = Store(s)
    store.pull(str(tmp_path / "lay"), name="base:1")
    upper = tmp_path / "upper"
    put(upper / "etc" / "motd", b"committed\n")
    whiteout(upper / "bin" / "tool")
    rc, out, err = _cli("commit", str(upper), "--from", "base:1", "--tag", "app:2", "-m", "RUN change motd",
                        "--store", s, capsys=capsys)
    assert rc == 0, err
    name, image_id, diff_id = out.split()
    assert name == "app:2"
    img = store.image("app:2")
    assert img.id == image_id and img.diff_ids == [layers["base"].diff_id, diff_id]
    assert img.config["history"][-1]["created_by"] == "RUN change motd"
    hist = format_history(store, "app:2").splitlines()
    assert hist[1].startswith(diff_id[7:19]) and "RUN change motd" in hist[1] and "ADD base /" in hist[2]
    top = Path(store.layer_dir(diff_id))
    assert (top / "etc" / "motd").read_bytes() == b"committed\n"
    assert os.lstat(top / "bin" / "tool").st_rdev == 0
    # the existing -o form still works, and the two are alternatives
    rc, out, _ = _cli("commit", str(upper), "-o", str(tmp_path / "l.tar"), capsys=capsys)
    assert rc == 0 and out.split()[0] == diff_id
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["commit", str(upper), "-o", str(tmp_path / "l.tar"), "--tag", "x"])
    assert exit_info.value.code == 2 and "not allowed with" in capsys.readouterr().err
    rc, _, err = _cli("commit", str(upper), "-o", str(tmp_path / "l.tar"), "--from", "base:1", capsys=capsys)
    assert rc == 2 and "go with --tag" in err
    # push and pull elsewhere: same manifest, same history
    rc, out, err = _cli("push", "app:2", str(tmp_path / "out"), "--store", s, capsys=capsys)
    assert rc == 0, err
    other = Store(str(tmp_path / "store2"))
    again = other.pull(str(tmp_path / "out"))
    assert again.name == "app:2" and again.manifest_digest == img.manifest_digest
    assert format_history(other, "app:2") == format_history(store, "app:2")
    # committing an image from nothing (docker's FROM scratch)
    solo = store.commit(str(upper), "solo")[0]
    assert solo.diff_ids == [diff_id] and solo.config["os"] == "linux"
    assert len(os.listdir(tmp_path / "store" / "layers")) == 2  # the same upper: the same layer, shared


def test_images_command(tmp_path: Path, layers: dict[str, LayerBlob], capsys: pytest.CaptureFixture[str]) -> None:
    write_layout(tmp_path / "lay", [layers["base"]])
    s = str(tmp_path / "store")
    rc, out, err = _cli("pull", str(tmp_path / "lay"), "--tag", "b:1", "--store", s, capsys=capsys)
    assert rc == 0 and out.startswith("b:1 ")
    rc, out, _ = _cli("images", "--store", s, capsys=capsys)
    assert rc == 0 and out.splitlines()[1].split()[:3] == ["b:1", Store(s).image("b:1").id, "1"]
    rc, _, err = _cli("mount", "image:nope", "", str(tmp_path), "--store", s, capsys=capsys)
    assert rc == 1 and err.strip() == f"pyunionfs: no image nope:latest in store {s}"


def test_progress_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    quiet, loud = io.StringIO(), Tty()
    for stream in (quiet, loud):
        p = Progress("pull x", 2, stream)
        p.add(1500)
        p.layer_done()
        p.close()
    assert quiet.getvalue() == ""
    assert "pull x: 1/2 layers, 1.5kB" in loud.getvalue()


def test_rootless_store_keeps_oci_whiteouts(tmp_path: Path, layers: dict[str, LayerBlob],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # an unprivileged user cannot mknod 0/0: the layer keeps its .wh. files, which the mount reads
    monkeypatch.setattr("pyunionfs.image.records.whiteout_mode", lambda: "oci")
    write_layout(tmp_path / "lay", [layers["base"], layers["app1"]])
    store = Store(str(tmp_path / "store"))
    store.pull(str(tmp_path / "lay"))
    top = Path(store.layer_dir(layers["app1"].diff_id))
    assert (top / "usr" / "share" / ".wh.doc").is_file() and not (top / "usr" / "share" / "doc").exists()


def test_rmi_during_a_pull_cannot_break_the_pulled_image(tmp_path: Path, layers: dict[str, LayerBlob],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # the pull finds the base already stored and does not unpack it; an rmi then removes it
    # before the pull commits: the pull must notice, under the lock, and unpack it after all
    write_layout(tmp_path / "one", [layers["base"], layers["app1"]])
    write_layout(tmp_path / "two", [layers["base"], layers["app2"]])
    store = Store(str(tmp_path / "store"))
    store.pull(str(tmp_path / "one"))
    real_move_in = Store.move_in

    def rmi_first(self: Store, *args: object) -> None:
        self.remove("one")
        assert not self.has_layer(layers["base"].diff_id)
        real_move_in(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "move_in", rmi_first)
    store.pull(str(tmp_path / "two"))
    base = store.lowers("two")[-1]
    want = tmp_path / "want"
    apply_layer(str(layers["base"].tar), str(want))
    assert _same(want, base) == []


def test_rmi_by_id_of_an_image_with_two_tags_is_refused(tmp_path: Path, layers: dict[str, LayerBlob]) -> None:
    write_layout(tmp_path / "lay", [layers["base"]])
    store = Store(str(tmp_path / "store"))
    a = store.pull(str(tmp_path / "lay"), name="a")
    store.pull(str(tmp_path / "lay"), name="b")
    with pytest.raises(StoreError, match=r"has several tags \(a:latest, b:latest\)"):
        store.remove(a.id)
    assert store.remove("a")[1] == []  # b still uses every layer
    assert store.remove(a.id)[0].name == "b:latest"
    assert _empty(tmp_path / "store")


@pytest.mark.parametrize("command", ["pull", "push", "images", "history", "rmi"])
def test_image_commands_are_subcommands_not_mount_sources(command: str) -> None:
    from pyunionfs.cli.commands import subcommands
    from pyunionfs.cli.dropin import is_overlay_form

    assert not is_overlay_form([command, "x", "y"], subcommands())


def test_tag_records_the_same_image_under_another_name(tmp_path: Path) -> None:
    """``tag`` is a second record of one manifest: same IMAGE ID, nothing copied, rmi of one keeps the other."""
    store = Store(str(tmp_path / "store"))
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/hello").write_text("hi\n")
    img, _, _ = store.commit(str(upper), "one:1")
    layers_before = sorted(os.listdir(tmp_path / "store/layers"))
    other = store.tag("one:1", "two")
    assert other.name == "two:latest" and other.id == img.id
    assert sorted(store.records()) == ["one:1", "two:latest"]
    assert sorted(os.listdir(tmp_path / "store/layers")) == layers_before
    _, removed = store.remove("one:1")
    assert removed == []  # still used by two:latest
    assert store.lowers("two") == store.lowers(img.id[:12]) and os.path.isdir(store.lowers("two")[0])
    with pytest.raises(StoreError, match="no image nope:latest in store"):
        store.tag("nope", "three")
