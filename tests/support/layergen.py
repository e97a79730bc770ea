"""Random, reproducible overlay layer stacks for differential tests.

Why this exists: pyunionfs must show exactly the merged tree the kernel's
overlayfs shows for the same layers.  The cheapest strong test is
differential: build a random stack of layer directories, mount it once with
``mount -t overlay`` and once with pyunionfs, and compare snapshots (see
``treesnap``).  Hand-written fixtures only cover the cases someone thought
of; these stacks are built so that layers overlap heavily (names come from a
small shared pool) and therefore exercise dir-over-dir merges several levels
deep, type conflicts (file over dir, dir over file, symlink over dir),
whiteouts and opaque directories in both the kernel and the OCI formats.

Everything is derived from ``random.Random(seed)``, including timestamps, so
a failing seed can be rebuilt and bisected.

The stacks are *well formed* in the sense that the kernel's view of them is
unambiguous.  The kernel has quirks on malformed stacks that no union
filesystem should copy, so the generator avoids them (each was observed on
Linux 6.18):

* A whiteout inside a directory that is not merged (it comes from a single
  layer: only one layer has it, or it is opaque in the topmost layer that has
  it, or it sits over a non-directory) is *listed* by the kernel's readdir
  (as a char device, or as a regular file for an xattr whiteout) but
  ``lstat`` of it fails with ENOENT.  Such orphan whiteouts are removed.
* xattr whiteouts are honoured by readdir only in a directory whose
  ``overlay.opaque`` is ``x``, while lookup honours them anywhere in a layer
  that has such a directory.  They are only placed in ``x`` directories.
* Lookup only reads ``opaque=x`` in a layer that is not "last" for the
  lookup: with the default redirect_dir=off (which still follows), that is
  the overall lowest layer; with ``userxattr`` (nofollow) it is the lowest
  layer of the parent directory's merged stack.  Readdir then does not
  filter xattr whiteouts of such a directory, but lookup of them still
  fails.  xattr whiteouts are only kept where a layer below exists in the
  parent's stack (this satisfies both modes).
* xattr whiteouts in the *upper* layer are honoured by lookup but not filtered
  from readdir; they are only placed in lower layers.
* An xattr whiteout must be a zero-size regular file (a non-empty file or a
  directory carrying the xattr is an ordinary entry).
* ``.wh.`` + a 255-byte name does not fit in NAME_MAX, so the 255-byte name
  is never whited out (the 251-byte name is, to cover the boundary).

Mounting modifies the upper layer: the kernel sets ``overlay.uuid`` and
``overlay.impure`` on the upper root and creates ``work/work``.  Snapshot
layers before mounting if you need the pristine state.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import random
import stat
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyunionfs.fuse.mountinfo import unescape_mountinfo

__all__ = [
    "DIR_MODES",
    "FILE_MODES",
    "LONG_NAME",
    "LONG_NAME_WH",
    "NAME_POOL",
    "OWNERS",
    "Stack",
    "build_stack",
    "is_mounted",
    "kernel_mount",
    "kernel_mounted",
    "kernel_umount",
    "mount_points",
    "to_oci",
]

#: The longest legal name; never whited out (``.wh.`` + it exceeds NAME_MAX).
LONG_NAME = b"L" * 255
#: The longest name whose OCI whiteout ``.wh.NAME`` still fits in 255 bytes.
LONG_NAME_WH = b"W" * 251
#: Names that break naive code: space, newline, non-UTF-8, NAME_MAX, option-like.
ODD_NAMES: tuple[bytes, ...] = (b"with space", b"new\nline", b"caf\xe9", LONG_NAME, LONG_NAME_WH, b"-dash")
#: Small on purpose: a small pool is what makes layers collide on paths.
NAME_POOL: tuple[bytes, ...] = (b"a", b"b", b"c", b"d", b"dir1", b"dir2", b"sub", b"f.txt") + ODD_NAMES
#: Names that are usually directories, so that dir-over-dir merges go deep.
_DIRISH = frozenset({b"dir1", b"dir2", b"sub"})
_CORE: tuple[bytes, ...] = (b"a", b"b", b"c", b"d", b"sub", b"dir1", b"f.txt")

FILE_MODES: tuple[int, ...] = (0o644, 0o600, 0o755, 0o700, 0o444, 0o000, 0o4755)
DIR_MODES: tuple[int, ...] = (0o755, 0o700, 0o1777, 0o555)
OWNERS: tuple[int, ...] = (0, 1000, 1234)

_SYMLINK_TARGETS: tuple[bytes, ...] = (
    b"/etc",
    b"/etc/passwd",
    b"../a",
    b"f.txt",
    b"dir1",
    b"dir1/sub",
    b"nonexistent/dangling",
    b"../../../../nowhere",
    b"/nonexistent-abs",
    b".",
    b"caf\xe9",
)
_INTERNAL = b"\0internal"  # placeholder target: resolved to a dir of the same layer

_MAX_DEPTH = 4
_LAYER_BUDGET = (25, 45)  # random entries per layer, before the fixed scenarios
_EPOCH_NS = 1_500_000_000 * 10**9

_OPQ_OCI = b".wh..wh..opq"
_WH_OCI = b".wh."


@dataclass(frozen=True)
class Stack:
    """Layer directories of one overlay, in the kernel's order.

    ``lowers`` is topmost first, exactly as in ``lowerdir=L1:L2:L3``.
    ``work`` is an empty directory on the same filesystem as ``upper`` for
    the kernel's ``workdir=`` (None when there is no upper).
    ``xattr_ns`` is ``"trusted"`` or ``"user"``: the namespace of the
    ``overlay.opaque`` / ``overlay.whiteout`` markers (``user`` needs
    ``-o userxattr`` with the kernel).
    """

    lowers: tuple[Path, ...]
    upper: Path | None
    work: Path | None
    xattr_ns: str = "trusted"

    @property
    def layers(self) -> tuple[Path, ...]:
        """All layers topmost first (upper, if any, then the lowers)."""
        return ((self.upper,) if self.upper is not None else ()) + self.lowers


# --------------------------------------------------------------------------
# In-memory model
# --------------------------------------------------------------------------


@dataclass(eq=False)
class _Node:
    """One entry of a layer before it is written to disk.

    Hardlinks are the *same* ``_Node`` object at two places in the tree, so
    identity (not equality) matters: ``eq=False``.
    """

    kind: str  # "dir", "reg", "lnk", "fifo", "wh" (char 0/0), "xwh" (xattr whiteout)
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    data: bytes = b""
    target: bytes = b""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    opaque: bytes | None = None  # b"y" or b"x" (directories only)
    children: dict[bytes, _Node] = field(default_factory=dict)


def _is_whiteout(parent: _Node, child: _Node) -> bool:
    """Whether *child* hides the name in lower layers (kernel rules, see module doc)."""
    return child.kind == "wh" or (child.kind == "xwh" and parent.opaque == b"x")


class _Maker:
    """Creates nodes with random metadata; all randomness goes through one rng."""

    def __init__(self, rng: random.Random, ns: str) -> None:
        self.rng = rng
        self.ns = ns

    def _stamp(self, node: _Node) -> _Node:
        r = self.rng
        node.mtime_ns = _EPOCH_NS + r.randrange(10**8) * 10**9 + r.randrange(10**9)
        node.atime_ns = _EPOCH_NS + r.randrange(10**8) * 10**9 + r.randrange(10**9)
        return node

    def _owner(self, node: _Node) -> None:
        node.uid = self.rng.choice(OWNERS)
        node.gid = self.rng.choice(OWNERS)

    def _user_xattrs(self, node: _Node) -> None:
        # user.* xattrs are only allowed on regular files and directories.
        r = self.rng
        if r.random() < 0.3:
            node.xattrs["user.test"] = r.randbytes(r.randint(0, 12))
            if r.random() < 0.5:
                node.xattrs["user.other"] = r.choice([b"", b"v", b"\x00\xff", b"hello world"])

    def data(self) -> bytes:
        r = self.rng
        x = r.random()
        if x < 0.15:
            return b""
        if x < 0.19:
            return r.randbytes(200 * 1024 + r.randrange(4096))
        return r.randbytes(r.randint(1, 4096))

    def reg(self, data: bytes | None = None) -> _Node:
        n = _Node("reg", data=self.data() if data is None else data)
        n.mode = self.rng.choice(FILE_MODES)
        self._owner(n)
        self._user_xattrs(n)
        return self._stamp(n)

    def dir(self, children: dict[bytes, _Node] | None = None, opaque: bytes | None = None) -> _Node:
        n = _Node("dir", children=dict(children or {}), opaque=opaque)
        n.mode = self.rng.choice(DIR_MODES)
        self._owner(n)
        self._user_xattrs(n)
        return self._stamp(n)

    def lnk(self, target: bytes) -> _Node:
        n = _Node("lnk", target=target, mode=0o777)
        self._owner(n)
        return self._stamp(n)

    def fifo(self) -> _Node:
        n = _Node("fifo", mode=self.rng.choice(FILE_MODES[:-1]))
        self._owner(n)
        return self._stamp(n)

    def wh(self) -> _Node:
        # What the kernel itself creates: char 0/0, mode 0, owned by root.
        return self._stamp(_Node("wh", mode=0))

    def xwh(self) -> _Node:
        n = _Node("xwh", mode=self.rng.choice((0o644, 0o600, 0o000)))
        n.xattrs[f"{self.ns}.overlay.whiteout"] = b""
        return self._stamp(n)


class _LayerGen:
    """Random tree for one layer, drawing names from the shared pool."""

    def __init__(self, mk: _Maker, allow_xwh: bool) -> None:
        self.mk = mk
        self.rng = mk.rng
        self.allow_xwh = allow_xwh
        self.budget = self.rng.randint(*_LAYER_BUDGET)
        self.dirs: list[tuple[bytes, _Node]] = []  # (relative path, node)
        self.regs: list[tuple[bytes, _Node]] = []
        self.internal_links: list[tuple[bytes, _Node]] = []  # (parent path, node)

    def build(self) -> _Node:
        root = self.mk.dir()
        self.dirs.append((b"", root))
        self._fill(root, b"", 1)
        self._add_hardlinks()
        self._resolve_internal_links()
        return root

    def _fill(self, d: _Node, path: bytes, depth: int) -> None:
        r = self.rng
        if depth == 1:
            # dir1/dir2 in every layer root: the seeds of deep dir-over-dir merges.
            rest = [n for n in NAME_POOL if n not in (b"dir1", b"dir2")]
            names = [b"dir1", b"dir2"] + r.sample(rest, r.randint(3, 7))
        else:
            # Mostly plain names, so that same-path subtrees of different layers collide.
            names = [b"sub"] if depth < _MAX_DEPTH and r.random() < 0.6 else []
            names += [r.choice(_CORE if r.random() < 0.8 else ODD_NAMES) for _ in range(r.randint(2, 5))]
            names = list(dict.fromkeys(names))
        for name in names:
            if self.budget <= 0:
                return
            self.budget -= 1
            child_path = path + b"/" + name if path else name
            d.children[name] = self._entry(d, child_path, depth)

    def _entry(self, parent: _Node, path: bytes, depth: int) -> _Node:
        r = self.rng
        name = posixpath.basename(path)
        p_dir = 0.0 if depth >= _MAX_DEPTH else (0.85 if name in _DIRISH else 0.2)
        if r.random() < p_dir:
            node = self.mk.dir(opaque=b"y" if r.random() < 0.1 else None)
            self.dirs.append((path, node))
            self._fill(node, path, depth + 1)
            return node
        kinds = ["reg", "lnk", "fifo", "wh", "xwh"]
        weights = [45, 15, 6, 14, 8]
        # Whiteouts in an opaque dir hide nothing; the kernel never makes them.
        can_wh = parent.opaque != b"y" and name != LONG_NAME
        if not can_wh:
            weights[3] = 0
        # xattr whiteouts: lower layers only, never in a layer root, parent not opaque=y.
        if not (self.allow_xwh and can_wh and depth >= 2):
            weights[4] = 0
        kind = r.choices(kinds, weights)[0]
        if kind == "reg":
            node = self.mk.reg()
            self.regs.append((path, node))
            return node
        if kind == "lnk":
            if r.random() < 0.25:
                node = self.mk.lnk(_INTERNAL)
                self.internal_links.append((posixpath.dirname(path), node))
                return node
            return self.mk.lnk(r.choice(_SYMLINK_TARGETS))
        if kind == "fifo":
            return self.mk.fifo()
        if kind == "wh":
            return self.mk.wh()
        parent.opaque = b"x"
        return self.mk.xwh()

    def _add_hardlinks(self) -> None:
        r = self.rng
        if not self.regs:
            return
        for _ in range(r.randint(1, 3)):
            fpath, node = r.choice(self.regs)
            if r.random() < 0.5:
                dpath = posixpath.dirname(fpath)
                d = next(n for p, n in self.dirs if p == dpath)
            else:
                dpath, d = r.choice(self.dirs)
            free = [n for n in NAME_POOL if n not in d.children]
            if not free:
                continue
            d.children[r.choice(free)] = node

    def _resolve_internal_links(self) -> None:
        for parent, node in self.internal_links:
            dpath, _ = self.rng.choice(self.dirs)
            node.target = os.path.relpath(b"/r/" + dpath, b"/r/" + parent) if dpath != parent else b"."


def _add_scenarios(roots: list[_Node], is_upper: list[bool], mk: _Maker, xwhiteouts: bool) -> None:
    """Fixed cases every stack must contain, under names the random part never uses.

    Why: random trees cover combinations, but the self-tests (and users) rely
    on every stack having a deep merged dir, a whiteout-hidden name, an
    opaque-hidden name, type conflicts and ``etc -> /etc`` over a real
    ``etc/``.  They live under ``ovl/`` (present, non-opaque, in every layer,
    hence merged) and ``etc``.
    """
    n = len(roots)
    ovl = [mk.dir() for _ in roots]
    for root, o in zip(roots, ovl, strict=False):
        root.children[b"ovl"] = o
    if n < 2:
        ovl[0].children[b"a"] = mk.reg()
        return
    top, bot = 0, n - 1
    mid = 1 if n >= 3 else None
    T, B = ovl[top], ovl[bot]

    # Merge several levels deep: ovl/deep/sub/dir1 in every layer.
    for i, o in enumerate(ovl):
        leaf = mk.dir({b"from%d" % i: mk.reg()})
        o.children[b"deep"] = mk.dir({b"from%d" % i: mk.reg(), b"sub": mk.dir({b"dir1": leaf})})

    # Kernel-format whiteouts over a file, a (merged) dir and a fifo.
    B.children[b"caf\xe9"] = mk.reg()
    B.children[b"gone_dir"] = mk.dir({b"x": mk.reg(), b"y": mk.dir()})
    B.children[b"new\nline"] = mk.fifo()
    T.children[b"caf\xe9"] = mk.wh()
    T.children[b"gone_dir"] = mk.wh()
    if mid is not None and mid != bot:
        ovl[mid].children[b"gone_dir"] = mk.dir({b"z": mk.reg()})
        ovl[mid].children[b"new\nline"] = mk.wh()
    else:
        T.children[b"new\nline"] = mk.wh()
    T.children[LONG_NAME_WH] = mk.wh()
    B.children[LONG_NAME_WH] = mk.reg()

    # Opaque dir over a dir (and a non-opaque dir merged on top of the opaque one).
    B.children[b"with space"] = mk.dir({b"a": mk.reg(), b"b": mk.reg(), b"sub": mk.dir({b"c": mk.reg()})})
    o = mid if mid is not None else top
    ovl[o].children[b"with space"] = mk.dir({b"a": mk.reg(), b"d": mk.reg()}, opaque=b"y")
    if o != top:
        T.children[b"with space"] = mk.dir({b"e": mk.reg()})

    # xattr whiteouts in a lower that has another lower beneath it.
    lowers = [i for i in range(n) if not is_upper[i]]
    if xwhiteouts and len(lowers) >= 2:
        xl = lowers[-2]
        ovl[xl].children[b"xw"] = mk.dir({b"a": mk.xwh(), b"sub": mk.xwh(), b"keep": mk.reg()}, opaque=b"x")
        B.children[b"xw"] = mk.dir({b"a": mk.reg(), b"sub": mk.dir({b"z": mk.reg()}), b"b": mk.reg()})

    # Type conflicts.
    T.children[b"fod"] = mk.reg()
    B.children[b"fod"] = mk.dir({b"q": mk.reg()})
    T.children[b"dof"] = mk.dir({b"q": mk.reg()})
    B.children[b"dof"] = mk.reg()
    T.children[b"lod"] = mk.lnk(b"deep")
    B.children[b"lod"] = mk.dir({b"q": mk.reg()})
    T.children[b"-dash"] = mk.fifo()
    B.children[b"-dash"] = mk.reg()

    # Hardlinks across dirs, one of them with a name shadowed from above.
    h1, h2 = mk.reg(), mk.reg()
    B.children[b"hl"] = h1
    B.children[b"deep"].children[b"hl"] = h1
    B.children[b"hlh"] = h2
    B.children[b"deep"].children[b"sub"].children[b"hlh"] = h2
    T.children[b"hlh"] = mk.reg()

    # etc -> /etc in a higher layer over a real etc/ in the bottom one.
    roots[bot].children[b"etc"] = mk.dir(
        {b"passwd": mk.reg(b"root:x:0:0:not the real one:/root:/bin/sh\n"), b"sub": mk.dir()}
    )
    roots[bot - 1].children[b"etc"] = mk.lnk(b"/etc")


def _drop_orphan_whiteouts(roots: list[_Node]) -> None:
    """Remove whiteouts the kernel would handle inconsistently.

    Why: for these the kernel's readdir lists the name while lookup fails
    with ENOENT (see the module docstring); OCI semantics simply drop them.
    Keeping them would make differential tests compare a kernel quirk.

    * any whiteout in a visible directory that is not merged;
    * xattr whiteouts in an ``x`` directory of a layer that is the lowest one
      of its parent's merged stack: lookup only notices ``opaque=x`` in a
      layer that is not "last" (with redirect following, the overall
      lowest layer; with ``userxattr``/nofollow, the parent's lowest).
    """

    def visit(stack: list[tuple[int, _Node]], parent_layers: list[int]) -> None:
        for i, d in stack:
            if d.opaque == b"x" and not any(j > i for j in parent_layers):
                for name in [k for k, c in d.children.items() if c.kind == "xwh"]:
                    del d.children[name]
        if len(stack) == 1:
            d = stack[0][1]
            for name in [k for k, c in d.children.items() if _is_whiteout(d, c)]:
                del d.children[name]
        names: dict[bytes, None] = {}
        for _, d in stack:
            names.update(dict.fromkeys(d.children))
        layers = [i for i, _ in stack]
        for name in names:
            sub: list[tuple[int, _Node]] = []
            for i, d in stack:
                c = d.children.get(name)
                if c is None:
                    continue
                if _is_whiteout(d, c) or c.kind != "dir":
                    break
                sub.append((i, c))
                if c.opaque == b"y":
                    break
            if sub:
                visit(sub, layers)

    visit(list(enumerate(roots)), [])


def _materialize(root: _Node, dest: bytes, ns: str) -> None:
    """Write a model to *dest* (must not exist).

    Three passes, because each step disturbs the previous one's result:
    creating entries changes the parent dir's mtime, and chown clears the
    setuid bit; so create everything, then owners/modes/xattrs, then times.
    """
    os.mkdir(dest, 0o700)
    done: dict[int, bytes] = {}
    order: list[tuple[bytes, _Node]] = []

    def make(node: _Node, p: bytes, is_root: bool = False) -> None:
        if node.kind == "dir":
            if not is_root:
                os.mkdir(p, 0o700)
            for name, child in node.children.items():
                make(child, p + b"/" + name)
        elif id(node) in done:
            os.link(done[id(node)], p)
            return
        elif node.kind in ("reg", "xwh"):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(node.data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        elif node.kind == "lnk":
            os.symlink(node.target, p)
        elif node.kind == "fifo":
            os.mkfifo(p, 0o600)
        elif node.kind == "wh":
            os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        else:  # pragma: no cover - model bug
            raise AssertionError(node.kind)
        done[id(node)] = p
        order.append((p, node))  # children before parents: post-order

    make(root, dest, is_root=True)
    for p, node in order:
        os.lchown(p, node.uid, node.gid)
        if node.kind != "lnk":
            os.chmod(p, node.mode)
        for k, v in node.xattrs.items():
            os.setxattr(p, k, v, follow_symlinks=False)
        if node.opaque is not None:
            os.setxattr(p, f"{ns}.overlay.opaque", node.opaque, follow_symlinks=False)
    for p, node in order:
        os.utime(p, ns=(node.atime_ns, node.mtime_ns), follow_symlinks=False)


def _check_layer_path(p: Path) -> Path:
    """Absolute path usable in ``lowerdir=``: no separators the kernel would split on."""
    p = Path(os.path.abspath(p))
    b = os.fsencode(p)
    for bad in (b":", b",", b"\\", b"\n"):
        if bad in b:
            raise ValueError(f"layer path {p!s} contains {bad!r}, which overlay mount options cannot take")
    return p


def build_stack(
    base: Path,
    seed: int,
    n_lowers: int = 3,
    upper: bool = True,
    xattr_ns: str = "trusted",
    xwhiteouts: bool = True,
) -> Stack:
    """Create a random layer stack under *base* (created if missing).

    Layers are ``base/lower0`` (topmost) .. ``base/lower{n-1}``, plus
    ``base/upper`` and an empty ``base/work`` when *upper*.  Those must not
    exist yet.  The same seed always gives the same trees, contents,
    owners, modes, xattrs and timestamps.  With ``xwhiteouts`` some lower
    layers also contain xattr whiteouts (kernel 6.7+ format).  Note: a
    lowerdir-only kernel mount needs ``n_lowers >= 2``.
    """
    if xattr_ns not in ("trusted", "user"):
        raise ValueError(f"xattr_ns must be 'trusted' or 'user', not {xattr_ns!r}")
    if n_lowers < 1:
        raise ValueError("need at least one lower layer")
    base = _check_layer_path(base)
    base.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    mk = _Maker(rng, xattr_ns)
    is_upper = [True] * bool(upper) + [False] * n_lowers
    roots = [_LayerGen(mk, allow_xwh=xwhiteouts and not u).build() for u in is_upper]
    _add_scenarios(roots, is_upper, mk, xwhiteouts)
    _drop_orphan_whiteouts(roots)

    names = (["upper"] if upper else []) + [f"lower{i}" for i in range(n_lowers)]
    paths = [base / name for name in names]
    for root, p in zip(roots, paths, strict=False):
        _materialize(root, os.fsencode(p), xattr_ns)
    work = None
    if upper:
        work = base / "work"
        work.mkdir()
    return Stack(
        lowers=tuple(paths[1:] if upper else paths),
        upper=paths[0] if upper else None,
        work=work,
        xattr_ns=xattr_ns,
    )


# --------------------------------------------------------------------------
# OCI conversion
# --------------------------------------------------------------------------


def _xattrs(p: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name in sorted(os.listxattr(p, follow_symlinks=False)):
        out[name] = os.getxattr(p, name, follow_symlinks=False)
    return out


def _copy_layer_oci(src_root: bytes, dst_root: bytes, ns: str) -> None:
    """Copy one layer, rewriting kernel markers into OCI ``.wh.`` files.

    Every ``{ns}.overlay.*`` xattr is dropped: they are overlayfs-private
    (markers, or ``uuid``/``impure`` left on an upper by a kernel mount) and
    OCI layers have no such metadata.
    """
    private = f"{ns}.overlay."
    links: dict[tuple[int, int], bytes] = {}
    # (dst path, lstat of source or None for a synthesized marker, xattrs)
    order: list[tuple[bytes, os.stat_result, dict[str, bytes], bool]] = []

    def marker(dst: bytes, like: os.stat_result) -> None:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.close(fd)
        order.append((dst, like, {}, True))

    def copy(src: bytes, dst: bytes, st: os.stat_result, parent_opaque: bytes | None) -> None:
        mode = st.st_mode
        xa = _xattrs(src)
        if stat.S_ISDIR(mode):
            os.mkdir(dst, 0o700)
            opaque = xa.get(f"{ns}.overlay.opaque")
            if opaque == b"y":
                marker(dst + b"/" + _OPQ_OCI, st)
            for name in sorted(os.listdir(src)):
                if name.startswith(_WH_OCI):
                    raise ValueError(f"{src!r}/{name!r}: layer already contains an OCI marker name")
                s, cst = src + b"/" + name, os.lstat(src + b"/" + name)
                d = dst + b"/" + name
                if stat.S_ISCHR(cst.st_mode) and cst.st_rdev == 0 or (
                    opaque == b"x"
                    and stat.S_ISREG(cst.st_mode)
                    and cst.st_size == 0
                    and f"{ns}.overlay.whiteout" in os.listxattr(s, follow_symlinks=False)
                ):
                    marker(dst + b"/" + _WH_OCI + name, cst)
                else:
                    copy(s, d, cst, opaque)
        else:
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in links:
                os.link(links[key], dst)
                return
            links[key] = dst
            if stat.S_ISREG(mode):
                with open(src, "rb") as fi, open(dst, "xb") as fo:
                    while chunk := fi.read(1 << 20):
                        fo.write(chunk)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(src), dst)
            elif stat.S_ISFIFO(mode):
                os.mkfifo(dst, 0o600)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                os.mknod(dst, stat.S_IFMT(mode) | 0o600, st.st_rdev)
            else:
                raise ValueError(f"{src!r}: cannot copy file type {stat.S_IFMT(mode):o}")
        order.append((dst, st, {k: v for k, v in xa.items() if not k.startswith(private)}, False))

    copy(src_root, dst_root, os.lstat(src_root), None)
    for p, st, xa, is_marker in order:
        if is_marker:
            os.lchown(p, 0, 0)
            os.chmod(p, 0o644)
            continue
        os.lchown(p, st.st_uid, st.st_gid)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(p, stat.S_IMODE(st.st_mode))
        for k, v in xa.items():
            os.setxattr(p, k, v, follow_symlinks=False)
    for p, st, _, _ in order:
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def to_oci(stack: Stack, dest: Path) -> Stack:
    """Copy *stack* into *dest* in OCI image-layer format; return the new Stack.

    Why: pyunionfs also reads OCI layers, and must show the same merged tree
    for them as the kernel shows for the kernel-format originals.  Modes,
    owners, times, xattrs, hardlinks, symlinks and fifos are preserved;
    a char 0/0 whiteout or an xattr whiteout ``NAME`` becomes an empty
    ``.wh.NAME``; an ``opaque=y`` dir gets ``.wh..wh..opq`` and loses the
    xattr; ``opaque=x`` is dropped.  Layer directory names are kept.
    """
    dest = _check_layer_path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    def conv(p: Path) -> Path:
        out = dest / p.name
        _copy_layer_oci(os.fsencode(p), os.fsencode(out), stack.xattr_ns)
        return out

    upper = conv(stack.upper) if stack.upper is not None else None
    lowers = tuple(conv(p) for p in stack.lowers)
    work = None
    if stack.work is not None:
        work = dest / stack.work.name
        work.mkdir()
    return Stack(lowers=lowers, upper=upper, work=work, xattr_ns=stack.xattr_ns)


# --------------------------------------------------------------------------
# Kernel mounts
# --------------------------------------------------------------------------


def mount_points() -> list[bytes]:
    """All current mount points of this mount namespace, from /proc/self/mounts."""
    with open("/proc/self/mounts", "rb") as f:
        return [unescape_mountinfo(line.split(b" ")[1]) for line in f if line.strip()]


def is_mounted(mnt: Path | bytes) -> bool:
    """Whether something is mounted exactly at *mnt*."""
    return os.fsencode(os.path.realpath(mnt)) in mount_points()


def kernel_mount(stack: Stack, mnt: Path, options: Sequence[str] = ()) -> None:
    """Mount *stack* at *mnt* with the kernel's overlayfs (needs root).

    Uses ``-o userxattr`` when the stack's markers are ``user.*``.  Extra
    *options* (e.g. ``"redirect_dir=on"``) are appended.  Raises
    RuntimeError with mount's message on failure.
    """
    if stack.upper is None and len(stack.lowers) < 2:
        raise ValueError("the kernel needs at least two lowers for a lowerdir-only overlay")
    opts = [b"lowerdir=" + b":".join(os.fsencode(_check_layer_path(p)) for p in stack.lowers)]
    if stack.upper is not None:
        assert stack.work is not None
        opts.append(b"upperdir=" + os.fsencode(_check_layer_path(stack.upper)))
        opts.append(b"workdir=" + os.fsencode(_check_layer_path(stack.work)))
    if stack.xattr_ns == "user":
        opts.append(b"userxattr")
    opts.extend(os.fsencode(o) for o in options)
    cmd = [b"mount", b"-t", b"overlay", b"overlay", b"-o", b",".join(opts), os.fsencode(mnt)]
    r = subprocess.run(cmd, capture_output=True)
    if r.returncode != 0:
        raise RuntimeError(f"{b' '.join(cmd)!r} failed ({r.returncode}): {r.stderr.decode(errors='replace').strip()}")


def kernel_umount(mnt: Path) -> None:
    """Unmount *mnt*, falling back to a lazy unmount so nothing is left behind."""
    r = subprocess.run([b"umount", os.fsencode(mnt)], capture_output=True)
    if r.returncode != 0 and is_mounted(mnt):
        subprocess.run([b"umount", b"-l", os.fsencode(mnt)], capture_output=True, check=True)


@contextlib.contextmanager
def kernel_mounted(stack: Stack, mnt: Path, options: Sequence[str] = ()) -> Iterator[Path]:
    """``with kernel_mounted(stack, mnt):`` mount, and always unmount afterwards."""
    kernel_mount(stack, mnt, options)
    try:
        yield mnt
    finally:
        kernel_umount(mnt)
