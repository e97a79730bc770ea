"""The write path, differentially: the same random operations on the kernel's overlayfs and on pyunionfs.

This is the acceptance test of the write path.  A hypothesis state machine
builds a random layer stack (``tests/support/layergen.py``; 2 or 3 lowers
and an upper), mounts it twice on the same lowers, each mount with its own
copy of the upper:

* side A: ``mount -t overlay`` with ``index=on,redirect_dir=off,metacopy=off``
  (``index=on`` because pyunionfs keeps hardlinks across copy-up the way the
  kernel does with an inode index; ``redirect_dir=off`` so that renaming a
  directory that has lower parts fails with EXDEV, which pyunionfs copies);
* side B: pyunionfs (``-o workdir=`` a fresh directory beside its upper).

Then it applies the same operations to both (create/open flags, writes at
offsets, truncate, mmap, mkdir/rmdir, fifos and device nodes, symlinks,
hardlinks, renames with RENAME_NOREPLACE/EXCHANGE/WHITEOUT, chmod/chown,
utimensat with UTIME_OMIT/UTIME_NOW, xattrs, unlinked open files, fsync,
descriptors kept open in a second process while the first renames, unlinks
or copies up the file, and descriptors kept across steps, see below) and
requires the same return value or errno at every step.  Paths are drawn from
everything any layer or the merged tree contains (so rules hit deep paths,
lower-only files, lower hardlinks, whited-out and opaque-hidden names) plus
new names.  Every ``TREE_EVERY`` steps, and at the
end, the merged trees must be identical (``treesnap``: names, types, modes,
owners, sizes, contents, symlink targets, xattrs, hardlink grouping, plus
st_nlink and file mtimes); after unmounting, the two upper directories must
be identical on disk (whiteouts, opaque markers, origin/nlink xattrs), except
for :data:`INSTANCE_XATTRS`.

Descriptors kept across steps: a descriptor opened at one step (read-only,
read-write, O_APPEND or O_PATH) stays open in a numbered slot of its
executor; later steps change its name (unlink, rename away, rename over,
re-create, replace by rename, link) and use the descriptor: f*xattr with
``user.*`` names, fstat (normalized, plus whether the name still reaches the
same object), fchmod, pwrite at offset 0 after F_SETFL cleared O_APPEND and
write after F_SETFL set it, reopening ``/proc/self/fd/N`` read-only or
read-write, chmod of ``/proc/self/fd/N``.  The kernel answers by the
object the descriptor was opened on, never by what the name holds now.
Each such use mostly first changes the name, if nothing did since the open
(see :meth:`WriteDifferential._kept`), and is followed by a look at the
name (getxattr, read or stat); once a slot is open, a quarter of all path
draws pick a kept name.  So sequences like ``open f; unlink f; create f;
fsetxattr(old fd); getxattr(f)`` are common.

Operations run in executor processes chrooted into each mount
(``tests/support/opsrunner.py``): the layers contain symlinks like
``etc -> /etc`` that would otherwise lead a write out of the mount and into
the host.

Run::

    python -m pytest tests/mount/test_write_differential.py
    PYUNIONFS_WRITE_EXAMPLES=200 python -m pytest tests/mount/test_write_differential.py   # longer
    PYUNIONFS_WRITE_ORACLE_SELFTEST=1 python -m pytest tests/mount/test_write_differential.py
    PYUNIONFS_WRITE_SHRINK=0 python -m pytest tests/mount/test_write_differential.py   # no shrinking

A passing run takes about a minute; a failing one spends a few more
minutes shrinking to a short sequence, printed with both outcomes of every
step.

The self-test mode mounts side B with the kernel too (second upper and
workdir, same lowers): it must pass, which shows that the harness compares
correctly and that every operation is deterministic.

What is deliberately not compared, and why:

* directory mtimes/ctimes, every atime and ctime, st_ino and st_dev: they
  depend on timing and on the instance;
* a file mtime set by the clock during the example is only checked to be
  recent (``now``); an mtime copied from a layer or set explicitly is exact;
* directory st_nlink (overlayfs reports 1 for merged directories and the
  layer's count for the others; treesnap leaves it out as well);
* ``user.overlay.*`` xattr names are never set through the mount: pyunionfs
  deliberately reads markers from both ``trusted.overlay.*`` and
  ``user.overlay.*`` and hides both (README), while a kernel mount without
  ``userxattr`` treats ``user.overlay.*`` as ordinary data;
* OCI ``.wh.`` markers are not in these stacks: the kernel does not read
  them (pyunionfs deliberately does), so there is no oracle for them;
* xattr whiteouts (Linux 6.7+ format) are not in these stacks either, see
  :meth:`Context.stack`;
* see :data:`INSTANCE_XATTRS` and :data:`LOOKUP_XATTRS` for the upper
  layer's on-disk xattrs, and :func:`_normalize` for whiteout inodes.

Within the pyunionfs mount a file must also keep its st_ino when a write,
chmod, chown, utimens, truncate or xattr change copies it up (checked on
every such operation, see ``_INO_INDEX``).

Kernel behaviours worth knowing when reading a failure (Linux 6.18), all
compared as they are unless said otherwise:

* with ``index=on``, unlinking or renaming one name of a lower hardlink
  first copies the file up into ``workdir/index`` (to keep the union link
  count in ``trusted.overlay.nlink``); the other names keep showing the
  lower path but are served from the index copy;
* a new directory created in a merged directory (or in a lower directory,
  which the creation copies up) is marked opaque (``trusted.overlay.opaque=y``,
  "just an optimization" in ovl_create_upper); one created over a whiteout
  is opaque too; one created in an upper-only directory is not;
* the kernel copies a file up *before* checking the flags of a setxattr, so
  a failing ``setxattr(..., XATTR_REPLACE)`` of a missing name (or
  ``XATTR_CREATE`` of a present one) still leaves the file copied up.
  pyfuse3 checks those flags itself with a getxattr before it calls the
  filesystem's setxattr, so pyunionfs answers the same errno without the
  copy-up (deliberate: pyfuse3 gives no way to do otherwise).  The op
  runner therefore makes the same check first on both sides
  (``op_setxattr``), so that case never reaches the kernel's copy-up;
* which name of a copied-up lower hard link is linked to its index copy:
  the kernel links the name the caller used, pyunionfs the name the inode
  was last looked up by (see :func:`_without_unshared_aliases`);
* whiteouts the kernel creates are hardlinks of one shared whiteout inode
  (see :func:`_normalize`);
* lookups write origins (see :data:`LOOKUP_XATTRS`), and rmdir miscounts
  xattr whiteouts (see :meth:`Context.stack`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, Phase, reject, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.support.layergen import build_stack, mount_points
from tests.support.mounting import EACH_ENGINE, Daemon, require_fuse
from tests.support.opsrunner import Executor, Outcome, digest
from tests.support.treesnap import Snapshot, diff, fmt_path, snapshot

SELFTEST = os.environ.get("PYUNIONFS_WRITE_ORACLE_SELFTEST", "") not in ("", "0")
MAX_EXAMPLES = int(os.environ.get("PYUNIONFS_WRITE_EXAMPLES", "25"))
STEPS = int(os.environ.get("PYUNIONFS_WRITE_STEPS", "40"))
#: Shrinking a failure costs minutes (every attempt mounts twice); ``=0`` reports the first failure as found.
SHRINK = os.environ.get("PYUNIONFS_WRITE_SHRINK", "1") not in ("", "0")
#: Layer stacks are small: the seed picks the trees, build_stack makes them.
SEEDS = tuple(range(8))
KERNEL_OPTIONS = ("index=on", "redirect_dir=off", "metacopy=off")
#: Compare the merged trees after this many steps (and always at the end).
TREE_EVERY = 10
#: The watchdog of each pyunionfs daemon: one example takes a few seconds.
DAEMON_DEADLINE = 180.0

#: On-disk xattrs of the upper layer that depend on the mount instance, not on
#: the operations, and are therefore not compared between the two uppers:
#:
#: * ``trusted.overlay.uuid``: a random per-upper id the kernel writes on the
#:   upper root at the first mount;
#: * ``trusted.overlay.impure``: the kernel's cache hint "some child has an
#:   origin or was renamed in", set on directories lazily and not part of what
#:   the project writes in the kernel's format.
#:
#: ``trusted.overlay.origin`` (the lower's file handle, recorded on copy-up)
#: and ``trusted.overlay.nlink`` (the union link count of an indexed hardlink)
#: turned out identical between two kernel mounts of the same lowers (the
#: self-test compares them), so they are compared: pyunionfs writes them in
#: the kernel's format.  With one exception, :data:`LOOKUP_XATTRS`.
INSTANCE_XATTRS = ("trusted.overlay.uuid", "trusted.overlay.impure")
#: Not compared on directories that were already in the upper before mounting.
#:
#: Kernel oddity, only with ``index=on``: a mere *lookup* of a merged
#: directory whose upper part has no origin writes one (``ovl_fix_origin``
#: in ovl_lookup), and the upper root gets one at mount time.  So reading the
#: tree (``ls -R``) modifies the upper layer.  Whether pyunionfs mimics this
#: side effect of reading is its choice; origins written by copy-up (where
#: they matter: hardlinks, inode numbers) are still compared.
LOOKUP_XATTRS = ("trusted.overlay.origin",)

#: Names given to new entries (some collide with the generator's pool on purpose).
NEW_NAMES: tuple[bytes, ...] = (b"new", b"n2", b"x y", b"a", b"sub", b"f.txt", b"caf\xe9")
OPEN_FLAGS = (
    "O_WRONLY|O_CREAT|O_EXCL",
    "O_RDWR|O_CREAT|O_EXCL",
    "O_RDWR|O_CREAT",
    "O_WRONLY|O_CREAT|O_TRUNC",
    "O_WRONLY|O_TRUNC",
    "O_WRONLY|O_CREAT|O_APPEND",
    "O_RDWR|O_APPEND",
    "O_RDONLY|O_CREAT",
    "O_RDONLY|O_TRUNC",
    "O_WRONLY|O_NOFOLLOW",
    "O_RDWR|O_CREAT|O_EXCL|O_NOFOLLOW",
    "O_RDONLY|O_DIRECTORY",
)
SLOT_FLAGS = ("O_RDONLY", "O_RDWR", "O_WRONLY|O_APPEND", "O_RDWR|O_CREAT", "O_RDWR|O_TRUNC", "O_PATH|O_NOFOLLOW")
SLOTS = st.sampled_from((0, 1, 2))
#: How :meth:`WriteDifferential.keep_fd` opens the descriptors that later steps use after their name changed.
KEPT_FLAGS = ("O_RDONLY", "O_RDWR", "O_RDWR|O_APPEND", "O_WRONLY|O_APPEND")
KEPT_PATH_FLAGS = ("O_PATH", "O_PATH|O_NOFOLLOW")
KEPT_XATTR_NAMES = st.sampled_from(("user.test", "user.other", "user.kept"))
#: Operations that may give a path to another object (or none), and which of their arguments are such paths.
def _not_o_path(flags: str) -> bool:
    return "O_PATH" not in flags


def _writable(flags: str) -> bool:
    return "O_RDWR" in flags or "O_WRONLY" in flags


_NAME_OPS: dict[str, tuple[int, ...]] = {
    "unlink": (0,), "open_unlink": (0,), "create": (0,), "rename": (0, 1), "link": (1,), "symlink": (1,),
    "mkdir": (0,), "mkfifo": (0,), "mknod": (0,),
}
RENAME_FLAGS = ("0", "0", "0", "RENAME_NOREPLACE", "RENAME_EXCHANGE", "RENAME_NOREPLACE", "RENAME_EXCHANGE",
                "RENAME_WHITEOUT")


class Mode(int):
    """An int that prints in octal, so that failing steps read like chmod(1)."""

    def __repr__(self) -> str:
        return f"0o{int(self):o}"


def _modes(*values: int) -> st.SearchStrategy[Mode]:
    return st.sampled_from([Mode(v) for v in values])


FILE_MODES = _modes(0o644, 0o600, 0o755, 0o000, 0o444, 0o4755, 0o2750, 0o1777)
DIR_MODES = _modes(0o755, 0o700, 0o1777, 0o555, 0o000)
OWNERS = st.sampled_from((0, 1000, 1234, 4321, -1))
PROCS = st.sampled_from((0, 1))
CONTENT = st.builds(lambda chunk, k: chunk * k, st.binary(max_size=40), st.sampled_from((1, 1, 3, 150)))
OFFSETS = st.sampled_from((0, 1, 7, 100, 4095, 4096, 4097, 65536, 300_000))
SIZES = st.sampled_from((0, 1, 100, 4096, 5000, 204_800, 300_000))
XATTR_NAMES = st.sampled_from(
    (
        "user.test",
        "user.other",
        "user.new",
        "trusted.test",
        "trusted.new",
        # Overlay-private names set through the mount: since Linux 6.7 the kernel
        # accepts them and stores them escaped (trusted.overlay.overlay.*) in the
        # upper, where they are no markers; what it does is compared, on disk too.
        "trusted.overlay.opaque",
        "trusted.overlay.x",
        "trusted.overlay.overlay.x",
    )
)
XATTR_VALUES = st.sampled_from((b"", b"v", b"y", b"\x00\xff", b"x" * 300))
XATTR_FLAGS = st.sampled_from((0, os.XATTR_CREATE, os.XATTR_REPLACE))
SYMLINK_TARGETS = st.sampled_from(
    (b"a", b"../a", b"/etc/passwd", b"dir1/sub", b"dangling/x", b"", b"f.txt", b"caf\xe9", b"T" * 200)
)
TIME_SPEC = st.one_of(
    st.tuples(
        st.just("set"),
        st.sampled_from((0, 1, 1_234_567_890, 2**31 + 5, -1)),
        st.sampled_from((0, 1, 999_999_999)),
    ),
    st.just(("omit",)),
    st.just(("now",)),
)
#: mknod(mode, major, minor).  A char device 0/0 is a whiteout on disk:
#: creating one through an overlay must be refused (the kernel says EPERM).
NODES: tuple[tuple[int, int, int], ...] = (
    (stat.S_IFCHR | 0o644, 0, 0),
    (stat.S_IFCHR | 0o600, 1, 3),
    (stat.S_IFIFO | 0o640, 0, 0),
    (stat.S_IFSOCK | 0o755, 0, 0),
)
#: Where the "st_ino kept" flag sits in the value of the operations that may
#: copy up (None: the value is the flag).
_INO_INDEX: dict[str, int | None] = {
    "create": 2,
    "write": 2,
    "truncate": 1,
    "mmap_write": 4,
    "chmod": 1,
    "chown": 1,
    "utimens": 2,
    "setxattr": None,
    "removexattr": None,
}


def _ino_kept(op: str, out: Outcome) -> bool | None:
    """The "st_ino kept across the operation" flag of an outcome, if it has one."""
    if op not in _INO_INDEX or out[0] != "ok":
        return None
    idx, value = _INO_INDEX[op], out[1]
    if idx is None:
        return value if isinstance(value, bool) else None
    if isinstance(value, tuple) and len(value) > idx and isinstance(value[idx], bool):
        return value[idx]
    return None


# --------------------------------------------------------------------------
# Mounts
# --------------------------------------------------------------------------


def _check_layer_path(p: Path) -> bytes:
    b = os.fsencode(p)
    for bad in (b":", b",", b"\\", b"\n"):
        if bad in b:
            raise ValueError(f"{p}: overlay mount options cannot take {bad!r}")
    return b


def _kernel_mount(lowers: tuple[Path, ...], upper: Path, work: Path, mnt: Path) -> None:
    opts = [
        b"lowerdir=" + b":".join(_check_layer_path(p) for p in lowers),
        b"upperdir=" + _check_layer_path(upper),
        b"workdir=" + _check_layer_path(work),
        *(o.encode() for o in KERNEL_OPTIONS),
    ]
    r = subprocess.run(
        [b"mount", b"-t", b"overlay", b"overlay", b"-o", b",".join(opts), os.fsencode(mnt)],
        capture_output=True,
        timeout=30,
    )
    if r.returncode != 0:
        raise RuntimeError(f"mount -t overlay at {mnt} failed: {r.stderr.decode(errors='replace').strip()}")


def _is_mounted(mnt: Path) -> bool:
    return os.fsencode(os.path.realpath(mnt)) in mount_points()


def _kernel_umount(mnt: Path) -> None:
    """Unmount, falling back to a lazy unmount: nothing is ever left mounted."""
    try:
        r = subprocess.run(["umount", os.fsencode(mnt)], capture_output=True, timeout=30)
        if r.returncode == 0 or not _is_mounted(mnt):
            return
    except subprocess.TimeoutExpired:
        pass
    subprocess.run(["umount", "-l", os.fsencode(mnt)], capture_output=True, timeout=30, check=True)


def _copy_layer(src: Path, dst: Path) -> None:
    """``cp -a``, then proof that it kept what the overlay reads (trusted.* xattrs, whiteouts, owners, times)."""
    subprocess.run(["cp", "-a", "--", os.fsencode(src), os.fsencode(dst)], check=True, capture_output=True, timeout=60)
    a, b = snapshot(src, mtime=True), snapshot(dst, mtime=True)
    problems = diff(a, b)
    assert not problems, f"cp -a did not copy {src} faithfully:\n" + "\n".join(problems)


@dataclasses.dataclass
class Side:
    """One mount of the pair, with its own upper, work dir and executors."""

    label: str
    kind: str  # "kernel" or "pyunionfs"
    base: Path
    mnt: Path = dataclasses.field(init=False)
    upper: Path = dataclasses.field(init=False)
    work: Path = dataclasses.field(init=False)
    engine: str = "native"
    daemon: Daemon | None = None
    kernel_mounted: bool = False
    procs: list[Executor] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.mnt, self.upper, self.work = self.base / "mnt", self.base / "upper", self.base / "work"

    def mount(self, lowers: tuple[Path, ...], pristine_upper: Path, t0_ns: int) -> None:
        self.base.mkdir()
        _copy_layer(pristine_upper, self.upper)
        self.work.mkdir()
        self.mnt.mkdir()
        if self.kind == "kernel":
            _kernel_mount(lowers, self.upper, self.work, self.mnt)
            self.kernel_mounted = True
        else:
            # "dev": the kernel's mount honours device files (a chr 1:3 made by
            # the mknod rule opens), pyunionfs's default is nodev (EACCES).
            self.daemon = Daemon(
                list(lowers), self.upper, self.mnt, [f"workdir={self.work}", "dev"], deadline=DAEMON_DEADLINE,
                engine=self.engine,
            )
        # Two processes per mount: "several processes" is part of the contract.
        for i in range(2):
            self.procs.append(Executor(self.mnt, f"{self.label}[proc {i}]", t0_ns))

    def stop_procs(self) -> None:
        for p in self.procs:
            p.close()
        self.procs.clear()

    def unmount(self) -> None:
        """Unmount whatever is mounted; a daemon that failed (traceback, exit status) raises after unmounting."""
        self.stop_procs()
        if self.daemon is not None:
            d, self.daemon = self.daemon, None
            d.stop()
        if self.kernel_mounted:
            self.kernel_mounted = False
            _kernel_umount(self.mnt)


# --------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------


def _recent(t_ns: int, t0_ns: int) -> bool:
    return t0_ns - 5 * 10**9 <= t_ns <= time.time_ns() + 5 * 10**9


def _normalize(snap: Snapshot, t0_ns: int, upper: bool = False, preexisting_dirs: frozenset[bytes] = frozenset()
               ) -> Snapshot:
    """Drop what legitimately differs: directory mtimes, and "now" file mtimes (kept only as "recent").

    In an *upper* layer, a kernel whiteout is a hardlink to one shared
    whiteout inode in the work dir (Linux 5.8+ reuses it to save inodes), so
    whiteouts made during one mount form a hardlink group; that grouping is
    instance detail, and ``links`` of char 0/0 entries is dropped.  On
    *preexisting_dirs*, :data:`LOOKUP_XATTRS` are dropped.
    """
    out = []
    for path, e in snap.items():
        changes: dict[str, Any] = {}
        if e.kind == "dir" and path in preexisting_dirs:
            changes["xattrs"] = tuple(x for x in e.xattrs if x[0] not in LOOKUP_XATTRS)
        if e.kind == "dir":
            changes["mtime_ns"] = None
        elif e.mtime_ns is not None and _recent(e.mtime_ns, t0_ns):
            changes["mtime_ns"] = -1  # recent: set by the clock during the example
        if upper and e.kind == "chr" and e.rdev == 0:
            changes["links"] = None
        out.append((path, dataclasses.replace(e, **changes)))
    return Snapshot(tuple(out), snap.errors, snap.root)


def _lower_hardlinks(lowers: tuple[Path, ...]) -> frozenset[bytes]:
    """Relative paths of the lower layers' files that have more than one link."""
    out = set()
    for layer in lowers:
        top = os.fsencode(layer)
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    out.add(os.path.relpath(full, top))
    return frozenset(out)


