"""A generated fuzz of tar headers against ``apply``: every input applies cleanly or is refused cleanly.

Why: the malicious-input tests in test_core_layertar.py name the attacks someone thought of; the
header fields they come through (size, mode, owners in octal and base-256, type, link name, magic,
checksum, PAX records, GNU long names; some cases are also cut short or gzipped) can be garbled
in many more ways, and each way once ended in a traceback or a half-written DIR.  So valid small
layers are mutated deterministically (a seeded random: the same cases on every run, a failure
names its seed; ``PYUNIONFS_FUZZ_CASES`` runs more) and for each case one of two things must
hold:

* it applies (exit 0), and the result is sane: nothing outside DIR changed, no set-user-ID or
  set-group-ID bit the archive did not ask for, no temporary left;
* it is refused: exit status 1, exactly one line on stderr starting ``pyunionfs: ``, no
  traceback, and DIR exactly as it was (a DIR that did not exist still does not).

Apply runs in-process through :func:`pyunionfs.cli.commands.main` (the CLI's own function and error
mapping, so an exception it does not map fails the test); a few cases run the real command in a
subprocess for the exit status and the one line.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import random
import signal
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyunionfs import cli
from tests.support.treesnap import Snapshot, diff, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: devices, owners, trusted xattrs")

CASES = int(os.environ.get("PYUNIONFS_FUZZ_CASES", "320"))
BLOCK = 512
T0 = 1_700_000_000
#: Header fields: (offset, length).
FIELDS = {
    "name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12), "mtime": (136, 12),
    "chksum": (148, 8), "type": (156, 1), "linkname": (157, 100), "magic": (257, 8), "devmajor": (329, 8),
    "devminor": (337, 8),
}
CAP_V2 = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)


# --------------------------------------------------------------------------
# Valid layers to start from
# --------------------------------------------------------------------------


def _member(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None,
            **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = T0
    info.mode = 0o644 if kind != tarfile.DIRTYPE else 0o755
    for k, v in fields.items():
        setattr(info, k, v)
    if data is not None:
        info.size = len(data)
    tf.addfile(info, io.BytesIO(data) if data is not None else None)


def base_layers() -> list[bytes]:
    """Small valid layers in the three tar formats, with every member kind apply writes."""
    out = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            _member(tf, "d", tarfile.DIRTYPE)
            _member(tf, "d/file", data=b"hello\n", uid=1000, gid=1000)
            _member(tf, "d/.wh.gone", data=b"")
            _member(tf, "link", tarfile.SYMTYPE, linkname="d/file")
            _member(tf, "hard", tarfile.LNKTYPE, linkname="d/file")
            _member(tf, "fifo", tarfile.FIFOTYPE)
            _member(tf, "null", tarfile.CHRTYPE, devmajor=1, devminor=3)
            _member(tf, "suid", data=b"#!/bin/sh\n", mode=0o4755)
            if fmt != tarfile.USTAR_FORMAT:
                _member(tf, "long/" + "n" * 120, data=b"long name")
            if fmt == tarfile.PAX_FORMAT:
                _member(tf, "xattrs", data=b"x", pax_headers={
                    "SCHILY.xattr.user.note": "hi", "SCHILY.xattr.security.capability": CAP_V2.decode("latin-1"),
                })
        out.append(buf.getvalue())
    return out


# --------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------


def headers(data: bytes) -> list[int]:
    """Offsets of the blocks of *data* that are tar headers (their checksum verifies)."""
    found = []
    for off in range(0, len(data) - BLOCK + 1, BLOCK):
        block = data[off:off + BLOCK]
        if not any(block):
            continue
        try:
            want = int(block[148:156].split(b"\0")[0].strip() or b"-1", 8)
        except ValueError:
            continue
        if want == _checksum(block):
            found.append(off)
    return found


def _checksum(block: bytes | bytearray) -> int:
    return sum(block[:148]) + 8 * 32 + sum(block[156:BLOCK])


def _fix_checksum(block: bytearray) -> None:
    block[148:156] = b"%06o\0 " % _checksum(block)


def octal(value: int, length: int) -> bytes:
    return (b"%0*o" % (length - 1, value))[-(length - 1):] + b"\0"


def base256(value: int, length: int) -> bytes:
    """GNU base-256: 0x80 then big-endian, or 0xff then two's complement for a negative value."""
    span = 256 ** (length - 1)
    if value < 0:
        return b"\xff" + ((span + value) % span).to_bytes(length - 1, "big")
    return b"\x80" + (value % span).to_bytes(length - 1, "big")


