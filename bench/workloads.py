"""The workloads: what is timed, and what is done untimed around it.

A workload runs once per (round, system) on a freshly mounted union with an empty upper. It
reports one or more timed *rows* through :meth:`Context.measure`; everything outside a measure
block (warming caches, writing data back, preparing inputs) is untimed. Conventions:

* *cold*: the kernel's caches are dropped after mounting, so data and metadata come from disk.
* *lower warm*: the lower's own caches are warmed (untimed) through the lower itself, then the
  fresh mount is used for the first time: what is timed is the union's own cost, not the disk's.
* *warm*: the same thing is done once untimed through the mount, then timed.
* Writes are followed (untimed) by ``sync``, so dirty data never spills into the next row.
* Before the timed part, memory is recycled (:meth:`Context.prefault`), against a VM artifact.
* Many-file write workloads start with the kernel's caches dropped: with GiBs of page cache, creating
  files on this VM's ext4 was up to 15 times slower, for every system alike, and how much depended on
  what the previous run left cached; from a dropped cache every system starts from the same state.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .dataset import Dataset
from .osutil import BenchError, cpu_seconds, drop_caches, mount_fstype, peak_rss_mib, reset_peak_rss, run
from .profile import MiB, Profile


@dataclass
class Sample:
    """One timed row of one workload on one system in one round."""

    system: str
    row: str
    round: int
    seconds: float | None = None
    cpu_seconds: float | None = None  # the daemon's user+system time during the row
    peak_rss_mib: float | None = None  # the daemon's VmHWM during the row
    error: str | None = None
    build: str | None = None  # fingerprint of the code measured (pyunionfs may be edited during a run)


@dataclass
class Context:
    """What a workload may touch: the root to work in, the real lower (for warming), the dataset."""

    system: str
    round: int
    root: Path  # the mount, or for plain the lower itself or a writable folder
    dataset: Dataset
    daemon_pid: int | None
    scratch: Path  # a folder on the work disk, outside every mount
    build: str | None = None
    samples: list[Sample] = field(default_factory=list)

    @property
    def profile(self) -> Profile:
        return self.dataset.profile

    @property
    def lower(self) -> Path:
        return self.dataset.lower

    @contextlib.contextmanager
    def measure(self, row: str) -> Iterator[None]:
        """Time the block (wall clock) and the daemon's CPU time and peak memory across it."""
        pid = self.daemon_pid
        cpu0 = 0.0
        if pid is not None:
            reset_peak_rss(pid)
            cpu0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        sample = Sample(self.system, row, self.round, seconds, build=self.build)
        if pid is not None:
            sample.cpu_seconds = cpu_seconds(pid) - cpu0
            sample.peak_rss_mib = peak_rss_mib(pid)
        self.samples.append(sample)

    def cold(self, prefault: int = 256 * MiB) -> None:
        """Drop the kernel's caches, then make *prefault* bytes of memory cheap to allocate again (see prefault)."""
        drop_caches()
        self.prefault(prefault)

    def prefault(self, nbytes: int) -> None:
        """Write and delete a scratch file of *nbytes* (untimed), so that much page-cache memory is at hand.

        In a VM with free page reporting (Firecracker, or virtio-balloon's), memory freed for more than a
        couple of seconds is handed back to the host, and the next allocation of it faults on the host: a
        workload that needs a GiB of page cache right after a quiet spell ran up to 10 times slower than
        the same one a moment later, depending only on its place in the order. Recycling the pages just
        before the timed part takes that out of every system's time alike.
        """
        path = self.scratch / "prefault"
        block = b"\1" * MiB
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(nbytes // MiB):
                os.write(fd, block)
        finally:
            os.close(fd)
            path.unlink()  # dirty pages of a deleted file are dropped, never written back

    def settle(self) -> None:
        """Write everything back (untimed), so the next row starts with no dirty data."""
        os.sync()

    def warm_lower(self, sub: str = "", read_max: int = 0) -> None:
        """Bring the lower's metadata (and files up to *read_max* bytes) into the cache, not through the union."""
        _warm(self.lower, sub, read_max)

    def warm_backing(self, sub: str = "", read_max: int = 0) -> None:
        """:meth:`warm_lower` for a write workload: on plain, warm plain's own copies (in root), not the lower."""
        _warm(self.root if mount_fstype(self.root) is None else self.lower, sub, read_max)

    def total(self, row: str, parts: Sequence[str]) -> None:
        """Record *row* as the sum of the rows *parts* measured in this run: times and CPU added, peak RSS the max."""
        got = [s for s in self.samples if s.row in parts and s.seconds is not None]
        if len(got) != len(parts):
            raise BenchError(f"{row}: only {len(got)} of its {len(parts)} parts were measured")
        sample = Sample(self.system, row, self.round, sum(s.seconds or 0.0 for s in got), build=self.build)
        if self.daemon_pid is not None:
            sample.cpu_seconds = sum(s.cpu_seconds or 0.0 for s in got)
            sample.peak_rss_mib = max(s.peak_rss_mib or 0.0 for s in got)
        self.samples.append(sample)


def _warm(base: Path, sub: str, read_max: int) -> None:
    """Read the metadata of the tree *sub* of *base* (and its files up to *read_max* bytes) into the cache."""
    top = os.path.join(os.fsencode(base), os.fsencode(sub)) if sub else os.fsencode(base)
    for folder, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            if read_max and 0 < st.st_size <= read_max and (st.st_mode & 0o170000) == 0o100000:
                with open(path, "rb") as f:
                    while f.read(MiB):
                        pass


@dataclass(frozen=True)
class Workload:
    name: str
    rows: tuple[str, ...]
    doc: str  # one line for the README and the report
    run: Callable[[Context], None]
    writes: bool = False  # plain runs it in a writable folder instead of on the lower itself
    tool: str | None = None  # external program it needs; skipped (and said so) without it
    plain_inputs: Callable[[Dataset, Path], None] | None = None  # copies lower files a plain run rewrites


WORKLOADS: list[Workload] = []


def workload(
    name: str,
    doc: str,
    rows: tuple[str, ...] = (),
    writes: bool = False,
    tool: str | None = None,
    plain_inputs: Callable[[Dataset, Path], None] | None = None,
) -> Callable[[Callable[[Context], None]], Callable[[Context], None]]:
    def register(fn: Callable[[Context], None]) -> Callable[[Context], None]:
        WORKLOADS.append(Workload(name, rows or (name,), doc, fn, writes, tool, plain_inputs))
        return fn

    return register


def _quiet(cmd: Sequence[object], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    """Run a timed command with its output discarded (writing it would time the terminal, not the filesystem)."""
    res = subprocess.run(
        [os.fsdecode(c) if isinstance(c, bytes) else str(c) for c in cmd],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        cwd=cwd, env=env, timeout=1800,
    )  # fmt: skip
    if res.returncode != 0:
        tail = res.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise BenchError(f"{Path(str(cmd[0])).name} exited {res.returncode}: {' / '.join(tail)}")


def _stat_all(ctx: Context) -> None:
    root = os.fsencode(ctx.root)
    for rel in ctx.dataset.entries():
        os.lstat(os.path.join(root, rel))


def _read_file(path: Path) -> int:
    buf = bytearray(MiB)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def _write_file(path: Path, size: int, fsync: bool) -> None:
    block = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left:
            left -= os.write(fd, block[: min(left, MiB)])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


# --- metadata --------------------------------------------------------------------------------------


@workload("stat-cold", "lstat() of every entry of the lower, right after mounting with the kernel's caches dropped")
def stat_cold(ctx: Context) -> None:
    ctx.cold()
    with ctx.measure("stat-cold"):
        _stat_all(ctx)


@workload("stat-warm", "lstat() of every entry of the lower, a second time through the same mount")
def stat_warm(ctx: Context) -> None:
    _stat_all(ctx)
    with ctx.measure("stat-warm"):
        _stat_all(ctx)


@workload("find", "`find MNT` over the whole tree (lower warm, mount fresh)")
def find(ctx: Context) -> None:
    ctx.warm_lower()
    with ctx.measure("find"):
        _quiet(["find", ctx.root])


@workload("ls-lR", "`ls -lR MNT` over the whole tree (lower warm, mount fresh)")
def ls_lr(ctx: Context) -> None:
    ctx.warm_lower()
    with ctx.measure("ls-lR"):
        _quiet(["ls", "-lR", ctx.root], env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")})


@workload("git-status", "`git status` in the repository that lives in the lower (lower warm, mount fresh)")
def git_status(ctx: Context) -> None:
    ctx.warm_lower("repo", read_max=64 * MiB)
    with ctx.measure("git-status"):
        _quiet(["git", "-c", "safe.directory=*", "-C", ctx.root / "repo", "status", "--porcelain"])


_IMPORTS = r"""
import importlib, sys, warnings
warnings.simplefilter("ignore")
root = sys.argv[1]
sys.path[:0] = [root, root + "/lib-dynload"]
for name in open(sys.argv[2]).read().split():
    mod = importlib.import_module(name)
    if not (getattr(mod, "__file__", None) or "").startswith(root + "/"):
        raise SystemExit(f"{name} was imported from {mod.__file__}, not from {root}")
"""


@workload("import", "import a few hundred standard-library modules from the lower's copy (lower warm, mount fresh)")
def imports(ctx: Context) -> None:
    ctx.warm_lower("stdlib", read_max=64 * MiB)
    cmd = [sys.executable, "-S", "-B", "-E", "-c", _IMPORTS, ctx.root / "stdlib", ctx.dataset.root / "modules.txt"]
    with ctx.measure("import"):
        _quiet(cmd, cwd=Path("/"))


# --- data ------------------------------------------------------------------------------------------


@workload("seqread-cold", "sequential read of the big lower file, 1 MiB reads, kernel caches dropped after mounting")
def seqread_cold(ctx: Context) -> None:
    ctx.cold(prefault=2 * ctx.profile.big_file)  # a FUSE read caches the data twice: lower and mount
    with ctx.measure("seqread-cold"):
        _read_file(ctx.root / ctx.dataset.big_rel)


@workload("seqread-warm", "sequential read of the big lower file, a second time through the same mount")
def seqread_warm(ctx: Context) -> None:
    _read_file(ctx.root / ctx.dataset.big_rel)
    ctx.prefault(ctx.profile.big_file)
    with ctx.measure("seqread-warm"):
        _read_file(ctx.root / ctx.dataset.big_rel)


@workload("seqwrite", "sequential write of a new file, 1 MiB writes, buffered (timed up to close)", writes=True)
def seqwrite(ctx: Context) -> None:
    ctx.prefault(2 * ctx.profile.write_size)
    with ctx.measure("seqwrite"):
        _write_file(ctx.root / "seqwrite.out", ctx.profile.write_size, fsync=False)
    ctx.settle()


@workload("seqwrite-fsync", "sequential write of a new file, 1 MiB writes, then fsync (timed up to close)", writes=True)
def seqwrite_fsync(ctx: Context) -> None:
    ctx.prefault(2 * ctx.profile.write_size)
    with ctx.measure("seqwrite-fsync"):
        _write_file(ctx.root / "seqwrite.out", ctx.profile.write_size, fsync=True)
    ctx.settle()


@workload("randread", "fio: random 4 KiB reads (psync, one job) across the big lower file, caches dropped", tool="fio")
def randread(ctx: Context) -> None:
    ctx.cold()
    cmd = [
        "fio", "--name=randread", f"--filename={ctx.root / ctx.dataset.big_rel}", "--readonly", "--rw=randread",
        "--bs=4k", f"--io_size={ctx.profile.randread_bytes}", "--ioengine=psync", "--randrepeat=1", "--norandommap",
        "--invalidate=1", "--output=/dev/null",
    ]  # fmt: skip
    with ctx.measure("randread"):
        _quiet(cmd)


# --- many files ------------------------------------------------------------------------------------


@workload(
    "smallfiles",
    "create and write (1 KiB each), then delete, many small files in 100 new folders",
    rows=("smallfiles-create", "smallfiles-delete"),
    writes=True,
)
def smallfiles(ctx: Context) -> None:
    top = os.path.join(os.fsencode(ctx.root), b"small")
    data = b"x" * ctx.profile.small_file_size
    folders = [os.path.join(top, b"d%02d" % i) for i in range(100)]
    paths = [os.path.join(folders[i % 100], b"f%05d" % i) for i in range(ctx.profile.small_files)]
    ctx.cold()
    with ctx.measure("smallfiles-create"):
        os.mkdir(top)
        for d in folders:
            os.mkdir(d)
        for p in paths:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
    ctx.settle()
    with ctx.measure("smallfiles-delete"):
        for p in paths:
            os.unlink(p)
        for d in folders:
            os.rmdir(d)
        os.rmdir(top)
    ctx.settle()


@workload("tar", "`tar -x` of the stdlib's sources into the mount, then `rm -rf` of the tree", rows=("tar-x", "rm-rf"),
          writes=True)  # fmt: skip
def tar(ctx: Context) -> None:
    dest = ctx.root / "untar"
    dest.mkdir()
    ctx.cold()
    with open(ctx.dataset.tarball, "rb") as f:  # the tarball is input, not what is measured: read it into the cache
        while f.read(MiB):
            pass
    with ctx.measure("tar-x"):
        _quiet(["tar", "-xf", ctx.dataset.tarball, "-C", dest])
    ctx.settle()
    with ctx.measure("rm-rf"):
        _quiet(["rm", "-rf", dest])
    ctx.settle()


# --- copy-up ---------------------------------------------------------------------------------------


def _plain_big(ds: Dataset, dest: Path) -> None:
    (dest / "big").mkdir()
    shutil.copyfile(ds.lower / ds.big_rel, dest / ds.big_rel)


@workload("copyup", "first write (4 KiB at offset 0) to the big lower file: open for writing, write, close",
          writes=True, plain_inputs=_plain_big)  # fmt: skip
def copyup(ctx: Context) -> None:
    ctx.prefault(2 * ctx.profile.big_file)
    with ctx.measure("copyup"):
        fd = os.open(ctx.root / ctx.dataset.big_rel, os.O_WRONLY)
        try:
            os.pwrite(fd, b"y" * 4096, 0)
        finally:
            os.close(fd)
    ctx.settle()


def _rewrite_targets(ds: Dataset) -> list[bytes]:
    """The lower .py files the container-like sequence replaces, grouped by folder like packages."""
    picked = [e for e in ds.entries() if e.startswith(b"stdlib/") and e.endswith(b".py")]
    return picked[: ds.profile.rewrite_files]


def _plain_rewrites(ds: Dataset, dest: Path) -> None:
    src = os.fsencode(ds.lower)
    for rel in _rewrite_targets(ds):
        target = os.path.join(os.fsencode(dest), rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(src, rel), target)


@workload(
    "container",
    "package-manager-like update: per folder, write every file's replacement as NAME.dpkg-new, rename each over "
    "the lower original, then rewrite a status file through write+fsync+rename",
    writes=True,
    plain_inputs=_plain_rewrites,
)
def container(ctx: Context) -> None:
    root = os.fsencode(ctx.root)
    groups: dict[bytes, list[bytes]] = {}
    for rel in _rewrite_targets(ctx.dataset):
        groups.setdefault(os.path.dirname(rel), []).append(rel)
    status = os.path.join(root, b"status")
    body = b"# replaced by the bench\n" + b"pass\n" * 400
    ctx.cold()
    ctx.warm_lower("stdlib")
    with ctx.measure("container"):
        for n, (_folder, rels) in enumerate(sorted(groups.items())):
            for rel in rels:
                fd = os.open(os.path.join(root, rel + b".dpkg-new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, body)
                os.close(fd)
            for rel in rels:
                os.rename(os.path.join(root, rel + b".dpkg-new"), os.path.join(root, rel))
            fd = os.open(status + b"-new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, b"package %d installed\n" % n * 50)
            os.fsync(fd)
            os.close(fd)
            os.rename(status + b"-new", status)
    ctx.settle()


# --- package manager -------------------------------------------------------------------------------

PKG_STEPS = ("pkg-unpack", "pkg-verify", "pkg-compileall", "pkg-readlink", "pkg-tar-c")
PKG_PER_PACKAGE = 100  # entries per package: dpkg renames into place, and records, package by package
PKG_FSYNC = False  # dpkg fsyncs every unpacked file before its renames unless --force-unsafe-io, as image builds set
PKG_TREES = (b"stdlib", b"share")  # the lower trees the packages land in, verified and archived
PKG_SIZES = (200, 700, 1500, 3000, 6000, 12000, 400, 25000)  # bytes of the unpacked files, in turn
PKG_MTIME = 1_650_000_000 * 10**9  # the mtime (ns) dpkg gives every unpacked entry, from the package
PKG_STANZA = b"Package: %s\nStatus: install ok installed\nVersion: 1.0-1\nArchitecture: all\n\n"
_T = TypeVar("_T")


@dataclass(frozen=True)
class _Entry:
    rel: bytes
    data: bytes  # the file's content, or the symlink's target
    link: bool = False


@dataclass(frozen=True)
class _Package:
    name: bytes
    dirs: tuple[bytes, ...]  # folders its archive holds, parents first (the existing ones are left alone)
    entries: tuple[_Entry, ...]  # in archive order
    listing: bytes  # its info/NAME.list
    md5sums: bytes  # its info/NAME.md5sums


@dataclass(frozen=True)
class _PkgPlan:
    packages: tuple[_Package, ...]
    verify: tuple[tuple[bytes, str], ...]  # lower files and the MD5 their content has once the packages are in
    links: tuple[tuple[bytes, bytes], ...]  # symlinks (the lower's and the unpacked ones) and their targets
    compile: tuple[bytes, ...]  # folders of the stdlib copy to byte-compile
    trees: tuple[bytes, ...]  # what tar archives: the lower trees and the unpacked one
    tar_bytes: int  # bytes of the files tar reads, about


_PLANS: dict[Path, _PkgPlan] = {}


def _spread(items: Sequence[_T], n: int) -> list[_T]:
    """*n* items picked evenly over *items* (all of them when there are not more)."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _pkg_plan(ds: Dataset) -> _PkgPlan:
    """What the packages hold and what is verified, derived from the lower (once per dataset; untimed).

    Of every ten entries of a package: two replace a lower file (dpkg's backup link, then rename-over:
    a copy-up), three are new files in folders of the lower, four new files in the package's own new
    folders under usr/lib, one a symlink (alternately in its own folders and in the lower's).
    """
    if ds.root in _PLANS:
        return _PLANS[ds.root]
    p = ds.profile
    lower = os.fsencode(ds.lower)
    files: list[bytes] = []
    folders: list[bytes] = []
    lower_links: list[tuple[bytes, bytes]] = []
    tar_bytes = 0
    for rel in ds.entries():
        parts = rel.split(b"/")
        if parts[0] not in PKG_TREES:
            continue
        st = os.lstat(os.path.join(lower, rel))
        if stat.S_ISREG(st.st_mode):
            tar_bytes += st.st_size
        if b"__pycache__" in parts:  # no package ships .pyc files: they are compiled after unpacking
            continue
        if stat.S_ISREG(st.st_mode):
            files.append(rel)
        elif stat.S_ISDIR(st.st_mode):
            folders.append(rel)
        elif stat.S_ISLNK(st.st_mode):
            lower_links.append((rel, os.readlink(os.path.join(lower, rel))))
    if not files or not folders:
        raise BenchError(f"pkg-manager: the lower has no files under {b', '.join(PKG_TREES).decode()}")
    blob = random.Random(20240601).randbytes(64 * 1024)
    replace = iter(_spread(files, p.pkg_files // 5))
    homes = _spread(folders, 50)
    replaced: dict[bytes, bytes] = {}
    packages: list[_Package] = []
    links: list[tuple[bytes, bytes]] = []
    for k in range(0, (p.pkg_files + PKG_PER_PACKAGE - 1) // PKG_PER_PACKAGE):
        base = b"usr/lib/pkg%03d" % k
        entries: list[_Entry] = []
        for i in range(k * PKG_PER_PACKAGE, min(p.pkg_files, (k + 1) * PKG_PER_PACKAGE)):
            slot = i % 10
            if slot == 9:  # a symlink to the package's previous file, from its own folder or from a lower one
                if i % 20 == 9:
                    link = b"%s/links/l%04d" % (base, i)
                    target = b"../sub%d/file%04d" % ((i - 1) % 4, i - 1)
                else:
                    link = homes[i % len(homes)] + b"/pkg%03d-l%04d" % (k, i)
                    target = b"/%s/sub%d/file%04d" % (base, (i - 1) % 4, i - 1)
                entries.append(_Entry(link, target, link=True))
                continue
            old = next(replace, None) if slot in (0, 5) else None  # None too once the lower has no more
            if old is not None:
                dest = old
            elif slot in (1, 4, 7):
                dest = homes[i % len(homes)] + b"/pkg%03d-%04d.dat" % (k, i)
            else:
                dest = b"%s/sub%d/file%04d" % (base, i % 4, i)
            size = PKG_SIZES[i % len(PKG_SIZES)]
            if dest.endswith(b".py"):  # byte-compiled later: it must stay Python
                line = b"VALUE_%d = %d\n" % (i, k)
                data = b"# from package %03d\n" % k + line * (size // len(line))
            else:
                off = (i * 7919) % (len(blob) - size)
                data = blob[off : off + size]
            if old is not None:
                replaced[dest] = data
            entries.append(_Entry(dest, data))
        links += [(e.rel, e.data) for e in entries if e.link]
        dirs = (b"usr", b"usr/lib", base, *(b"%s/sub%d" % (base, j) for j in range(4)), base + b"/links")
        name = b"pkg%03d" % k
        listing = b"".join(b"/" + d + b"\n" for d in dirs) + b"".join(b"/" + e.rel + b"\n" for e in entries)
        sums = b"".join(_md5(e.data).encode() + b"  " + e.rel + b"\n" for e in entries if not e.link)
        packages.append(_Package(name, dirs, tuple(entries), listing, sums))
    verify = []
    for rel in _spread(files, p.pkg_verify_files):
        if rel in replaced:
            verify.append((rel, _md5(replaced[rel])))
        else:
            with open(os.path.join(lower, rel), "rb") as f:
                verify.append((rel, hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()))
    compile_dirs = tuple(b"stdlib/" + os.fsencode(d) for d in p.pkg_compile)
    compile_dirs = tuple(d for d in compile_dirs if os.path.isdir(os.path.join(lower, d)))
    if not compile_dirs:
        raise BenchError(f"pkg-manager: none of {', '.join(p.pkg_compile)} is in the lower's stdlib")
    trees = tuple(t for t in PKG_TREES if os.path.isdir(os.path.join(lower, t))) + (b"usr",)
    plan = _PkgPlan(tuple(packages), tuple(verify), tuple(lower_links + links), compile_dirs, trees, tar_bytes)
    _PLANS[ds.root] = plan
    return plan


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _db_replace(path: bytes, data: bytes, fsync: bool) -> None:
    """dpkg's way of updating a file of its database: write NAME-new (fsync), rename it over NAME."""
    fd = os.open(path + b"-new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(path + b"-new", path)


def _pkg_db_init(root: bytes) -> bytes:
    """The package database an installed system has (untimed): var/lib/dpkg with a status file."""
    info = os.path.join(root, b"var/lib/dpkg/info")
    os.makedirs(info)
    status = b"".join(PKG_STANZA % b"base%03d" % n for n in range(300))
    _db_replace(os.path.join(root, b"var/lib/dpkg/status"), status, fsync=False)
    return status


def _pkg_unpack(root: bytes, plan: _PkgPlan, status: bytes) -> None:
    """Unpack every package as dpkg does, then record it in the database."""
    uid, gid = os.getuid(), os.getgid()
    db = os.path.join(root, b"var/lib/dpkg")
    for pkg in plan.packages:
        for d in pkg.dirs:
            path = os.path.join(root, d)
            try:
                os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
        backups = []
        for e in pkg.entries:
            final = os.path.join(root, e.rel)
            try:
                old = os.lstat(final)
            except FileNotFoundError:
                pass
            else:  # the old file stays, as NAME.dpkg-tmp, until the package is in
                tmp = final + b".dpkg-tmp"
                if stat.S_ISLNK(old.st_mode):
                    os.symlink(os.readlink(final), tmp)
                else:
                    os.link(final, tmp)
                backups.append(tmp)
            new = final + b".dpkg-new"
            if e.link:
                os.symlink(e.data, new)
                os.lchown(new, uid, gid)
                os.utime(new, ns=(PKG_MTIME, PKG_MTIME), follow_symlinks=False)
                continue
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0)
            try:
                _write_all(fd, e.data)
                os.fchown(fd, uid, gid)
                os.fchmod(fd, 0o644)
                os.utime(fd, ns=(PKG_MTIME, PKG_MTIME))
            finally:
                os.close(fd)
        if PKG_FSYNC:
            for e in pkg.entries:
                if not e.link:
                    fd = os.open(os.path.join(root, e.rel + b".dpkg-new"), os.O_WRONLY)
                    os.fsync(fd)
                    os.close(fd)
        for e in pkg.entries:
            final = os.path.join(root, e.rel)
            os.rename(final + b".dpkg-new", final)
        _db_replace(os.path.join(db, b"info", pkg.name + b".list"), pkg.listing, fsync=False)
        _db_replace(os.path.join(db, b"info", pkg.name + b".md5sums"), pkg.md5sums, fsync=False)
        for tmp in backups:
            os.unlink(tmp)
        status += PKG_STANZA % pkg.name
        _db_replace(os.path.join(db, b"status"), status, fsync=True)


def _pkg_verify(root: bytes, plan: _PkgPlan) -> None:
    """As ``dpkg --verify``: lstat every file, read it, compare its MD5."""
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    bad = []
    for rel, want in plan.verify:
        path = os.path.join(root, rel)
        os.lstat(path)
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        if h.hexdigest() != want:
            bad.append(rel)
    if bad:
        raise BenchError(f"pkg-verify: {len(bad)} files read back other content than written, e.g. {bad[0]!r}")


def _pkg_readlink(root: bytes, plan: _PkgPlan) -> None:
    bad = []
    for rel, want in plan.links:
        path = os.path.join(root, rel)
        os.lstat(path)
        if os.readlink(path) != want:
            bad.append(rel)
    if bad:
        raise BenchError(f"pkg-readlink: {len(bad)} symlinks read back another target, e.g. {bad[0]!r}")


# tar's exit status 1 is "some file changed as it was read": a warning (its data was archived), not a failure.
_TAR_C = 'tar -cf - --warning=no-file-changed -C "$0" "$@" | cat >/dev/null; ((PIPESTATUS[0] < 2 && !PIPESTATUS[1]))'


def _plain_pkg(ds: Dataset, dest: Path) -> None:
    for tree in PKG_TREES:
        src = ds.lower / os.fsdecode(tree)
        if src.is_dir():
            run(["cp", "-a", "--", src, dest / src.name])


@workload(
    "pkg-manager",
    "apt/dpkg in a container root, in steps: unpack packages dpkg's way (NAME.dpkg-new then rename, replaced lower "
    "files kept as a NAME.dpkg-tmp link until the package is in, symlinks, database updates with fsync), "
    "`dpkg --verify` (lstat, read, MD5 of lower files), `python -m compileall -q -f` of stdlib packages of the "
    "lower, readlink of every symlink, `tar -c` of the stdlib and /usr/share trees into a pipe; `pkg-manager` is "
    "the sum of the steps (caches dropped, then the lower warm)",
    rows=("pkg-manager", *PKG_STEPS),
    writes=True,
    plain_inputs=_plain_pkg,
)
def pkg_manager(ctx: Context) -> None:
    plan = _pkg_plan(ctx.dataset)
    root = os.fsencode(ctx.root)
    status = _pkg_db_init(root)
    ctx.cold()
    for tree in plan.trees[:-1]:
        ctx.warm_backing(os.fsdecode(tree), read_max=64 * MiB)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    steps: list[tuple[str, Callable[[], None]]] = [
        ("pkg-unpack", lambda: _pkg_unpack(root, plan, status)),
        ("pkg-verify", lambda: _pkg_verify(root, plan)),
        # -f: the lower holds up-to-date .pyc files, which compileall would only check; an upgrade rewrites them
        ("pkg-compileall", lambda: _quiet(
            [sys.executable, "-I", "-m", "compileall", "-q", "-f", *(os.path.join(root, d) for d in plan.compile)],
            cwd=Path("/"), env=env)),
        ("pkg-readlink", lambda: _pkg_readlink(root, plan)),
        # Into a pipe: GNU tar writing to /dev/null itself notices, and reads no file's data. Its exit status 1
        # (a file changed as it was read: unionfs-fuse's folders change their times under it) is a warning.
        ("pkg-tar-c", lambda: _quiet(["bash", "-c", _TAR_C, root, *plan.trees], env=env)),
    ]  # fmt: skip
    for row, step in steps:
        ctx.prefault(max(256 * MiB, plan.tar_bytes + 64 * MiB) if row == "pkg-tar-c" else 256 * MiB)
        with ctx.measure(row):
            step()
        ctx.settle()
    ctx.total("pkg-manager", PKG_STEPS)


def by_row() -> dict[str, Workload]:
    return {row: w for w in WORKLOADS for row in w.rows}


def select(only: str | None) -> list[Workload]:
    """Workloads named in --only (workload or row names, comma-separated), in their fixed order."""
    if not only:
        return list(WORKLOADS)
    names = {n.strip() for n in only.split(",") if n.strip()}
    rows = by_row()
    unknown = names - set(rows) - {w.name for w in WORKLOADS}
    if unknown:
        raise BenchError(f"unknown workload(s): {', '.join(sorted(unknown))}; known: {', '.join(rows)}")
    wanted = {w.name for w in WORKLOADS if w.name in names} | {rows[n].name for n in names if n in rows}
    return [w for w in WORKLOADS if w.name in wanted]


def check_tool(w: Workload) -> str | None:
    """Why *w* cannot run here (its tool is missing), or None."""
    if w.tool and shutil.which(w.tool) is None:
        return f"{w.tool} is not installed (apt-get install {w.tool}, or --install-peers)"
    return None

