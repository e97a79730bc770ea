"""Compression of layers: level 6 by default, --compress-level, zstd, progress in logs.

Why these tests: gzip at Python's default level 9 took ten times as long as
level 6 for a blob 0.4 % smaller, so the level a command writes is part of
its contract; zstd layers must go out with the OCI zstd media type and come
back in through pull and apply (or be refused in one line where the
``zstandard`` package is missing); bad options are one line and leave
nothing behind.  The level is read from the blob itself (gzip's XFL header
byte, and the deflate stream compared with zlib's at that level), never
from timing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from pyunionfs import cli
from pyunionfs.image.compression import Compression
from pyunionfs.image.layerapply import apply_layer
from pyunionfs.image.layertar import commit
from pyunionfs.image.progress import Progress
from pyunionfs.image.listing import format_history
from pyunionfs.image.store import Store
from tests.support.ocigen import app_tree, base_tree, make_layer, put, write_layout
from tests.support.treesnap import diff, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: whiteout devices, trusted xattrs")

try:
    import zstandard
except ImportError:  # the optional extra is not installed: the zstd writing tests cannot run
    zstandard = None
needs_zstd = pytest.mark.skipif(zstandard is None, reason="needs the optional zstandard package (pyunionfs[zstd])")


def _deflate(data: bytes, level: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def _gzip_level_is(blob: bytes, tar: bytes, level: int) -> None:
    """*blob* is gzip of *tar* at *level*: the header's XFL, and the deflate data itself."""
    assert blob[:2] == b"\x1f\x8b" and blob[4:8] == b"\0\0\0\0"  # gzip, mtime 0
    assert blob[8] == {9: 2, 1: 4}.get(level, 0)  # XFL: 2 = best (level 9), 4 = fastest
    assert blob[10:-8] == _deflate(tar, level)
    assert gzip.decompress(blob) == tar


def _zstd_of(tar: bytes, level: int) -> bytes:
    out = io.BytesIO()
    w = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=0).stream_writer(out, closefd=False)
    w.write(tar)
    w.close()
    return out.getvalue()


def _cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def upper(tmp_path: Path) -> Path:
    """An upper whose tar compresses differently at levels 1, 6 and 9."""
    root = tmp_path / "upper"
    text = b"".join(b"line %d of a text that repeats with variations %d\n" % (i, i * i % 97) for i in range(20000))
    put(root / "etc" / "big.txt", text)
    put(root / "bin" / "tool", bytes(range(256)) * 64, 0o755)
    return root


# -- commit -o ----------------------------------------------------------------------


