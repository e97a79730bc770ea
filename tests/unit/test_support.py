"""Self-tests of tests/support (layergen, treesnap).

Why: differential tests of pyunionfs are only as good as the stacks they are
fed and the snapshots they compare.  These tests check that generated stacks
are deterministic, mountable by the kernel, really contain merges, whiteouts
and opaque dirs, and that the kernel's view of them is the one predicted by
a tiny reference model of overlayfs (and of OCI layer application, for
``to_oci``): so a pyunionfs mismatch on these stacks is a pyunionfs bug, not
a malformed stack.  They also check that snapshot/diff notice changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ is not a package; make ``tests.support`` importable however pytest
# was started (rootdir-relative, without a conftest).
_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from tests.support import layergen, treesnap  # noqa: E402
from tests.support.layergen import Stack  # noqa: E402
from tests.support.treesnap import Entry, Snapshot  # noqa: E402

SEEDS = range(10)
_EMPTY_SHA = hashlib.sha256(b"").hexdigest()

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlay mounts need root")


# --------------------------------------------------------------------------
# Reference models (from layer snapshots)
# --------------------------------------------------------------------------


def _parent(p: bytes) -> bytes:
    return p.rpartition(b"/")[0] or b"."


def _name(p: bytes) -> bytes:
    return p.rpartition(b"/")[2]


def _child(p: bytes, name: bytes) -> bytes:
    return name if p == b"." else p + b"/" + name


def _children(s: Snapshot) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for p in s:
        if p != b".":
            out.setdefault(_parent(p), []).append(_name(p))
    return out


def _xattr(e: Entry, name: str) -> bytes | None:
    return dict(e.xattrs).get(name)


def _is_kernel_whiteout(s: Snapshot, p: bytes, ns: str) -> bool:
    """Kernel rules: char 0/0, or empty file with overlay.whiteout in an opaque=x dir."""
    e = s.get(p)
    if e is None:
        return False
    if e.kind == "chr" and e.rdev == 0:
        return True
    parent = s.get(_parent(p))
    return (
        e.kind == "reg"
        and e.size == 0
        and _xattr(e, f"{ns}.overlay.whiteout") is not None
        and parent is not None
        and _xattr(parent, f"{ns}.overlay.opaque") == b"x"
    )


def _finish(picked: dict[bytes, tuple[Entry, int]], ns: str) -> Snapshot:
    """Strip overlay-private xattrs and restrict hardlink groups to visible names of the same layer."""
    entries = []
    for p in sorted(picked):
        e, layer = picked[p]
        xattrs = tuple(x for x in e.xattrs if not x[0].startswith(f"{ns}.overlay."))
        links = e.links
        if links is not None:
            links = tuple(q for q in links if q in picked and picked[q][1] == layer)
        entries.append((p, Entry(**{**e.__dict__, "xattrs": xattrs, "links": links})))
    return Snapshot(tuple(entries))


def kernel_model(layers: list[Snapshot], ns: str) -> Snapshot:
    """What overlayfs should show for kernel-format layers (topmost first)."""
    kids = [_children(s) for s in layers]
    picked: dict[bytes, tuple[Entry, int]] = {}

    def visit(path: bytes, stack: list[int]) -> None:
        picked[path] = (layers[stack[0]][path], stack[0])
        names = sorted({n for i in stack for n in kids[i].get(path, ())})
        for name in names:
            cp = _child(path, name)
            sub: list[int] = []
            for i in stack:
                ce = layers[i].get(cp)
                if ce is None:
                    continue
                if _is_kernel_whiteout(layers[i], cp, ns):
                    break
                if ce.kind != "dir":
                    if not sub:
                        picked[cp] = (ce, i)
                    break
                sub.append(i)
                if _xattr(ce, f"{ns}.overlay.opaque") == b"y":
                    break
            if sub:
                visit(cp, sub)

    visit(b".", list(range(len(layers))))
    return _finish(picked, ns)


def oci_model(layers: list[Snapshot]) -> Snapshot:
    """What applying OCI layers (topmost first) bottom-up gives."""
    tree: dict[bytes, tuple[Entry, int]] = {}

    def drop_under(p: bytes, inclusive: bool) -> None:
        pre = b"" if p == b"." else p + b"/"
        for q in [q for q in tree if (q.startswith(pre) and q != b".") or (inclusive and q == p)]:
            del tree[q]

    for i in reversed(range(len(layers))):
        s = layers[i]
        for p in s:
            if _name(p) == b".wh..wh..opq":
                drop_under(_parent(p), inclusive=False)
        # Parents before children ("-dash" sorts before "." as plain bytes).
        for p, e in sorted(s.items(), key=lambda pe: (pe[0] != b".", pe[0].split(b"/"))):
            name = _name(p)
            if name == b".wh..wh..opq":
                continue
            if name.startswith(b".wh."):
                drop_under(_child(_parent(p), name[4:]), inclusive=True)
                continue
            old = tree.get(p)
            if not (e.kind == "dir" and old is not None and old[0].kind == "dir"):
                drop_under(p, inclusive=True)
            tree[p] = (e, i)
    return _finish(tree, "trusted")


def _layer_snaps(stack: Stack) -> list[Snapshot]:
    return [treesnap.snapshot(p, mtime=True) for p in stack.layers]


def _assert_same(expected: Snapshot, actual: Snapshot, what: str) -> None:
    assert expected == actual, f"{what}:\n" + "\n".join(treesnap.diff(expected, actual))


def _interesting_cases(layers: list[Snapshot], merged: Snapshot, ns: str) -> dict[str, list[bytes]]:
    """Find, by comparing layers with the merged view, the cases the generator promises."""
    kids = [_children(s) for s in layers]
    names = ("merged_dir", "whiteout_hidden", "xwhiteout_hidden", "opaque_hidden")
    cases: dict[str, list[bytes]] = {k: [] for k in names}
    for d, visible in _children(merged).items():
        if merged[d].kind == "dir" and not any(set(visible) <= set(k.get(d, ())) for k in kids):
            cases["merged_dir"].append(d)
    for j, s in enumerate(layers):
        for p, _e in s.items():
            if p == b"." or p in merged or _parent(p) not in merged or merged[_parent(p)].kind != "dir":
                continue
            if _is_kernel_whiteout(s, p, ns):
                continue
            for i in range(j):
                hi = layers[i]
                if _is_kernel_whiteout(hi, p, ns):
                    kind = "chr" if hi[p].kind == "chr" else "reg"
                    cases["whiteout_hidden" if kind == "chr" else "xwhiteout_hidden"].append(p)
                    break
                par = hi.get(_parent(p))
                if par is not None and _xattr(par, f"{ns}.overlay.opaque") == b"y":
                    cases["opaque_hidden"].append(p)
                    break
    return cases


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture
def no_leftover_mounts(tmp_path: Path) -> Iterator[None]:
    """Fail the test if anything is still mounted under its tmp_path afterwards."""
    yield
    prefix = os.fsencode(tmp_path) + b"/"
    left = [m for m in layergen.mount_points() if m.startswith(prefix)]
    for m in left:  # clean up before failing, so later tests are unaffected
        layergen.kernel_umount(Path(os.fsdecode(m)))
    assert not left, f"mounts left behind: {left}"


# --------------------------------------------------------------------------
# layergen
# --------------------------------------------------------------------------


@pytest.mark.parametrize("upper", [True, False])
def test_build_stack_is_deterministic(tmp_path: Path, upper: bool) -> None:
    a = layergen.build_stack(tmp_path / "a", 7, upper=upper)
    b = layergen.build_stack(tmp_path / "b", 7, upper=upper)
    c = layergen.build_stack(tmp_path / "c", 8, upper=upper)
    assert len(a.layers) == 3 + upper
    for la, lb in zip(a.layers, b.layers, strict=False):
        assert la.name == lb.name
        _assert_same(treesnap.snapshot(la, mtime=True), treesnap.snapshot(lb, mtime=True), la.name)
    assert [treesnap.snapshot(p) for p in a.layers] != [treesnap.snapshot(p) for p in c.layers]
    if upper:
        assert a.work is not None and a.work.is_dir() and not any(a.work.iterdir())
    else:
        assert a.upper is None and a.work is None


def test_layers_contain_all_entry_kinds(tmp_path: Path) -> None:
    """Across a few seeds every kind of entry and marker shows up."""
    kinds: set[str] = set()
    odd: set[bytes] = set()
    hardlinked = opaque_y = opaque_x = setuid = user_xattrs = False
    for seed in range(4):
        stack = layergen.build_stack(tmp_path / str(seed), seed)
        for s in _layer_snaps(stack):
            for p, e in s.items():
                kinds.add(e.kind)
                odd.update(n for n in layergen.ODD_NAMES if _name(p) == n)
                hardlinked |= e.links is not None and len(e.links) > 1
                opaque_y |= _xattr(e, "trusted.overlay.opaque") == b"y"
                opaque_x |= _xattr(e, "trusted.overlay.opaque") == b"x"
                setuid |= bool(e.mode & stat.S_ISUID)
                user_xattrs |= any(k.startswith("user.") for k, _ in e.xattrs)
                assert not _name(p).startswith(b".wh."), p
                if e.kind == "chr":
                    assert e.rdev == 0
    assert kinds == {"reg", "dir", "lnk", "fifo", "chr"}
    assert odd == set(layergen.ODD_NAMES)
    assert hardlinked and opaque_y and opaque_x and setuid and user_xattrs


def test_bad_base_path_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        layergen.build_stack(tmp_path / "a:b", 1)


def _check_mounted_stack(tmp_path: Path, stack: Stack, min_cases: tuple[str, ...]) -> None:
    ns = stack.xattr_ns
    layers = _layer_snaps(stack)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with layergen.kernel_mounted(stack, mnt):
        assert layergen.is_mounted(mnt)
        merged = treesnap.snapshot(mnt, mtime=True)
    assert not layergen.is_mounted(mnt)

    assert merged.errors == (), merged.errors
    for p, e in merged.items():
        assert e.kind != "chr", p
        assert not any(k.startswith(f"{ns}.overlay.") for k, _ in e.xattrs), p
    _assert_same(kernel_model(layers, ns), merged, "kernel model vs kernel mount")

    cases = _interesting_cases(layers, merged, ns)
    for name in min_cases:
        assert cases[name], f"generator produced no {name}: {cases}"

    # The same stack in OCI format must give the same merged tree.
    oci = layergen.to_oci(stack, tmp_path / "oci")
    _assert_same(merged, oci_model([treesnap.snapshot(p, mtime=True) for p in oci.layers]), "kernel mount vs OCI model")


@needs_root
@pytest.mark.usefixtures("no_leftover_mounts")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("upper", [True, False])
def test_kernel_mounts_stack(tmp_path: Path, seed: int, upper: bool) -> None:
    stack = layergen.build_stack(tmp_path / "stack", seed, upper=upper)
    _check_mounted_stack(
        tmp_path, stack, ("merged_dir", "whiteout_hidden", "xwhiteout_hidden", "opaque_hidden")
    )


@needs_root
@pytest.mark.usefixtures("no_leftover_mounts")
@pytest.mark.parametrize(("seed", "n_lowers", "upper"), [(100, 2, True), (101, 4, False), (102, 1, True)])
def test_kernel_mounts_user_xattr_stack(tmp_path: Path, seed: int, n_lowers: int, upper: bool) -> None:
    stack = layergen.build_stack(tmp_path / "stack", seed, n_lowers=n_lowers, upper=upper, xattr_ns="user")
    cases = ["merged_dir", "whiteout_hidden", "opaque_hidden"] + ["xwhiteout_hidden"] * (n_lowers >= 2)
    _check_mounted_stack(tmp_path, stack, tuple(cases))


@needs_root
@pytest.mark.usefixtures("no_leftover_mounts")
def test_kernel_mount_without_xwhiteouts(tmp_path: Path) -> None:
    stack = layergen.build_stack(tmp_path / "stack", 5, xwhiteouts=False)
    for s in _layer_snaps(stack):
        assert all(_xattr(e, "trusted.overlay.whiteout") is None for _, e in s.items())
    _check_mounted_stack(tmp_path, stack, ("merged_dir", "whiteout_hidden", "opaque_hidden"))


@needs_root
def test_kernel_umount_is_lazy_when_busy(tmp_path: Path) -> None:
    stack = layergen.build_stack(tmp_path / "stack", 3, upper=False)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    layergen.kernel_mount(stack, mnt)
    fd = os.open(mnt / "ovl", os.O_RDONLY | os.O_DIRECTORY)  # keeps the mount busy: plain umount fails
    try:
        layergen.kernel_umount(mnt)
        assert not layergen.is_mounted(mnt)
    finally:
        os.close(fd)
        if layergen.is_mounted(mnt):
            layergen.kernel_umount(mnt)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_to_oci_converts_markers(tmp_path: Path, seed: int) -> None:
    ns = "user" if seed == 2 else "trusted"
    stack = layergen.build_stack(tmp_path / "k", seed, xattr_ns=ns)
    oci = layergen.to_oci(stack, tmp_path / "oci")
    assert [p.name for p in oci.layers] == [p.name for p in stack.layers]
    assert oci.work is not None and oci.work.is_dir() and oci.xattr_ns == ns
    n_wh = n_opq = 0
    for kpath, opath in zip(stack.layers, oci.layers, strict=False):
        k = treesnap.snapshot(kpath, mtime=True)
        o = treesnap.snapshot(opath, mtime=True)
        # Build the expected OCI snapshot from the kernel-format one.
        expected: dict[bytes, Entry] = {}
        for p, e in k.items():
            if _is_kernel_whiteout(k, p, ns):
                wp = _child(_parent(p), b".wh." + _name(p))
                expected[wp] = Entry("reg", 0o644, 0, 0, 0, _EMPTY_SHA, links=(wp,), mtime_ns=e.mtime_ns)
                n_wh += 1
                continue
            if _xattr(e, f"{ns}.overlay.opaque") == b"y":
                mp = _child(p, b".wh..wh..opq")
                expected[mp] = Entry("reg", 0o644, 0, 0, 0, _EMPTY_SHA, links=(mp,), mtime_ns=e.mtime_ns)
                n_opq += 1
            xattrs = tuple(x for x in e.xattrs if not x[0].startswith(f"{ns}.overlay."))
            expected[p] = Entry(**{**e.__dict__, "xattrs": xattrs})
        _assert_same(Snapshot(tuple(sorted(expected.items()))), o, opath.name)
        assert not any(e.kind == "chr" for _, e in o.items())
    assert n_wh and n_opq


# --------------------------------------------------------------------------
# treesnap
# --------------------------------------------------------------------------


def _small_tree(root: Path) -> None:
    root.mkdir()
    (root / "f").write_bytes(b"hello")
    os.chmod(root / "f", 0o644)
    os.link(root / "f", root / "g")
    (root / "d").mkdir()
    (root / "d" / "h").write_bytes(b"x" * 10)
    os.symlink("../f", root / "d" / "ln")
    os.symlink("/nonexistent", root / "dangling")
    os.mkfifo(root / "fifo")
    (root / os.fsdecode(b"caf\xe9\nx")).write_bytes(b"")
    os.setxattr(root / "d" / "h", "user.k", b"v")


def test_snapshot_records_fields(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _small_tree(root)
    s = treesnap.snapshot(root)
    assert s == treesnap.snapshot(os.fsencode(root)) and s.errors == ()
    assert set(s) == {b".", b"f", b"g", b"d", b"d/h", b"d/ln", b"dangling", b"fifo", b"caf\xe9\nx"}
    assert s[b"."].kind == "dir" and s[b"."].links is None and s[b"."].size is None
    assert s[b"f"].links == (b"f", b"g") == s[b"g"].links
    assert s[b"f"].sha256 == hashlib.sha256(b"hello").hexdigest() and s[b"f"].size == 5
    assert s[b"d/ln"].kind == "lnk" and s[b"d/ln"].target == b"../f"
    assert s[b"dangling"].target == b"/nonexistent"
    assert s[b"fifo"].kind == "fifo" and s[b"fifo"].sha256 is None
    assert s[b"d/h"].xattrs == (("user.k", b"v"),)
    assert s[b"f"].mtime_ns is None and treesnap.snapshot(root, mtime=True)[b"f"].mtime_ns is not None
    assert treesnap.snapshot(root, ignore_xattrs=("user.",))[b"d/h"].xattrs == ()
    assert treesnap.diff(s, treesnap.snapshot(root)) == []
    sub = s.subset(lambda p, e: p != b"g")
    assert b"g" not in sub and sub[b"f"].links == (b"f",)


def test_diff_detects_changes(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _small_tree(root)
    before = treesnap.snapshot(root)

    os.chmod(root / "d" / "h", 0o600)
    after = treesnap.snapshot(root)
    assert after != before
    assert treesnap.diff(before, after) == ["d/h: mode 0o644 != 0o600"]

    (root / "d" / "h").write_bytes(b"y" * 10)
    lines = treesnap.diff(before, treesnap.snapshot(root))
    assert any(line.startswith("d/h: sha256 ") for line in lines), lines

    # Break the hardlink: g becomes an identical copy of f.
    os.unlink(root / "g")
    shutil.copy2(root / "f", root / "g")
    lines = treesnap.diff(before, treesnap.snapshot(root))
    assert "f: links (f, g) != (f)" in lines and "g: links (f, g) != (g)" in lines, lines

    os.unlink(root / "fifo")
    (root / "fifo").mkdir()
    os.unlink(root / os.fsdecode(b"caf\xe9\nx"))
    lines = treesnap.diff(before, treesnap.snapshot(root))
    assert "fifo: kind fifo != dir" in lines and "only in A: caf\\xe9\\nx (reg)" in lines, lines

    many = treesnap.diff(before, treesnap.snapshot(root), limit=2)
    assert len(many) == 3 and many[-1].startswith("... ")


def test_snapshot_records_vanished_names(tmp_path: Path) -> None:
    """A name listed but not lstat-able is an error entry, and diff shows it."""
    root = tmp_path / "t"
    _small_tree(root)
    a = treesnap.snapshot(root)
    b = Snapshot(a.entries, ((b"ghost", "lstat", 2),))
    assert a != b
    assert treesnap.diff(a, b) == ["error only in B: ghost: lstat ENOENT"]


@needs_root
def test_no_overlay_mounts_left_behind(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runs last in this module: nothing of ours may remain mounted."""
    base = os.fsencode(tmp_path_factory.getbasetemp()) + b"/"
    assert not [m for m in layergen.mount_points() if m.startswith(base)]