def _without_unshared_aliases(a: Snapshot, b: Snapshot, lower_hardlinks: frozenset[bytes]) -> tuple[Snapshot, Snapshot]:
    """Deliberate difference: which names of a copied-up lower hard link are
    linked to its index copy.  The kernel links the name the caller used;
    a FUSE request names an inode, not a name, so pyunionfs links the name
    the inode was last looked up by (which the kernel's dentry cache may not
    have asked about again).  The other names are served from the index copy
    on both sides, so the merged views are the same (compared separately).
    Here the names of lower hard links that only one upper holds are dropped
    from that side, with the parent directories copied up only to hold them,
    and the ``overlay.nlink`` record of the names kept (merged count minus
    upper link count, "U%+d") is moved by the links dropped, so it still has
    to match."""
    return _drop_aliases(a, b, lower_hardlinks), _drop_aliases(b, a, lower_hardlinks)


def _drop_aliases(ours: Snapshot, other: Snapshot, lower_hardlinks: frozenset[bytes]) -> Snapshot:
    """*ours* without the lower hard-link names that *other* does not hold (see above)."""
    extra = {p for p, e in ours.items() if p not in other and p in lower_hardlinks and e.kind == "reg"}
    if not extra:
        return ours
    for p, e in sorted(ours.items(), key=lambda pe: -pe[0].count(b"/")):
        children = [q for q, _ in ours.items() if q.startswith(p + b"/") and b"/" not in q[len(p) + 1 :]]
        if e.kind == "dir" and p not in other and children and all(q in extra for q in children):
            extra.add(p)
    out = []
    for p, e in ours.subset(lambda p, e: p not in extra).items():
        dropped = sum(x in extra for x in ours[p].links or ())
        if dropped:
            xattrs = tuple(
                (n, b"U%+d" % (int(v[1:]) + dropped) if n == "trusted.overlay.nlink" and v[:1] == b"U" else v)
                for n, v in e.xattrs
            )
            e = dataclasses.replace(e, xattrs=xattrs)
        out.append((p, e))
    return Snapshot(tuple(out), ours.errors, ours.root)