def test_commit_o_gzip_is_level_6_by_default_and_compress_level_sets_it(
        tmp_path: Path, upper: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli("commit", str(upper), "-o", str(tmp_path / "l.tar"), "--gzip", capsys=capsys)
    assert rc == 0, err
    tar = (tmp_path / "l.tar").read_bytes()
    blob = (tmp_path / "l.tar.gz").read_bytes()
    _gzip_level_is(blob, tar, 6)
    diff_id, gz_line = out.splitlines()
    assert diff_id.split()[0] == "sha256:" + hashlib.sha256(tar).hexdigest()  # of the uncompressed tar
    assert gz_line.split() == ["sha256:" + hashlib.sha256(blob).hexdigest(), str(tmp_path / "l.tar.gz")]
    for level in (1, 9):
        rc, _, err = _cli("commit", str(upper), "-o", str(tmp_path / f"l{level}.tar"), "--compress", "gzip",
                          "--compress-level", str(level), capsys=capsys)
        assert rc == 0, err
        _gzip_level_is((tmp_path / f"l{level}.tar.gz").read_bytes(), tar, level)


@pytest.mark.parametrize("args, message", [
    (["--gzip", "--compress-level", "0"], "--compress-level 0: gzip levels are 1 to 9"),
    (["--gzip", "--compress-level", "10"], "--compress-level 10: gzip levels are 1 to 9"),
    (["--compress", "gzip", "--compress-level", "six"], "--compress-level six: gzip levels are 1 to 9"),
    (["--compress", "bzip2"], "--compress bzip2: unknown format (choose from gzip, zstd)"),
    (["--compress-level", "3"], "--compress-level goes with --gzip or --compress"),
    (["--gzip", "--compress", "zstd"], "--gzip and --compress zstd ask for two formats"),
])
def test_commit_o_bad_compression_options_are_one_line_and_write_nothing(
        tmp_path: Path, upper: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, out, err = _cli("commit", str(upper), "-o", str(out_dir / "l.tar"), *args, capsys=capsys)
    assert rc == 2 and out == ""
    assert err.startswith("pyunionfs: ") and err.count("\n") == 1 and message in err, err
    assert list(out_dir.iterdir()) == []


def test_commit_tag_and_push_refuse_bad_levels_before_touching_the_store(
        tmp_path: Path, upper: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    rc, _, err = _cli("commit", str(upper), "--tag", "x", "--compress-level", "12", "--store", str(store),
                      capsys=capsys)
    assert rc == 2 and err == "pyunionfs: --compress-level 12: gzip levels are 1 to 9\n"
    rc, _, err = _cli("push", "x", str(tmp_path / "lay"), "--compress", "lz4", "--store", str(store), capsys=capsys)
    assert rc == 2 and err.startswith("pyunionfs: --compress lz4: unknown format") and err.count("\n") == 1
    assert not store.exists() and not (tmp_path / "lay").exists()


def test_commit_reports_progress_of_every_tar_byte(tmp_path: Path, upper: Path) -> None:
    seen: list[int] = []
    res = commit(str(upper), str(tmp_path / "l.tar"), compress=Compression(), progress=seen.append)
    assert sum(seen) == (tmp_path / "l.tar").stat().st_size and res.members > 0
    assert res.compression == Compression("gzip", 6)


# -- commit --tag, push -----------------------------------------------------------------


def test_commit_tag_stores_gzip_level_6_and_push_keeps_it(tmp_path: Path, upper: Path) -> None:
    store = Store(str(tmp_path / "store"))
    img, diff_id, _ = store.commit(str(upper), "app:1")
    (desc,) = img.layer_descriptors
    assert desc.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    blob = Path(store.blob_path(desc.digest)).read_bytes()
    commit(str(upper), str(tmp_path / "ref.tar"))
    _gzip_level_is(blob, (tmp_path / "ref.tar").read_bytes(), 6)
    assert diff_id == "sha256:" + hashlib.sha256((tmp_path / "ref.tar").read_bytes()).hexdigest()
    _, _, mdesc = store.push("app:1", str(tmp_path / "lay"))
    assert mdesc.digest == img.manifest_digest  # copied as it is


def test_push_compresses_plain_layers_at_the_level_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = make_layer(base_tree(tmp_path / "base"), tmp_path / "tars")
    write_layout(tmp_path / "plain", [base], gzip=False)
    s = str(tmp_path / "store")
    Store(s).pull(str(tmp_path / "plain"), name="p:1")
    for level in ("6", "1"):
        out = tmp_path / f"out{level}"
        args = ["push", "p:1", str(out), "--store", s] + (["--compress-level", level] if level != "6" else [])
        rc, _, err = _cli(*args, capsys=capsys)
        assert rc == 0, err
        index = json.loads((out / "index.json").read_text())
        manifest = json.loads((out / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
        layer = manifest["layers"][0]
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        _gzip_level_is((out / "blobs/sha256" / layer["digest"][7:]).read_bytes(), base.tar.read_bytes(), int(level))


@needs_zstd
def test_zstd_commit_push_pull_apply_round_trip(tmp_path: Path, upper: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    s = str(tmp_path / "store")
    rc, out, err = _cli("commit", str(upper), "--tag", "z:1", "--compress", "zstd", "--compress-level", "7",
                        "--store", s, capsys=capsys)
    assert rc == 0, err
    store = Store(s)
    img = store.image("z:1")
    (desc,) = img.layer_descriptors
    assert desc.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    commit(str(upper), str(tmp_path / "ref.tar"))
    tar = (tmp_path / "ref.tar").read_bytes()
    blob = Path(store.blob_path(desc.digest)).read_bytes()
    assert blob == _zstd_of(tar, 7)
    assert out.split()[2] == img.diff_ids[0] == "sha256:" + hashlib.sha256(tar).hexdigest()
    # pushed as it is, pulled back into another store, unpacked to the same tree
    rc, _, err = _cli("push", "z:1", str(tmp_path / "lay"), "--store", s, capsys=capsys)
    assert rc == 0, err
    again = Store(str(tmp_path / "store2")).pull(str(tmp_path / "lay"))
    assert again.manifest_digest == img.manifest_digest
    assert diff(snapshot(store.layer_dir(img.diff_ids[0])), snapshot(Store(str(tmp_path / "store2")).layer_dir(
        img.diff_ids[0]))) == []
    # push --compress gzip converts it for a consumer without zstd
    rc, _, err = _cli("push", "z:1", str(tmp_path / "gz"), "--compress", "gzip", "--store", s, capsys=capsys)
    assert rc == 0, err
    gz_img = Store(str(tmp_path / "store3")).pull(str(tmp_path / "gz"))
    assert gz_img.layer_descriptors[0].media_type.endswith("+gzip") and gz_img.diff_ids == img.diff_ids
    # commit -o --compress zstd, and apply reads the .zst by its magic
    rc, out, err = _cli("commit", str(upper), "-o", str(tmp_path / "l.tar"), "--compress", "zstd", capsys=capsys)
    assert rc == 0, err
    assert (tmp_path / "l.tar.zst").read_bytes() == _zstd_of(tar, 3)  # zstd's own default level
    apply_layer(str(tmp_path / "l.tar.zst"), str(tmp_path / "applied"))
    apply_layer(str(tmp_path / "ref.tar"), str(tmp_path / "applied-tar"))
    assert diff(snapshot(tmp_path / "applied-tar"), snapshot(tmp_path / "applied")) == []
    rc, _, err = _cli("commit", str(upper), "-o", str(tmp_path / "x.tar"), "--compress", "zstd",
                      "--compress-level", "20", capsys=capsys)
    assert rc == 2 and err == "pyunionfs: --compress-level 20: zstd levels are 1 to 19\n"


@needs_zstd
def test_a_truncated_zstd_layer_is_one_line(tmp_path: Path, upper: Path, capsys: pytest.CaptureFixture[str]) -> None:
    commit(str(upper), str(tmp_path / "l.tar"), compress=Compression("zstd", 3))
    blob = (tmp_path / "l.tar.zst").read_bytes()
    (tmp_path / "cut.tar.zst").write_bytes(blob[: len(blob) // 2])
    rc, _, err = _cli("apply", str(tmp_path / "cut.tar.zst"), str(tmp_path / "dir"), capsys=capsys)
    assert rc == 1 and err.count("\n") == 1 and "cannot be decompressed (zstd stream truncated)" in err
    assert not (tmp_path / "dir").exists()


_WITHOUT_ZSTANDARD = "import sys; sys.modules['zstandard'] = None; from pyunionfs.cli import main; sys.exit(main())"


def test_without_zstandard_zstd_layers_are_refused_in_one_line(tmp_path: Path) -> None:
    """The package hidden from a child interpreter (an import of it fails), as on a machine without it."""
    zst = tmp_path / "l.tar.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(64))

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _WITHOUT_ZSTANDARD, *argv], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL, cwd=Path(__file__).parents[2])

    res = run("apply", str(zst), str(tmp_path / "dir"))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == (f"pyunionfs: {zst}: zstd-compressed layers need the Python package 'zstandard' "
                          "(pip install zstandard, or pyunionfs[zstd])\n")
    assert not (tmp_path / "dir").exists()
    put(tmp_path / "upper" / "f", b"x")
    res = run("commit", str(tmp_path / "upper"), "--tag", "z", "--compress", "zstd", "--store", str(tmp_path / "s"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert res.stderr.startswith("pyunionfs: --compress zstd needs the Python package 'zstandard'")
    assert not (tmp_path / "s").exists()
    if zstandard is not None:  # a zstd image made here, pulled there
        Store(str(tmp_path / "made")).commit(str(tmp_path / "upper"), "z:1", compress=Compression("zstd", 3))
        Store(str(tmp_path / "made")).push("z:1", str(tmp_path / "lay"))
        res = run("pull", str(tmp_path / "lay"), "--store", str(tmp_path / "s"))
        assert res.returncode == 1 and res.stderr.count("\n") == 1
        assert "zstd-compressed layers need the Python package 'zstandard'" in res.stderr
        assert not any((tmp_path / "s" / sub).exists() and os.listdir(tmp_path / "s" / sub)
                       for sub in ("blobs/sha256", "layers", "images", "tmp"))


# -- progress ------------------------------------------------------------------------------


def test_progress_in_a_log_is_a_plain_line_every_interval() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    quick, log, loud = io.StringIO(), io.StringIO(), Tty()
    for stream, interval in ((quick, 5.0), (log, 0.0), (loud, 0.0)):
        p = Progress("pull x", 2, stream, interval=interval)
        p.add(1500)
        p.layer_done()
        p.close()
    assert quick.getvalue() == ""  # done before the first interval: nothing, as scripts want
    lines = log.getvalue().splitlines()
    assert lines[0] == "pyunionfs: pull x: 0/2 layers, 1.5kB" and lines[-1] == "pyunionfs: pull x: 1/2 layers, 1.5kB"
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert "\rpull x: 1/2 layers, 1.5kB\x1b[K" in loud.getvalue()


# -- history -------------------------------------------------------------------------------


def test_history_cuts_created_by_as_docker_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long = "RUN apt-get update && apt-get install -y --no-install-recommends build-essential"
    base = make_layer(base_tree(tmp_path / "base"), tmp_path / "tars")
    app = make_layer(app_tree(tmp_path / "app"), tmp_path / "tars")
    write_layout(tmp_path / "lay", [base, app], created_by=["ADD base /", long])
    s = str(tmp_path / "store")
    Store(s).pull(str(tmp_path / "lay"), name="h:1")
    rc, out, _ = _cli("history", "h:1", "--store", s, capsys=capsys)
    assert rc == 0
    cut = long[:44] + "\u2026"
    assert cut in out.splitlines()[1] and long not in out and len(cut) == 45
    assert "ADD base /" in out.splitlines()[2]
    rc, out, _ = _cli("history", "h:1", "--no-trunc", "--store", s, capsys=capsys)
    assert rc == 0 and long in out.splitlines()[1]
    assert format_history(Store(s), "h:1", trunc=False) == out.rstrip("\n")


# -- empty layers ----------------------------------------------------------------------------


def test_a_commit_without_changes_is_an_empty_layer_history_entry(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    s = str(tmp_path / "store")
    store = Store(s)
    put(tmp_path / "base" / "etc" / "f", b"base\n")
    base, _, _ = store.commit(str(tmp_path / "base"), "base:1")
    (tmp_path / "nothing").mkdir()
    rc, out, err = _cli("commit", str(tmp_path / "nothing"), "--from", "base:1", "--tag", "same:1", "-m",
                        "RUN true", "--store", s, capsys=capsys)
    assert rc == 0, err
    assert out.split()[:2] == ["same:1", store.image("same:1").id] and "empty_layer" in out
    img = store.image("same:1")
    assert img.diff_ids == base.diff_ids and img.layer_descriptors == base.layer_descriptors
    assert img.config["history"][-1]["created_by"] == "RUN true" and img.config["history"][-1]["empty_layer"] is True
    assert len(os.listdir(tmp_path / "store" / "layers")) == 1
    top = format_history(store, "same:1").splitlines()[1].split()
    assert top[0] == "<missing>" and "RUN" in top and top[-1] == "0B"
    assert store.lowers("same:1") == store.lowers("base:1")
    # from nothing, the empty layer is stored: an image with no layer could not be mounted
    solo, diff_id, _ = store.commit(str(tmp_path / "nothing"), "scratch:1")
    assert solo.diff_ids == [diff_id] and not solo.config["history"][-1].get("empty_layer")