def number(rng: random.Random, length: int) -> bytes:
    """A number field: octal, base-256 (huge, negative, (uid_t)-1) or garbage."""
    pick = rng.randrange(9)
    if pick == 0:
        return octal(rng.randrange(8 ** (length - 1)), length)
    if pick == 1:
        return base256(rng.choice([2**32 - 1, 2**32, 2**40, 2**63, 2**64 + 5]), length)
    if pick == 2:
        return base256(-rng.randrange(1, 2**33), length)
    if pick == 3:
        return octal(8 ** (length - 1) - 1, length)
    if pick == 4:
        return bytes(rng.randrange(256) for _ in range(length))
    if pick == 5:
        return b" " * length
    if pick == 6:
        return octal(rng.choice([0, 1, 7, 511, 4095, 65535]), length)
    if pick == 7:
        return b"-1".ljust(length, b"\0")
    return base256(rng.randrange(2**20), length)


def text(rng: random.Random, length: int) -> bytes:
    choices = [b"../../etc/evil", b"/etc/passwd", b"", b"d", b"d/file", b".wh..wh..opq", b".wh.", b"a\0b",
               b"link/x", b"./", b"x" * length, bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 40)))]
    return rng.choice(choices)[:length].ljust(length, b"\0")


def pax_record(key: bytes, value: bytes, rng: random.Random) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n = len(b"%d" % n) + len(body)
    if rng.random() < 0.1:
        n += rng.choice([-3, -1, 1, 5, 10**6])  # a record that lies about its length
    return b"%d" % n + body


def pax_records(rng: random.Random) -> bytes:
    keys = [b"uid", b"gid", b"size", b"mtime", b"path", b"linkpath", b"hdrcharset", b"SCHILY.xattr.user.a",
            b"SCHILY.xattr.security.capability", b"SCHILY.xattr.trusted.overlay.opaque", b"SCHILY.xattr.os2.x",
            b"SCHILY.xattr.system.posix_acl_access", b"GNU.sparse.map", b"GNU.sparse.size", b"GNU.sparse.major",
            b"GNU.sparse.minor", b"GNU.sparse.realsize", b"GNU.sparse.name", b"comment", b"atime",
            bytes(rng.randrange(33, 127) for _ in range(rng.randrange(1, 12)))]
    values = [b"0", b"-1", b"4294967295", b"4294967294", b"1099511627776", b"1e3", b"nan", b"inf", b"0x10", b"",
              b"1.5", b"99999999999999999999999999", b"d/file", b"../up", b"/abs", b"BINARY", b"y",
              CAP_V2, CAP_V2[:7], b"x" * 70_000, b"0,1,2", b"-5,3", bytes(rng.randrange(256) for _ in range(16))]
    return b"".join(pax_record(rng.choice(keys), rng.choice(values), rng) for _ in range(rng.randrange(1, 4)))