def _nlinks(root: Path, snap: Snapshot) -> dict[bytes, int]:
    """st_nlink of every non-directory (treesnap records hardlink groups, not counts)."""
    out = {}
    rb = os.fsencode(root)
    for path, e in snap.items():
        if e.kind != "dir":
            try:
                out[path] = os.lstat(rb + b"/" + path).st_nlink
            except OSError as ex:
                out[path] = -(ex.errno or 1)
    return out


def _fmt(v: object, limit: int = 400) -> str:
    """Readable, bounded rendering of an argument or outcome (long bytes are summarized)."""
    if isinstance(v, bytes):
        return repr(v) if len(v) <= 40 else digest(v)
    if isinstance(v, tuple):
        inner = ", ".join(_fmt(x, limit) for x in v)
        return f"({inner}{',' if len(v) == 1 else ''})"
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------
# The state machine
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """Shared by all examples: where to work, and the layer stacks built so far (lowers are read-only)."""

    base: Path
    selftest: bool
    engine: str = "native"
    stacks: dict[tuple[int, int], tuple[tuple[Path, ...], Path]] = dataclasses.field(default_factory=dict)

    def stack(self, seed: int, n_lowers: int) -> tuple[tuple[Path, ...], Path]:
        """Lowers and the pristine upper of one seed, built once and shared by every example."""
        key = (seed, n_lowers)
        if key not in self.stacks:
            # No xattr whiteouts (Linux 6.7+ format) in these stacks: the kernel
            # then refuses rmdir of a merged directory whose merged view is
            # empty with ENOTEMPTY when a lower still holds xattr whiteouts
            # (ovl_check_empty_dir does not count them as whiteouts; seen on
            # 6.18), a quirk pyunionfs should not have to copy.  Reading them
            # is covered by test_differential.py.
            s = build_stack(self.base / f"stack-{seed}-{n_lowers}", seed, n_lowers=n_lowers, xwhiteouts=False)
            assert s.upper is not None
            self.stacks[key] = (s.lowers, s.upper)
        return self.stacks[key]


