"""``pull`` of hostile images: refused in one line, with the store exactly as it was.

Why: pull unpacks every layer with apply's checks, so everything apply refuses must be refused
here too, and a refusal must leave no image record, no blob and no temporary behind, while the
images already stored stay untouched.  Layers whose blobs match their digests but whose content
is hostile (an owner chown cannot take, an oversized xattr, a deflate stream that does not
decompress) and manifests of the wrong shape are the cases a digest check cannot catch.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from pyunionfs import cli
from tests.support.ocigen import LayerBlob, base_tree, make_layer, write_layout
from tests.support.treesnap import Snapshot, diff, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: whiteout devices, trusted xattrs")


def _layer(out: Path, name: str, members: list[tuple[str, dict[str, str]]]) -> LayerBlob:
    """A layer of regular files with the given PAX records, plain and gzipped."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for member, pax in members:
            info = tarfile.TarInfo(member)
            info.size = 2
            info.pax_headers = pax
            tf.addfile(info, io.BytesIO(b"x\n"))
    raw = buf.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.tar").write_bytes(raw)
    gz = gzip.compress(raw, mtime=0)
    (out / f"{name}.tar.gz").write_bytes(gz)
    return LayerBlob(out / f"{name}.tar", "sha256:" + hashlib.sha256(raw).hexdigest(), out / f"{name}.tar.gz",
                     "sha256:" + hashlib.sha256(gz).hexdigest())


HOSTILE = {
    "uid-2^40": ([("ok", {}), ("b", {"uid": str(2**40)})], "uid 1099511627776 is not a valid owner"),
    "uid-(uid_t)-1": ([("ok", {}), ("b", {"uid": str(2**32 - 1)})], "uid 4294967295 is not a valid owner"),
    "xattr-70000": ([("ok", {}), ("b", {"SCHILY.xattr.user.big": "x" * 70_000})], "more than 65536"),
    "capability": ([("ok", {}), ("b", {"SCHILY.xattr.security.capability": "\x01\x02\x03"})],
                   "malformed file capability"),
}


def _stored(store: Path) -> Snapshot:
    """The store as a later command sees it (tmp/'s own times change with every command)."""
    return snapshot(store, mtime=True).subset(lambda path, _: path not in (b".", b"tmp"))


@pytest.fixture
def store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A store holding one image already, which a refused pull must not disturb."""
    base = make_layer(base_tree(tmp_path / "base"), tmp_path / "tars")
    write_layout(tmp_path / "good", [base])
    path = tmp_path / "store"
    assert cli.main(["pull", str(tmp_path / "good"), "--tag", "good:1", "--store", str(path)]) == 0
    capsys.readouterr()
    return path


def _refused(layout: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> str:
    before = _stored(store)
    rc = cli.main(["pull", str(layout), "--tag", "bad:1", "--store", str(store)])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "", (rc, out, err)
    assert err.startswith("pyunionfs: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert diff(before, _stored(store)) == [], "a refused pull changes nothing in the store"
    assert os.listdir(store / "tmp") == [], "and leaves no temporary"
    return err


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("gz", [True, False])
def test_pull_refuses_a_hostile_layer(tmp_path: Path, store: Path, case: str, gz: bool,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    members, message = HOSTILE[case]
    base = make_layer(base_tree(tmp_path / "base2"), tmp_path / "tars2")
    write_layout(tmp_path / "bad", [base, _layer(tmp_path / "tars2", case, members)], gzip=gz)
    assert message in _refused(tmp_path / "bad", store, capsys)


def test_pull_refuses_a_corrupt_deflate_stream_with_a_valid_digest(tmp_path: Path, store: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    lb = _layer(tmp_path / "tars", "x", [("ok", {})])
    gz = bytearray(lb.gz.read_bytes())
    gz[10] = 0xFF  # the first deflate block: final, of the reserved type 3
    lb.gz.write_bytes(bytes(gz))
    write_layout(tmp_path / "bad", [LayerBlob(lb.tar, lb.diff_id, lb.gz, "sha256:" + hashlib.sha256(gz).hexdigest())])
    err = _refused(tmp_path / "bad", store, capsys)
    assert "cannot be decompressed (error: " in err, err


@pytest.mark.parametrize("shape", ["layers-not-a-list", "nested-too-deep"])
def test_pull_refuses_a_manifest_of_the_wrong_shape(tmp_path: Path, store: Path, shape: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    base = make_layer(base_tree(tmp_path / "base2"), tmp_path / "tars2")
    digests = write_layout(tmp_path / "bad", [base])
    blobs = tmp_path / "bad/blobs/sha256"
    manifest = json.loads((blobs / digests["manifest"][7:]).read_bytes())
    if shape == "layers-not-a-list":
        manifest["layers"] = 5
        data = json.dumps(manifest).encode()
    else:
        data = json.dumps(manifest).encode()[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    index = json.loads((tmp_path / "bad/index.json").read_text())
    index["manifests"][0].update(digest="sha256:" + digest, size=len(data))
    (tmp_path / "bad/index.json").write_text(json.dumps(index))
    err = _refused(tmp_path / "bad", store, capsys)
    assert ("layers is not a list" if shape == "layers-not-a-list" else "not valid JSON (RecursionError") in err, err