def extended(kind: bytes, payload: bytes, rng: random.Random) -> bytes:
    """A PAX ('x', 'g') or GNU long-name ('L', 'K') header with its data blocks."""
    info = tarfile.TarInfo("././@PaxHeader" if kind in (b"x", b"g") else "././@LongLink")
    info.type = kind
    info.size = len(payload) if rng.random() > 0.1 else rng.choice([0, len(payload) + 700, 10**9])
    head = info.tobuf(tarfile.GNU_FORMAT if kind in (b"L", b"K") else tarfile.USTAR_FORMAT)
    return head + payload + bytes(-len(payload) % BLOCK)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three mutations of one header of *data* (checksum mostly recomputed)."""
    offsets = headers(data)
    off = rng.choice(offsets)
    block = bytearray(data[off:off + BLOCK])
    insert = b""
    for _ in range(rng.randrange(1, 4)):
        what = rng.choice(["size", "mode", "uid", "gid", "mtime", "type", "linkname", "magic", "name", "devmajor",
                           "devminor", "pax", "pax", "longname", "flip"])
        if what in ("size", "mode", "uid", "gid", "mtime", "devmajor", "devminor"):
            start, length = FIELDS[what]
            block[start:start + length] = number(rng, length)
        elif what == "type":
            block[156:157] = bytes([rng.choice(b"0123456789LKxgASVDM\0" + bytes([rng.randrange(256)]))])
        elif what in ("linkname", "name"):
            start, length = FIELDS[what]
            block[start:start + length] = text(rng, length)
        elif what == "magic":
            block[257:265] = rng.choice([b"ustar\x0000", b"ustar  \0", b"\0" * 8, b"garbage!"])
        elif what == "pax":
            insert += extended(rng.choice(b"xg").to_bytes(1, "big"), pax_records(rng), rng)
        elif what == "longname":
            insert += extended(rng.choice([b"L", b"K"]), text(rng, rng.choice([100, 300])).rstrip(b"\0") + b"\0", rng)
        else:
            i = rng.randrange(BLOCK)
            block[i] ^= 1 << rng.randrange(8)
    if rng.random() < 0.85:
        _fix_checksum(block)
    return data[:off] + insert + bytes(block) + data[off + BLOCK:]


# --------------------------------------------------------------------------
# Running a case
# --------------------------------------------------------------------------


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """A case that does not end is a failure too (tarfile once looped on crafted headers)."""
    def ring(signum: int, frame: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def sandbox(root: Path, existing: bool) -> Path:
    """DIR (with some content when *existing*) beside a directory it must never touch."""
    outside = root / "outside"
    outside.mkdir(parents=True)
    (outside / "victim").write_bytes(b"untouched")
    target = root / "dir"
    if existing:
        (target / "d").mkdir(parents=True)
        (target / "d/gone").write_bytes(b"old")
        (target / "keep").write_bytes(b"keep")
        os.symlink(outside, target / "up")
        os.symlink(outside, target / "link")
    return target


def outside_dir(snap: Snapshot) -> Snapshot:
    """All but DIR (and the sandbox's own times, which making DIR changes)."""
    return snap.subset(lambda path, _: path not in (b".", b"dir") and not path.startswith(b"dir/"))


def asked_set_id(data: bytes) -> dict[bytes, int]:
    """Normalised member path -> set-ID bits its header asks for (the archive read once more)."""
    asked: dict[bytes, int] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*", encoding="utf-8", errors="surrogateescape") as tf:
        for info in tf:
            parts = [p for p in info.name.encode("utf-8", "surrogateescape").split(b"/") if p not in (b"", b".")]
            asked[b"/".join(parts)] = info.mode & 0o6000
    return asked


def check_case(root: Path, data: bytes, seed: int, capsys: pytest.CaptureFixture[str]) -> str:
    """Apply one mutated layer; assert the outcome is clean; 'applied' or 'refused'."""
    rng = random.Random(seed)
    existing = rng.random() < 0.5
    target = sandbox(root, existing)
    layer = root / "layer.tar"
    layer.write_bytes(data)
    argv = ["apply", str(layer), str(target)] + rng.choice([[], ["--whiteouts=oci"], ["--flatten"]])
    before = snapshot(root, mtime=True)
    capsys.readouterr()
    with deadline(10):
        rc = cli.main(argv)
    err = capsys.readouterr().err
    after = snapshot(root, mtime=True)
    where = f"seed {seed}: {' '.join(argv[2:])} on {'an existing' if existing else 'a new'} DIR"
    assert not [n for n in os.listdir(root) if n.startswith(".dir.")], f"{where}: a temporary was left"
    if rc == 0:
        assert err == "", f"{where}: {err}"
        assert diff(outside_dir(before), outside_dir(after)) == [], f"{where}: applied outside DIR"
        asked = asked_set_id(data)
        for path, e in after.items():
            if path.startswith(b"dir/") and e.kind != "lnk" and e.mode & 0o6000:
                rel = path[4:]
                assert e.mode & 0o6000 == asked.get(rel, 0) or any(
                    asked.get(p[4:], 0) == e.mode & 0o6000 for p in (e.links or ())), \
                    f"{where}: {rel!r} has set-ID bits {e.mode & 0o6000:o} the layer did not ask for"
        return "applied"
    assert rc == 1, f"{where}: exit status {rc}"
    assert err.startswith("pyunionfs: ") and err.count("\n") == 1 and err.endswith("\n"), f"{where}: {err!r}"
    assert "Traceback" not in err
    assert diff(before, after) == [], f"{where}: refused, but DIR changed"
    return "refused"


def test_fuzzed_headers_apply_cleanly_or_are_refused_cleanly(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    layers = base_layers()
    outcomes = {"applied": 0, "refused": 0}
    for seed in range(CASES):
        rng = random.Random(seed)
        data = layers[seed % len(layers)]
        for _ in range(rng.choice([1, 1, 2])):
            data = mutate(data, rng)
        if rng.random() < 0.05:
            data = data[:rng.randrange(len(data))]  # cut anywhere: in a header, in data, in a PAX record
        if rng.random() < 0.1:
            data = gzip.compress(data, mtime=0)  # the same, through the gzip reader
        root = tmp_path / f"case{seed}"
        try:
            outcomes[check_case(root, data, seed, capsys)] += 1
        except BaseException:
            (tmp_path / f"seed-{seed}.tar").write_bytes(data)  # for reproducing by hand
            raise
        _clean(root)
    # the fuzz must exercise both outcomes, or it tests nothing
    assert outcomes["applied"] > CASES // 10 and outcomes["refused"] > CASES // 4, outcomes


def _clean(root: Path) -> None:
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
    subprocess.run(["rm", "-rf", str(root)], check=True)


def test_unmutated_base_layers_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The starting points are valid, so a refusal in the fuzz is the mutation's doing."""
    for i, data in enumerate(base_layers()):
        (tmp_path / f"{i}.tar").write_bytes(data)
        assert cli.main(["apply", str(tmp_path / f"{i}.tar"), str(tmp_path / f"out{i}")]) == 0
        assert (tmp_path / f"out{i}/d/file").read_bytes() == b"hello\n"
        assert stat.S_IMODE(os.stat(tmp_path / f"out{i}/suid").st_mode) == 0o4755
        assert os.stat(tmp_path / f"out{i}/d/file").st_uid == 1000


# --------------------------------------------------------------------------
# The real command: exit status and one line
# --------------------------------------------------------------------------


def _gnu_header(name: str, **fields: object) -> bytes:
    info = tarfile.TarInfo(name)
    for k, v in fields.items():
        setattr(info, k, v)
    return info.tobuf(tarfile.GNU_FORMAT)


def hostile_layers() -> dict[str, bytes]:
    ok = _gnu_header("ok", size=3) + b"ok\n".ljust(BLOCK, b"\0")
    end = bytes(2 * BLOCK)
    rng = random.Random(0)
    return {
        "pax-uid-2^40": ok + extended(b"x", pax_record(b"uid", b"1099511627776", rng), rng)
        + _gnu_header("b") + end,
        "base256-uid-(uid_t)-1": ok + _gnu_header("b", uid=2**32 - 1) + end,
        "base256-gid-negative": ok + _gnu_header("b", gid=-5) + end,
        "base256-size-negative": ok + _gnu_header("b", size=-512) + end,
        "gzip-garbage": b"\x1f\x8b\x08\x00" + bytes(rng.randrange(256) for _ in range(600)),
        # tarfile's stream reader skipped 2^64 bytes past the end one empty read at a time: a hang
        "base256-size-2^64": ok + _gnu_header("b", size=2**64) + end,
        "base256-size-2^64-gzip": gzip.compress(ok + _gnu_header("b", size=2**64) + end),
        "pax-header-size-2^64": ok + _gnu_header("././@PaxHeader", type=b"x", size=2**64) + end,
        "pax-xattr-70000": ok + extended(b"x", pax_record(b"SCHILY.xattr.user.big", b"x" * 70_000, rng), rng)
        + _gnu_header("b") + end,
    }


@pytest.mark.parametrize("case", sorted(hostile_layers()))
def test_cli_refuses_in_one_line(tmp_path: Path, case: str) -> None:
    layer = tmp_path / "layer.tar"
    layer.write_bytes(hostile_layers()[case])
    res = subprocess.run([sys.executable, "-m", "pyunionfs", "apply", str(layer), str(tmp_path / "dir")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stdout == "", res
    assert res.stderr.startswith("pyunionfs: ") and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, \
        res.stderr
    assert sorted(os.listdir(tmp_path)) == ["layer.tar"], "a refused layer creates no DIR and leaves no temporary"