class Mismatch(AssertionError):
    pass


class WriteDifferential(RuleBasedStateMachine):
    """Same operations on side A (kernel overlayfs) and side B (pyunionfs, or the kernel again in self-test)."""

    #: Set by the test on a subclass (hypothesis instantiates the machine without arguments).
    context: ClassVar[Context]

    def __init__(self) -> None:
        super().__init__()
        self.ctx = self.context
        self.sides: list[Side] = []
        self.example_dir: Path | None = None
        self.t0_ns = time.time_ns()
        self.history: list[str] = []
        self.steps = 0
        self.broken = False  # a step failed: teardown only cleans up
        self.pool: dict[bytes, None] = {}  # every path worth trying (ordered set)
        self.dirs: dict[bytes, None] = {}
        # What side A shows right now (refreshed after every rule): most draws
        # come from here, so that most operations act on something that exists.
        self.live: list[bytes] = []
        self.live_dirs: list[bytes] = []
        self.live_files: list[bytes] = []  # regular files only
        # (proc, slot) -> the path it was opened by, and the open flags.
        self.slots: dict[tuple[int, int], tuple[bytes, str]] = {}
        # Slots whose path an operation changed since they were opened (see _kept).
        self.renamed: set[tuple[int, int]] = set()
        self.seed = -1
        self.pristine_dirs: frozenset[bytes] = frozenset()
        self.n_lowers = 0

    # -- set-up and tear-down ------------------------------------------------

    @initialize(seed=st.sampled_from(SEEDS), n_lowers=st.sampled_from((2, 3)))
    def start(self, seed: int, n_lowers: int) -> None:
        self.seed, self.n_lowers = seed, n_lowers
        lowers, pristine = self.ctx.stack(seed, n_lowers)
        self.example_dir = Path(tempfile.mkdtemp(prefix="ex-", dir=self.ctx.base))
        self.sides = [
            Side("kernel", "kernel", self.example_dir / "a"),
            Side("kernel2", "kernel", self.example_dir / "b")
            if self.ctx.selftest
            else Side("pyunionfs", "pyunionfs", self.example_dir / "b", engine=self.ctx.engine),
        ]
        self.t0_ns = time.time_ns()
        self.lower_hardlinks = _lower_hardlinks(lowers)
        for side in self.sides:
            side.mount(lowers, pristine, self.t0_ns)
        # The pool: every name of the merged tree and of every layer, so that
        # whited-out, opaque-hidden and shadowed names are tried too.
        merged = snapshot(self.sides[0].mnt)
        names: dict[bytes, bool] = {p: e.kind == "dir" for p, e in merged.items()}
        self.pristine_dirs = frozenset(p for p, e in snapshot(pristine).items() if e.kind == "dir")
        for layer in (pristine, *lowers):
            for p, e in snapshot(layer).items():
                names.setdefault(p, e.kind == "dir")
                names[p] = names[p] or e.kind == "dir"
        for p in sorted(names):
            self.pool[p] = None
            if names[p]:
                self.dirs[p] = None
        self.history.append(f"stack seed={seed} n_lowers={n_lowers} ({len(self.pool)} paths)")
        self._refresh_live()
        self._compare_trees("after mounting")

    def teardown(self) -> None:
        errors: list[BaseException] = []
        for side in self.sides:
            try:
                side.stop_procs()
            except BaseException as e:  # keep cleaning up
                errors.append(e)
        if not self.broken and not errors and self.sides:
            try:
                self._compare_trees("at the end")
            except BaseException as e:
                errors.append(e)
        for side in self.sides:
            try:
                side.unmount()
            except BaseException as e:
                errors.append(e)
        if not self.broken and not errors and self.sides:
            try:
                self._compare_uppers()
            except BaseException as e:
                errors.append(e)
        if self.example_dir is not None and not any(s.kernel_mounted or s.daemon for s in self.sides):
            shutil.rmtree(self.example_dir, ignore_errors=True)
        if errors:
            raise errors[0]

    # -- running one operation on both sides ------------------------------------

    def _fail(self, what: str) -> None:
        self.broken = True
        a, b = self.sides[0].label, self.sides[1].label
        hist = "\n".join(f"  {line}" for line in self.history[-250:])
        raise Mismatch(f"{what}\n\nsides: A={a}, B={b}\nsteps of this example (A == B unless shown):\n{hist}")

    def _op(self, proc: int, op: str, *args: Any) -> Outcome:
        """Run *op* on both sides from process *proc*; both outcomes must be equal."""
        plain = tuple(int(a) if isinstance(a, Mode) else a for a in args)
        outs = []
        for side in self.sides:
            try:
                outs.append(side.procs[proc].call(op, *plain))
            except AssertionError as e:  # hung or died: a failure of that side
                outs.append(("executor", str(e)))
        a, b = outs
        call = f"[proc {proc}] {op}({', '.join(_fmt(x) for x in args)})"
        n = len(self.history)
        if a == b:
            self.history.append(f"{n}. {call} -> {_fmt(a)}")
        else:
            self.history.append(f"{n}. {call}\n      A: {_fmt(a)}\n      B: {_fmt(b)}   <-- MISMATCH")
        for out in (a, b):
            if out[0] == "exc":
                self._fail(f"harness error in {call}: {out[1]}")
        if a != b and _kernel_clobbers(op, a, b):
            self.broken = True  # no comparison at teardown either
            reject()  # the kernel lost the file at that name: nothing after this compares
        if a != b:
            self._fail(f"outcomes differ for {call}:\n  A ({self.sides[0].label}): {_fmt(a)}\n"
                       f"  B ({self.sides[1].label}): {_fmt(b)}")
        if _ino_kept(op, b) is False:
            self._fail(f"{call}: st_ino of the file changed (copy-up must keep it) on {self.sides[1].label}")
        if a[0] == "ok" and op in _NAME_OPS:
            touched = {args[i] for i in _NAME_OPS[op]}
            self.renamed.update(key for key, (path, _) in self.slots.items() if path in touched)
        return a

    def _tree_state(self, side: Side) -> tuple[Snapshot, dict[bytes, int]]:
        snap = _normalize(snapshot(side.mnt, mtime=True), self.t0_ns)
        return snap, _nlinks(side.mnt, snap)

    def _compare_trees(self, when: str) -> None:
        (sa, na), (sb, nb) = (self._tree_state(s) for s in self.sides)
        problems = diff(sa, sb, limit=40)
        problems += [
            f"{fmt_path(p)}: st_nlink {na.get(p)} != {nb.get(p)}"
            for p in sorted(set(na) | set(nb))
            if na.get(p) != nb.get(p) and p in sa and p in sb
        ]
        if problems:
            self._fail(f"merged trees differ {when} (A: {self.sides[0].label}, B: {self.sides[1].label}):\n"
                       + "\n".join(problems))

    def _compare_uppers(self) -> None:
        sa, sb = (
            _normalize(snapshot(s.upper, mtime=True, ignore_xattrs=INSTANCE_XATTRS), self.t0_ns,
                       upper=True, preexisting_dirs=self.pristine_dirs)
            for s in self.sides
        )
        if self.sides[1].kind == "pyunionfs":
            sa, sb = _without_unshared_aliases(sa, sb, self.lower_hardlinks)
        problems = diff(sa, sb, limit=40)
        if problems:
            self._fail("upper layers differ on disk after unmounting (A: {}, B: {}):\n{}".format(
                self.sides[0].label, self.sides[1].label, "\n".join(problems)))

    @invariant()
    def trees_match_now_and_then(self) -> None:
        """Runs after every rule; compares the whole trees every TREE_EVERY rules (a snapshot is not free)."""
        self.steps += 1
        if self.sides:
            self._refresh_live()
        if self.sides and self.steps % TREE_EVERY == 0:
            self._compare_trees(f"after step {self.steps}")

    # -- choosing paths -------------------------------------------------------------

    def _refresh_live(self) -> None:
        """List what side A shows now (lstat only, never following symlinks; a few ms)."""
        root = os.fsencode(self.sides[0].mnt)
        live, dirs, files = [], [b"."], []
        for top, dnames, fnames in os.walk(root):
            rel = top[len(root) + 1 :]
            for name in sorted(dnames + fnames):
                p = rel + b"/" + name if rel else name
                live.append(p)
                if name in dnames and not os.path.islink(top + b"/" + name):
                    dirs.append(p)
                elif name in fnames and stat.S_ISREG(os.lstat(top + b"/" + name).st_mode):
                    files.append(p)
        self.live, self.live_dirs, self.live_files = sorted(live), sorted(dirs), sorted(files)

    def _pick(self, data: st.DataObject, live: list[bytes], known: dict[bytes, None], label: str) -> bytes:
        # Mostly something that exists now; sometimes any name ever seen in
        # any layer (whited out, hidden by an opaque dir, deleted, renamed away).
        if live and data.draw(st.integers(0, 7), label=f"{label} from") > 0:
            return data.draw(st.sampled_from(live), label=label)
        return data.draw(st.sampled_from(list(known)), label=label)

    def _path(self, data: st.DataObject, new: bool = False) -> bytes:
        """A known path, or (with *new*) sometimes a new name in a known directory.

        While descriptors are kept, a quarter of the draws pick the name one
        was opened by: so creates, renames, unlinks and xattr calls often
        act on the name of a descriptor that later steps use.
        """
        if self.slots and data.draw(st.integers(0, 3), label="kept name") == 0:
            return data.draw(st.sampled_from(sorted({p for p, _ in self.slots.values()})), label="path")
        if new and data.draw(st.booleans(), label="new name"):
            d = self._pick(data, self.live_dirs, self.dirs, "in dir")
            name = data.draw(st.sampled_from(NEW_NAMES), label="name")
            return name if d == b"." else d + b"/" + name
        return self._pick(data, self.live, self.pool, "path")

    def _dir_path(self, data: st.DataObject) -> bytes:
        return self._pick(data, self.live_dirs, self.dirs, "dir")

    def _file_path(self, data: st.DataObject) -> bytes:
        """Mostly a regular file that exists now, else any :meth:`_path`."""
        if self.live_files and data.draw(st.integers(0, 3), label="file from") > 0:
            return data.draw(st.sampled_from(self.live_files), label="file")
        return self._path(data, new=True)

    def _add(self, path: bytes, is_dir: bool = False) -> None:
        self.pool.setdefault(path, None)
        if is_dir:
            self.dirs.setdefault(path, None)

    def _moved(self, src: bytes, dst: bytes) -> None:
        """Follow a rename in the pool: the new name and everything known below it."""
        self._add(dst, src in self.dirs)
        prefix = src + b"/"
        for p in [p for p in self.pool if p.startswith(prefix)]:
            self._add(dst + p[len(src) :], p in self.dirs)

    # -- rules: files ------------------------------------------------------------------

    @rule(data=st.data(), proc=PROCS, flags=st.sampled_from(OPEN_FLAGS), mode=FILE_MODES, content=CONTENT)
    def create(self, data: st.DataObject, proc: int, flags: str, mode: Mode, content: bytes) -> None:
        path = self._path(data, new=True)
        if self._op(proc, "create", path, flags, mode, content)[0] == "ok":
            self._add(path)

    @rule(data=st.data(), proc=PROCS, how=st.sampled_from(("pwrite", "seek", "append")), offset=OFFSETS,
          content=CONTENT)
    def write(self, data: st.DataObject, proc: int, how: str, offset: int, content: bytes) -> None:
        self._op(proc, "write", self._path(data), how, offset, content)

    @rule(data=st.data(), size=SIZES, via_fd=st.booleans())
    def truncate(self, data: st.DataObject, size: int, via_fd: bool) -> None:
        self._op(0, "truncate", self._path(data), size, via_fd)

    @rule(data=st.data(), proc=PROCS, offset=st.sampled_from((0, 100, 4096)), nofollow=st.booleans())
    def read(self, data: st.DataObject, proc: int, offset: int, nofollow: bool) -> None:
        self._op(proc, "read", self._path(data), offset, nofollow)

    @rule(data=st.data(), offset=OFFSETS, content=CONTENT)
    def mmap_write(self, data: st.DataObject, offset: int, content: bytes) -> None:
        self._op(0, "mmap_write", self._path(data), offset, content)

    @rule(data=st.data(), create=st.booleans(), content=CONTENT)
    def open_unlink(self, data: st.DataObject, create: bool, content: bytes) -> None:
        self._op(0, "open_unlink", self._path(data, new=True), create, content)

    @rule(data=st.data(), how=st.sampled_from(("ro", "wo", "wo-data", "dir")))
    def fsync(self, data: st.DataObject, how: str) -> None:
        path = self._dir_path(data) if how == "dir" else self._path(data)
        self._op(0, "fsync", path, how)

    # -- rules: namespace ---------------------------------------------------------------

    @rule(data=st.data(), mode=DIR_MODES)
    def mkdir(self, data: st.DataObject, mode: Mode) -> None:
        path = self._path(data, new=True)
        if self._op(0, "mkdir", path, mode)[0] == "ok":
            self._add(path, is_dir=True)

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        self._op(0, "rmdir", self._dir_path(data) if data.draw(st.booleans()) else self._path(data))

    @rule(data=st.data(), then_rmdir=st.booleans())
    def empty_dir(self, data: st.DataObject, then_rmdir: bool) -> None:
        self._op(0, "empty_dir", self._dir_path(data), then_rmdir)

    @rule(data=st.data(), proc=PROCS)
    def unlink(self, data: st.DataObject, proc: int) -> None:
        self._op(proc, "unlink", self._path(data))

    @rule(data=st.data(), mode=FILE_MODES)
    def mkfifo(self, data: st.DataObject, mode: Mode) -> None:
        path = self._path(data, new=True)
        if self._op(0, "mkfifo", path, mode)[0] == "ok":
            self._add(path)

    @rule(data=st.data(), node=st.sampled_from(NODES))
    def mknod(self, data: st.DataObject, node: tuple[int, int, int]) -> None:
        path = self._path(data, new=True)
        if self._op(0, "mknod", path, Mode(node[0]), node[1], node[2])[0] == "ok":
            self._add(path)

    @rule(data=st.data(), link_target=SYMLINK_TARGETS)  # (``target`` is reserved by hypothesis)
    def symlink(self, data: st.DataObject, link_target: bytes) -> None:
        path = self._path(data, new=True)
        if self._op(0, "symlink", link_target, path)[0] == "ok":
            self._add(path)

    @rule(data=st.data(), follow=st.booleans())
    def link(self, data: st.DataObject, follow: bool) -> None:
        src, dst = self._path(data), self._path(data, new=True)
        if self._op(0, "link", src, dst, follow)[0] == "ok":
            self._add(dst)

    @rule(data=st.data(), proc=PROCS, flags=st.sampled_from(RENAME_FLAGS))
    def rename(self, data: st.DataObject, proc: int, flags: str) -> None:
        src, dst = self._path(data), self._path(data, new=True)
        if self._op(proc, "rename", src, dst, flags)[0] == "ok":
            self._moved(src, dst)
            if flags == "RENAME_EXCHANGE":
                self._moved(dst, src)

    @rule(data=st.data(), flags=st.sampled_from(RENAME_FLAGS))
    def rename_dir(self, data: st.DataObject, flags: str) -> None:
        """Directories: with lower parts the kernel (redirect_dir=off) answers EXDEV; upper-only ones move."""
        src = self._dir_path(data)
        dst = self._dir_path(data) if data.draw(st.booleans()) else self._path(data, new=True)
        if self._op(0, "rename", src, dst, flags)[0] == "ok":
            self._moved(src, dst)
            if flags == "RENAME_EXCHANGE":
                self._moved(dst, src)

    # -- rules: metadata ---------------------------------------------------------------

    @rule(data=st.data(), mode=FILE_MODES)
    def chmod(self, data: st.DataObject, mode: Mode) -> None:
        self._op(0, "chmod", self._path(data), mode)

    @rule(data=st.data(), uid=OWNERS, gid=OWNERS, follow=st.booleans())
    def chown(self, data: st.DataObject, uid: int, gid: int, follow: bool) -> None:
        self._op(0, "chown", self._path(data), uid, gid, follow)

    @rule(data=st.data(), atime=TIME_SPEC, mtime=TIME_SPEC, follow=st.booleans(), via_os_utime=st.booleans())
    def utimens(self, data: st.DataObject, atime: tuple[Any, ...], mtime: tuple[Any, ...], follow: bool,
                via_os_utime: bool) -> None:
        self._op(0, "utimens", self._path(data), atime, mtime, follow, via_os_utime)

    @rule(data=st.data(), name=XATTR_NAMES, value=XATTR_VALUES, flags=XATTR_FLAGS, follow=st.booleans())
    def setxattr(self, data: st.DataObject, name: str, value: bytes, flags: int, follow: bool) -> None:
        self._op(0, "setxattr", self._path(data), name, value, flags, follow)

    @rule(data=st.data(), name=XATTR_NAMES, follow=st.booleans())
    def removexattr(self, data: st.DataObject, name: str, follow: bool) -> None:
        self._op(0, "removexattr", self._path(data), name, follow)

    @rule(data=st.data(), name=XATTR_NAMES, follow=st.booleans())
    def getxattr(self, data: st.DataObject, name: str, follow: bool) -> None:
        self._op(0, "getxattr", self._path(data), name, follow)

    @rule(data=st.data(), follow=st.booleans())
    def listxattr(self, data: st.DataObject, follow: bool) -> None:
        self._op(0, "listxattr", self._path(data), follow)

    # -- rules: looking ------------------------------------------------------------------

    @rule(data=st.data(), proc=PROCS, follow=st.booleans())
    def stat(self, data: st.DataObject, proc: int, follow: bool) -> None:
        self._op(proc, "stat", self._path(data), follow)

    @rule(data=st.data())
    def listdir(self, data: st.DataObject) -> None:
        self._op(0, "listdir", self._dir_path(data))

    @rule(data=st.data())
    def readlink(self, data: st.DataObject) -> None:
        self._op(0, "readlink", self._path(data))

    @rule()
    def compare_trees(self) -> None:
        self._compare_trees(f"at step {self.steps}")

    # -- rules: descriptors kept open, in either process ------------------------------

    @rule(data=st.data(), proc=PROCS, slot=SLOTS, flags=st.sampled_from(SLOT_FLAGS), mode=FILE_MODES)
    def slot_open(self, data: st.DataObject, proc: int, slot: int, flags: str, mode: Mode) -> None:
        self._slot_open(proc, slot, self._path(data, new=True), flags, mode)

    def _slot_open(self, proc: int, slot: int, path: bytes, flags: str, mode: Mode) -> None:
        # slot_open closes what the slot held first, whether or not the open succeeds.
        self.renamed.discard((proc, slot))
        if self._op(proc, "slot_open", slot, path, flags, mode)[0] == "ok":
            self.slots[(proc, slot)] = (path, flags)
            self._add(path)
        else:
            self.slots.pop((proc, slot), None)

    @precondition(lambda self: bool(self.slots))
    @rule(data=st.data(), action=st.sampled_from(
        ("pwrite", "write", "pread", "fstat", "ftruncate", "fsync", "fdatasync", "fchmod", "fsetxattr")),
        offset=OFFSETS, content=CONTENT, size=SIZES, mode=FILE_MODES, xname=XATTR_NAMES)
    def slot_io(self, data: st.DataObject, action: str, offset: int, content: bytes, size: int, mode: Mode,
                xname: str) -> None:
        proc, slot = data.draw(st.sampled_from(sorted(self.slots)), label="slot")
        args: dict[str, tuple[Any, ...]] = {
            "pwrite": ("slot_pwrite", slot, offset, content),
            "write": ("slot_write", slot, content),
            "pread": ("slot_pread", slot, 0),
            "fstat": ("slot_fstat", slot),
            "ftruncate": ("slot_ftruncate", slot, size),
            "fsync": ("slot_fsync", slot, False),
            "fdatasync": ("slot_fsync", slot, True),
            "fchmod": ("slot_fchmod", slot, mode),
            "fsetxattr": ("slot_fsetxattr", slot, xname, content[:100]),
        }
        self._op(proc, *args[action])

    @precondition(lambda self: bool(self.slots))
    @rule(data=st.data())
    def slot_close(self, data: st.DataObject) -> None:
        proc, slot = data.draw(st.sampled_from(sorted(self.slots)), label="slot")
        del self.slots[(proc, slot)]
        self.renamed.discard((proc, slot))
        self._op(proc, "slot_close", slot)

    # -- rules: descriptors kept across steps, used after their name changed ------------

    def _kept(self, data: st.DataObject, usable: Callable[[str], bool] | None = None) -> tuple[int, int, bytes, str]:
        """A kept descriptor: (its process, its slot, the path it was opened by, its open flags).

        Mostly one whose name an operation changed since it was opened, and
        mostly one whose open flags are *usable* for what follows (the
        others mostly give EBADF: compared too, but worth less).  If
        the one drawn has its name unchanged, mostly change it first (a step
        of its own in the history, from either process): the uses below
        are what this part of the machine is for, and a sequence "open, name
        change, use" should not depend on hypothesis enabling three rules at
        once (it turns rules off at random per example, swarm testing).
        """
        keys = sorted(self.slots)
        if self.renamed and data.draw(st.integers(0, 3), label="renamed") > 0:
            keys = sorted(self.renamed)
        if usable is not None and data.draw(st.integers(0, 7), label="usable") > 0:
            keys = [k for k in keys if usable(self.slots[k][1])] or keys
        proc, slot = data.draw(st.sampled_from(keys), label="slot")
        path, flags = self.slots[(proc, slot)]
        if (proc, slot) not in self.renamed:
            change = data.draw(st.sampled_from(("", "unlink", "recreate", "recreate", "replace", "rename_over")),
                               label="change the name first")
            if change:
                self._name_change(path, data, data.draw(PROCS, label="proc"), change,
                                  data.draw(FILE_MODES, label="mode"), data.draw(CONTENT, label="content"))
        return proc, slot, path, flags

    @rule(data=st.data(), proc=PROCS, slot=SLOTS, flags=st.sampled_from(KEPT_FLAGS))
    def keep_fd(self, data: st.DataObject, proc: int, slot: int, flags: str) -> None:
        """Open mostly an existing regular file, and keep the descriptor for the kept_* rules."""
        self._slot_open(proc, slot, self._file_path(data), flags, Mode(0o644))

    @rule(data=st.data(), proc=PROCS, slot=SLOTS, flags=st.sampled_from(KEPT_PATH_FLAGS))
    def keep_path_fd(self, data: st.DataObject, proc: int, slot: int, flags: str) -> None:
        """Keep an O_PATH descriptor, of a regular file mostly, else of anything."""
        self._slot_open(proc, slot, self._file_path(data), flags, Mode(0o644))

    @precondition(lambda self: bool(self.slots))
    @rule(data=st.data(), proc=PROCS, action=st.sampled_from(("unlink", "recreate", "recreate", "replace")),
          mode=FILE_MODES, content=CONTENT)
    def kept_unlink(self, data: st.DataObject, proc: int, action: str, mode: Mode, content: bytes) -> None:
        """Unlink the name of a kept descriptor, and maybe make it anew (create, or create elsewhere and rename)."""
        path = self.slots[data.draw(st.sampled_from(sorted(self.slots)), label="slot")][0]
        self._name_change(path, data, proc, action, mode, content)

    @precondition(lambda self: bool(self.slots))
    @rule(data=st.data(), proc=PROCS, action=st.sampled_from(("rename_over", "rename_away", "exchange", "link")),
          mode=FILE_MODES, content=CONTENT)
    def kept_rename(self, data: st.DataObject, proc: int, action: str, mode: Mode, content: bytes) -> None:
        """Rename another file over the name of a kept descriptor, rename it away, exchange it, or link it."""
        path = self.slots[data.draw(st.sampled_from(sorted(self.slots)), label="slot")][0]
        self._name_change(path, data, proc, action, mode, content)

    def _name_change(self, path: bytes, data: st.DataObject, proc: int, action: str, mode: Mode,
                     content: bytes) -> None:
        """Give *path* (the name of a kept descriptor) to another object, or its object another name."""
        if action == "unlink":
            self._op(proc, "unlink", path)
        elif action == "recreate":  # create even if the unlink failed: the name may be gone already
            self._op(proc, "unlink", path)
            self._op(proc, "create", path, "O_WRONLY|O_CREAT|O_EXCL", mode, content)
        elif action == "replace":  # write a new file, rename it over the name (how editors save)
            other = self._path(data, new=True)
            if self._op(proc, "create", other, "O_WRONLY|O_CREAT|O_TRUNC", mode, content)[0] == "ok":
                self._add(other)
                if self._op(proc, "rename", other, path, "0")[0] == "ok":
                    self._moved(other, path)
        elif action == "rename_over":
            other = self._path(data)
            if self._op(proc, "rename", other, path, "0")[0] == "ok":
                self._moved(other, path)
        elif action in ("rename_away", "exchange"):
            other = self._path(data, new=True)
            flags = "RENAME_EXCHANGE" if action == "exchange" else "0"
            if self._op(proc, "rename", path, other, flags)[0] == "ok":
                self._moved(path, other)
                if action == "exchange":
                    self._moved(other, path)
        else:  # "link": the object gains a name, the descriptor's st_nlink must follow
            other = self._path(data, new=True)
            if self._op(proc, "link", path, other, False)[0] == "ok":
                self._add(other)

    @precondition(lambda self: bool(self.slots))
    @rule(data=st.data(), proc=PROCS, name=KEPT_XATTR_NAMES, value=XATTR_VALUES,
          flags=st.sampled_from((0, 0, os.XATTR_CREATE, os.XATTR_REPLACE)))
    def kept_fsetxattr(self, data: st.DataObject, proc: int, name: str, value: bytes, flags: int) -> None:
        """fsetxattr through a kept descriptor, then getxattr of its name (which must not see it if renamed)."""
        owner, slot, path, open_flags = self._kept(data, _not_o_path)
        self._op(owner, "slot_fsetxattr", slot, name, value, flags)
        self._op(proc, "getxattr", path, name, "O_NOFOLLOW" not in open_flags)

    @precondition(lambda self: bool(self.slots))
    @rule(data=st.data(), proc=PROCS, action=st.sampled_from(("get", "list", "remove")), name=KEPT_XATTR_NAMES)
    def kept_xattr(self, data: st.DataObject, proc: int, action: str, name: str) -> None:
        """fgetxattr/flistxattr/fremovexattr through a kept descriptor, then getxattr of its name."""
        owner, slot, path, open_flags = self._kept(data, _not_o_path)
        ops: dict[str, tuple[Any, ...]] = {
            "get": ("slot_fgetxattr", slot, name),
            "list": ("slot_flistxattr", slot),
            "remove": ("slot_fremovexattr", slot, name),
        }
        self._op(owner, *ops[action])
        self._op(proc, "getxattr", path, name, "O_NOFOLLOW" not in open_flags)

    @precondition(lambda self: bool(self.slots))
    @rule(data=st.data())
    def kept_fstat(self, data: st.DataObject) -> None:
        """fstat of a kept descriptor, and whether its name still reaches the same object."""
        owner, slot, path, open_flags = self._kept(data)
        self._op(owner, "slot_fstat_vs", slot, path, "O_NOFOLLOW" not in open_flags)

    @precondition(lambda self: bool(self.slots))
    @rule(data=st.data(), proc=PROCS, append=st.booleans(), content=CONTENT)
    def kept_write(self, data: st.DataObject, proc: int, append: bool, content: bytes) -> None:
        """Flip O_APPEND of a kept descriptor with F_SETFL, write through it, then read its name."""
        owner, slot, path, open_flags = self._kept(data, _writable)
        self._op(owner, "slot_setfl_write", slot, append, content)
        self._op(proc, "read", path, 0, "O_NOFOLLOW" in open_flags)

    @precondition(lambda self: bool(self.slots))
    @rule(data=st.data(), flags=st.sampled_from(("O_RDONLY", "O_RDWR")), content=CONTENT)
    def kept_reopen(self, data: st.DataObject, flags: str, content: bytes) -> None:
        """Open /proc/self/fd/N of a kept descriptor anew (read-only, or read-write and pwrite), and read it."""
        owner, slot, _, _ = self._kept(data)
        self._op(owner, "slot_reopen", slot, flags, content if flags == "O_RDWR" else b"")

    @precondition(lambda self: bool(self.slots))
    @rule(data=st.data(), proc=PROCS, via_proc=st.booleans(), mode=FILE_MODES)
    def kept_chmod(self, data: st.DataObject, proc: int, via_proc: bool, mode: Mode) -> None:
        """fchmod of a kept descriptor, or chmod of its /proc/self/fd/N (the way to do it for O_PATH), then stat."""
        owner, slot, path, open_flags = self._kept(data, None if via_proc else _not_o_path)
        if "O_PATH" in open_flags:
            via_proc = via_proc or data.draw(st.booleans(), label="via /proc")
        self._op(owner, "slot_proc_chmod" if via_proc else "slot_fchmod", slot, mode)
        self._op(proc, "stat", path, "O_NOFOLLOW" not in open_flags)

    @rule(data=st.data(), writable=st.booleans(),
          action=st.sampled_from(("rename", "rename_over", "unlink", "chmod", "write", "truncate", "link")),
          content=CONTENT, content2=CONTENT)
    def two_processes(self, data: st.DataObject, writable: bool, action: str, content: bytes,
                      content2: bytes) -> None:
        """Process 1 keeps a descriptor while process 0 renames, unlinks, replaces or copies up the file.

        The kernel's rule (Linux 4.19+): every descriptor follows its file,
        even a read-only one opened on a lower file before another process
        copied it up, except for mappings made before the copy-up.
        """
        path, other = self._path(data), self._path(data, new=True)
        slot = 9  # reserved for this rule, closed before it returns
        if self._op(1, "slot_open", slot, path, "O_RDWR" if writable else "O_RDONLY", Mode(0o644))[0] != "ok":
            return
        if writable:
            self._op(1, "slot_pwrite", slot, 0, content)
        acts: dict[str, Callable[[], Outcome]] = {
            "rename": lambda: self._op(0, "rename", path, other, "0"),
            "rename_over": lambda: self._op(0, "rename", other, path, "0"),
            "unlink": lambda: self._op(0, "unlink", path),
            "chmod": lambda: self._op(0, "chmod", path, Mode(0o600)),
            "write": lambda: self._op(0, "write", path, "pwrite", 0, content2),
            "truncate": lambda: self._op(0, "truncate", path, 0, False),
            "link": lambda: self._op(0, "link", path, other, False),
        }
        if acts[action]()[0] == "ok":
            if action == "rename":
                self._moved(path, other)
            elif action == "rename_over":
                self._moved(other, path)
            elif action == "link":
                self._add(other)
        self._op(1, "slot_fstat", slot)
        self._op(1, "slot_pread", slot, 0)
        if writable:
            self._op(1, "slot_write", slot, content2)
            self._op(1, "slot_pread", slot, 0)
        self._op(0, "read", path, 0, True)
        self._op(0, "read", other, 0, True)
        self._op(1, "slot_close", slot)
        self._op(0, "stat", path, False)


# --------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------


def _require_overlay(base: Path) -> None:
    """Fail (not skip) with the reason when this machine cannot run the oracle."""
    if os.geteuid() != 0:
        pytest.fail("the write-path differential test needs root (mount -t overlay, trusted.* xattrs, mknod)")
    lower, upper, work, mnt = (base / n for n in ("probe-l", "probe-u", "probe-w", "probe-m"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    try:
        _kernel_mount((lower,), upper, work, mnt)
    except RuntimeError as e:
        pytest.fail(f"the kernel's overlayfs is the oracle and cannot mount here: {e}")
    _kernel_umount(mnt)
    shutil.rmtree(base / "probe-w")


def _our_mounts(base: Path) -> list[bytes]:
    prefix = os.fsencode(os.path.realpath(base)) + b"/"
    return [m for m in mount_points() if m.startswith(prefix)]


_OUR_MNT = re.compile(rb"/wdiff\d*/ex-[^/]+/[ab]/mnt$")
_STALE_AFTER = 1800.0  # seconds: no example lives that long


def _sweep_stale_mounts(pytest_root: Path) -> list[bytes]:
    """Unmount what an earlier run of this test left mounted because it was killed.

    Why: SIGKILL (or SIGTERM before this test installed its handler) leaves no
    chance to unmount, and a stale overlay keeps its upper and work dirs busy
    forever.  Only mounts of this test's own layout under pytest's temporary
    root are touched, and only when the run that made them is gone (its pid,
    recorded in ``owner.pid``, is dead; or, without the file, it is old).
    """
    prefix = os.fsencode(os.path.realpath(pytest_root)) + b"/"
    swept = []
    for m in mount_points():
        if not (m.startswith(prefix) and _OUR_MNT.search(m)):
            continue
        wdiff = Path(os.fsdecode(m)).parents[2]
        try:
            pid = int((wdiff / "owner.pid").read_text())
            alive = pid != os.getpid() and Path(f"/proc/{pid}").exists()
        except (OSError, ValueError):
            alive = time.time() - wdiff.stat().st_mtime < _STALE_AFTER
        if not alive:
            r = subprocess.run(["umount", m], capture_output=True, timeout=30)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)
            swept.append(m)
    return swept


def _kernel_clobbers(op: str, a: Outcome, b: Outcome) -> bool:
    """The one kernel bug the machine steps on, and pyunionfs does not copy.

    A metadata change (chmod, chown, xattr) through a descriptor of a lower
    fifo, device or symlink whose name was since replaced copies it up over
    the name's new file: overlayfs's copy-up through the work dir renames
    without RENAME_NOREPLACE (regular files go through a tmpfile and link(),
    which fails with EEXIST).  Linux 6.18 then shows the old object's change
    as done and the new file's data is gone from the upper.  pyunionfs
    answers EEXIST, as the kernel does for regular files (README, "Where
    pyunionfs differs").  The example is dropped: the trees differ after it.
    """
    return (
        op.startswith("slot_")
        and a[0] == "ok"
        and b == ("err", "EEXIST")
        and isinstance(a[1], str)
        and a[1].split(" ", 1)[0] in ("fifo", "chr", "blk", "sock", "lnk")
    )


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    # Turn SIGTERM into an exception, so that hypothesis still calls teardown() and everything is unmounted.
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.mark.timeout(1800)  # shrinking a failure takes minutes; a passing run takes about one
@EACH_ENGINE
def test_write_path_matches_kernel(tmp_path_factory: pytest.TempPathFactory, engine: str) -> None:
    base = tmp_path_factory.mktemp("wdiff")
    (base / "owner.pid").write_text(str(os.getpid()))
    _sweep_stale_mounts(base.parent.parent)
    _require_overlay(base)
    if not SELFTEST:
        require_fuse()

    class Machine(WriteDifferential):
        context = Context(base=base, selftest=SELFTEST, engine=engine)

    old_handler = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=MAX_EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                derandomize=True,
                database=None,
                report_multiple_bugs=False,
                print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
                phases=tuple(Phase) if SHRINK else tuple(p for p in Phase if p not in (Phase.shrink, Phase.explain)),
            ),
        )
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        left = _our_mounts(base)
        for m in left:
            subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)
    assert not left, f"mounts left behind: {left}"
