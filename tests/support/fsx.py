"""A data-integrity exerciser in the spirit of fsx (issue 6).

:class:`Fsx` drives a few files below a directory (normally a mount) with a
long, seeded stream of random operations -- ``pread``/``pwrite`` (also past
EOF, leaving holes), ``ftruncate`` and ``truncate(path)`` both ways, reads and
writes through ``MAP_SHARED`` mappings (``msync`` sometimes, always
``munmap``), ``fallocate`` (punch hole, zero range, keep-size allocation,
plain extension), ``O_TRUNC`` opens, ``O_APPEND`` writes, ``fsync`` and
``fdatasync``, dropping the page cache (``POSIX_FADV_DONTNEED``, so that
reads reach the file system and not only the kernel's cache), and closing and
reopening descriptors -- and checks each result against an in-memory model,
one ``bytearray`` per file:

* every read (``pread`` or through a mapping) is compared with the model;
* after every operation that may change a file, its ``st_size`` (``fstat``);
* every ``check_every`` operations one file is read whole and compared,
  with ``fstat`` and ``stat(path)`` (half the time after dropping its cached
  pages); every ``check_all_every`` operations all of them, and at the end.

Some files start in a lower layer (:func:`make_lowers`), so the first change
copies them up -- by ``open(O_RDWR)``, ``open(O_TRUNC)``, ``open(O_APPEND)``
or ``truncate(path)``, whichever op comes first -- and one is created through
the directory.  Before anything is written, read-only descriptors are opened
on some lower files and kept for the whole run: they must see every later
write (pyunionfs switches read handles to the copy; the kernel's overlayfs
reopens the real file for reads, though not for mmap: see *early_mmap*).

Mappings are faulted in with ``MADV_POPULATE_READ``/``WRITE`` before they are
touched: a page the file system cannot provide becomes an EFAULT and a report,
not a SIGBUS that would kill the test process with its mount still up.

Everything is decided by ``random.Random(seed)`` and the model alone, so a
seed replays the same operations on any correct filesystem, and a run of N
operations is a prefix of a run of more.  A mismatch raises :class:`FsxFailure`
whose message names the seed, the operation number, the first differing
offset with the bytes around it, and the last 30 steps (operations and the
opens they did; those that touched the differing offset marked ``*``).

Pure Python: ``os``, ``mmap`` and ``fallocate(2)`` through ctypes.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import ctypes
import errno
import mmap
import os
import random
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

__all__ = [
    "ALL_FALLOCATE_MODES",
    "KEEP_SIZE",
    "PUNCH_HOLE",
    "ZERO_RANGE",
    "Fsx",
    "FsxFailure",
    "check_layer",
    "fallocate",
    "make_lowers",
    "populate",
    "supported_fallocate_modes",
]

KiB = 1024
PAGE = mmap.PAGESIZE
KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10
#: The fallocate modes the exerciser uses.
ALL_FALLOCATE_MODES = frozenset({0, KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE, ZERO_RANGE, ZERO_RANGE | KEEP_SIZE})
#: madvise(2) advice (Linux 5.14+) that faults a range in and fails with EFAULT where an access would SIGBUS.
MADV_POPULATE_READ, MADV_POPULATE_WRITE = 22, 23

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """The raw fallocate(2) (posix_fallocate would fall back to writing zeros); OSError on failure."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}, off={offset}, len={length}): {os.strerror(err)}")


def supported_fallocate_modes(directory: Path) -> frozenset[int]:
    """The modes of :data:`ALL_FALLOCATE_MODES` the filesystem holding *directory* supports.

    Why: what the real filesystem under an upper supports must work through
    the mount too, so the exerciser is told the upper's modes and treats any
    failure of them as an error (never silently skips them).
    """
    ok = set()
    fd, name = tempfile.mkstemp(dir=directory, prefix=".fsx-probe-")
    try:
        os.ftruncate(fd, 4 * PAGE)
        for mode in sorted(ALL_FALLOCATE_MODES):
            try:
                fallocate(fd, mode, PAGE, PAGE)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            else:
                ok.add(mode)
    finally:
        os.close(fd)
        os.unlink(name)
    return frozenset(ok)


#: Where the lower files live (relative paths): some in subdirectories, so a copy-up makes parents too.
LOWER_NAMES = ("f0", "d/f1", "f2", "d/e/f3", "f4", "d/f5")


def make_lowers(lowers: list[Path], seed: int, nfiles: int = 4, max_size: int = 256 * KiB) -> dict[str, bytes]:
    """Fill *lowers* with *nfiles* files of random sizes and contents; return ``{name: content}``.

    Files are spread over the layers (a merged directory ``d`` when there are
    several).  Sizes: sometimes 0, sometimes under a page, else anything up to
    *max_size*; some files are sparse (holes really left in the layer), to
    exercise a copy-up that keeps holes.  Deterministic for *seed*.
    """
    rng = random.Random(f"fsx-lowers-{seed}")
    out: dict[str, bytes] = {}
    for i, name in enumerate(LOWER_NAMES[:nfiles]):
        kind = rng.random()
        size = 0 if kind < 0.1 else rng.randrange(1, PAGE) if kind < 0.25 else rng.randrange(max_size + 1)
        data = bytearray(size)
        path = lowers[i % len(lowers)] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if size and rng.random() < 0.4:  # sparse: a few extents in a hole-filled file
                os.ftruncate(fd, size)
                for _ in range(rng.randint(1, 5)):
                    off = rng.randrange(size)
                    chunk = rng.randbytes(min(size - off, rng.randint(1, 32 * KiB)))
                    os.pwrite(fd, chunk, off)
                    data[off : off + len(chunk)] = chunk
            else:
                data[:] = rng.randbytes(size)
                os.write(fd, data)
        finally:
            os.close(fd)
        out[name] = bytes(data)
    return out


def populate(m: mmap.mmap, advice: int) -> None:
    """Fault a whole mapping in (read or write faults) before touching it.

    Why: a page the file system fails to provide is a SIGBUS on access, which
    would kill the test process and leave its mount behind.  The faults are
    the same (filemap_fault, page_mkwrite), only taken inside madvise, which
    reports the failure as EFAULT: the exerciser turns it into a report.
    """
    try:
        m.madvise(advice)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return  # a kernel before 5.14: fault on access
        raise OSError(exc.errno, f"faulting the mapping in failed (an access would have been SIGBUS): {exc}") from exc


class FsxFailure(AssertionError):
    """The file system disagreed with the model (the message is the full report)."""


def first_difference(expected: bytes | bytearray, actual: bytes | bytearray) -> int | None:
    """The first offset where two byte strings differ (a length difference counts), or None."""
    if expected == actual:
        return None
    n = min(len(expected), len(actual))
    lo, hi = 0, n  # binary search over chunk equality: fast on big, mostly equal buffers
    mv_e, mv_a = memoryview(expected), memoryview(actual)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if mv_e[lo:mid] == mv_a[lo:mid]:
            lo = mid
        else:
            hi = mid
    for i in range(lo, hi):
        if expected[i] != actual[i]:
            return i
    return n


def check_layer(root: Path, expected: dict[str, bytes], what: str = "upper",
                unchanged: dict[str, bytes] | None = None) -> None:
    """Every file of *expected* in *root* holds exactly those bytes (FsxFailure otherwise).

    A file of *unchanged* (the initial lower contents) may be missing from
    *root* if the model still holds its initial bytes: it was never copied up.
    """
    problems = []
    for name, want in sorted(expected.items()):
        if unchanged is not None and unchanged.get(name) == want and not os.path.lexists(root / name):
            continue
        try:
            got = (root / name).read_bytes()
        except OSError as exc:
            problems.append(f"  {name}: {exc}")
            continue
        at = first_difference(want, got)
        if at is not None:
            problems.append(f"  {name}: size {len(got)} (model {len(want)}), first differing offset {at:#x}\n"
                            + _window(want, got, at))
    if problems:
        raise FsxFailure(f"the {what} at {root} differs from the model:\n" + "\n".join(problems))


def _hex(b: bytes | bytearray) -> str:
    return b.hex(" ") if b else "(nothing)"


def _window(expected: bytes | bytearray, actual: bytes | bytearray, at: int, base: int = 0) -> str:
    lo = max(0, at - 8)
    return (f"    model  @{base + lo:#x}: {_hex(expected[lo : at + 24])}\n"
            f"    actual @{base + lo:#x}: {_hex(actual[lo : at + 24])}")


@dataclass
class _File:
    name: str
    path: Path
    model: bytearray
    lower: bool
    rw: int | None = None
    ro: int | None = None
    early: int | None = None  # read-only, opened before the first write, kept open
    written: bool = False  # opened for writing or changed by path at least once
    stale: set[int] = field(default_factory=set)  # read-only fds opened before that (on a lower file)

    def fds(self) -> list[tuple[str, int]]:
        return [(k, fd) for k, fd in (("rw", self.rw), ("ro", self.ro), ("early-ro", self.early)) if fd is not None]


@dataclass
class _Event:
    num: int
    text: str
    name: str = ""
    lo: int = 0
    hi: int = 0  # byte range the op touched in *name* (for the report's * marks)


@dataclass
class Stats:
    ops: dict[str, int] = field(default_factory=collections.Counter)
    checks: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    stale_reads: int = 0  # reads through a descriptor opened before its file's copy-up


#: Operation weights (relative): reads and writes dominate, as in fsx.
WEIGHTS: dict[str, int] = {
    "read": 18,
    "write": 16,
    "mapread": 8,
    "mapwrite": 8,
    "truncate": 6,
    "punch_hole": 5,
    "zero_range": 5,
    "keep_size": 3,
    "extend": 3,
    "append": 2,
    "fsync": 2,
    "reopen": 4,
    "otrunc": 1,
    "drop_cache": 3,
}


class Fsx:
    """The exerciser over the files of *initial* (already there) and *new_files* (created by it) below *root*.

    ``run(ops)`` performs that many random operations and a final full check
    through *root*, then closes every descriptor; ``model`` is what each file
    must hold afterwards (compare an upper with :func:`check_layer`).
    *early_mmap* False maps through a fresh descriptor where one opened
    before the copy-up was drawn: the kernel's overlayfs maps the file an fd
    was opened on, the lower one for such a descriptor (a documented
    non-standard behaviour; pages past the lower file's end would SIGBUS).
    The op sequence stays the same.
    *after_op(fsx, num)*, if given, is called after each operation: tests use
    it to break things behind the exerciser's back.
    """

    def __init__(
        self,
        root: Path,
        initial: dict[str, bytes],
        seed: int,
        *,
        new_files: Iterable[str] = ("new0",),
        max_size: int = 512 * KiB,
        fallocate_modes: Iterable[int] = ALL_FALLOCATE_MODES,
        early_readers: float = 0.75,
        early_mmap: bool = True,
        check_every: int = 32,
        check_all_every: int = 1000,
        history: int = 30,
        label: str = "",
        after_op: Callable[[Fsx, int], None] | None = None,
    ) -> None:
        self.root = root
        self.seed = seed
        self.rng = random.Random(seed)
        self.max_size = max_size
        self.modes = frozenset(fallocate_modes)
        self.early_readers = early_readers
        self.early_mmap = early_mmap
        self.check_every = check_every
        self.check_all_every = check_all_every
        self.history: collections.deque[_Event] = collections.deque(maxlen=history)
        self.label = label
        self.after_op = after_op
        self.stats = Stats()
        self.num = 0
        self.files = [_File(n, root / n, bytearray(d), lower=True) for n, d in initial.items()]
        self.new_names = list(new_files)
        names = list(WEIGHTS)
        if not self.modes & {PUNCH_HOLE | KEEP_SIZE}:
            names.remove("punch_hole")
        if not self.modes & {ZERO_RANGE, ZERO_RANGE | KEEP_SIZE}:
            names.remove("zero_range")
        if KEEP_SIZE not in self.modes:
            names.remove("keep_size")
        if 0 not in self.modes:
            names.remove("extend")
        self._op_names = names
        self._cum: list[float] = []
        total = 0.0
        for n in names:
            total += WEIGHTS[n]
            self._cum.append(total)

    @property
    def model(self) -> dict[str, bytes]:
        return {f.name: bytes(f.model) for f in self.files}

    # -- the run ------------------------------------------------------------------

    def run(self, ops: int) -> Stats:
        step = "setup"
        try:
            self._setup()
            for self.num in range(1, ops + 1):
                op = self._op_names[bisect.bisect(self._cum, self.rng.random() * self._cum[-1])]
                f = self.rng.choice(self.files)
                step = f"{op} on {f.name}"
                getattr(self, "_op_" + op)(f)
                self.stats.ops[op] += 1
                if self.after_op is not None:
                    self.after_op(self, self.num)
                step = "whole-file check"
                if self.num % self.check_all_every == 0:
                    for g in self.files:
                        self._check_file(g)
                elif self.num % self.check_every == 0:
                    self._check_file(self.rng.choice(self.files))
            self.num = ops + 1
            step = "final check"
            self._log("final check of every file")
            for f in self.files:
                self._check_file(f)
        except OSError as exc:
            self._fail(f"{step} failed: {exc!r}")
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        for f in self.files:
            for attr in ("rw", "ro", "early"):
                fd = getattr(f, attr)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    setattr(f, attr, None)

    def _setup(self) -> None:
        lower = [f for f in self.files if f.lower]
        chosen = [f for f in lower if self.rng.random() < self.early_readers]
        if self.early_readers and lower and not chosen:
            chosen = [self.rng.choice(lower)]  # at least one
        for f in chosen:
            f.early = self._open_ro(f)
            self._log(f"open early-ro fd {f.early} before any write", f.name)
        for name in self.new_names:
            path = self.root / name
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            f = _File(name, path, bytearray(), lower=False, rw=fd, written=True)
            self.files.append(f)
            self._log(f"create, rw fd {fd}", name)
        for f in self.files:
            self._check_file(f)

    # -- helpers ------------------------------------------------------------------

    def _log(self, text: str, name: str = "", lo: int = 0, hi: int = 0) -> None:
        self.history.append(_Event(self.num, text, name, lo, hi))

    def _fail(self, what: str, name: str = "", at: int | None = None, detail: str = "") -> NoReturn:
        lines = [f"fsx{' on ' + self.label if self.label else ''}: {what}",
                 f"  seed {self.seed}, operation #{self.num}, root {self.root}"]
        if at is not None:
            lines.append(f"  file {name}: first differing offset {at:#x} ({at})")
        if detail:
            lines.append(detail)
        lines.append(f"last {len(self.history)} steps (* = touched {name or 'the file'}"
                     + (f" at {at:#x}" if at is not None else "") + "):")
        for ev in self.history:
            hit = ev.name == name and (at is None or ev.lo <= at < ev.hi)
            lines.append(f"  {'*' if hit and name else ' '} #{ev.num:<7} {ev.name:<8} {ev.text}")
        lines.append(f"replay: Fsx(..., seed={self.seed}).run({max(self.num, 1)}) on the same initial files")
        raise FsxFailure("\n".join(lines))

    def _rw(self, f: _File) -> int:
        if f.rw is None:
            f.rw = os.open(f.path, os.O_RDWR)
            f.written = True
            self._log(f"open rw fd {f.rw}", f.name)
        return f.rw

    def _open_ro(self, f: _File) -> int:
        fd = os.open(f.path, os.O_RDONLY)
        if f.lower and not f.written:
            f.stale.add(fd)
        return fd

    def _reader(self, f: _File) -> tuple[str, int]:
        fds = f.fds()
        if fds and self.rng.random() < 0.95:
            return self.rng.choice(fds)
        if self.rng.random() < 0.5 and f.ro is None:
            f.ro = self._open_ro(f)
            self._log(f"open ro fd {f.ro}", f.name)
            return "ro", f.ro
        return "rw", self._rw(f)

    def _offset(self, size: int, limit: int) -> int:
        r = self.rng.random()
        if r < 0.15 and size:
            off = size - self.rng.randrange(0, 2 * PAGE)  # around EOF
        elif r < 0.35:
            off = self.rng.randrange(0, limit // PAGE + 1) * PAGE  # page aligned
        else:
            off = self.rng.randrange(0, limit + 1)
        return min(max(off, 0), limit)

    def _length(self) -> int:
        r = self.rng.random()
        if r < 0.35:
            return self.rng.randint(1, 512)
        if r < 0.55:
            return self.rng.randint(1, 8) * PAGE
        if r < 0.85:
            return self.rng.randint(1, 16 * KiB)
        return self.rng.randint(1, 64 * KiB)

    def _write_range(self, f: _File) -> tuple[int, int]:
        off = self._offset(len(f.model), self.max_size - 1)
        return off, min(self._length(), self.max_size - off)

    def _compare(self, f: _File, off: int, got: bytes, how: str, want_len: int | None = None) -> None:
        want = f.model[off : off + (len(got) if want_len is None else want_len)]
        if got != want:
            at = first_difference(want, got)
            assert at is not None
            self._fail(f"{how}: data mismatch", f.name, off + at,
                       f"  read {len(got)} bytes at {off:#x}, the model has {len(want)} there "
                       f"(model size {len(f.model):#x})\n" + _window(want, got, at, off))

    def _check_size(self, f: _File, fd: int | None = None, by_path: bool = False) -> None:
        if fd is None:
            fd = next((d for _, d in f.fds()), None)
        sizes = []
        if fd is not None:
            sizes.append(("fstat", os.fstat(fd).st_size))
        if by_path or fd is None:
            sizes.append(("stat", os.stat(f.path).st_size))
        for how, size in sizes:
            if size != len(f.model):
                self._fail(f"{how} st_size is {size:#x} ({size}), the model's size is {len(f.model):#x} "
                           f"({len(f.model)})", f.name, min(size, len(f.model)))

    def _check_file(self, f: _File) -> None:
        """Whole content through one of its fds (or a fresh one), st_size by fstat and stat."""
        self.stats.checks += 1
        kind, fd = self._reader(f)
        self._check_size(f, fd, by_path=True)
        if self.rng.random() < 0.5:  # read what the file system has, not the page cache
            kind += " (page cache dropped)"
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self._count_stale(f, fd)
        got = os.pread(fd, len(f.model) + PAGE, 0)
        if got != f.model:
            at = first_difference(f.model, got)
            assert at is not None
            self._fail(f"whole-file check through {kind} fd {fd}: content differs", f.name, at,
                       f"  read {len(got):#x} bytes, model size {len(f.model):#x}\n"
                       + _window(f.model, got, at))

    def _count_stale(self, f: _File, fd: int) -> None:
        if f.written and fd in f.stale:
            self.stats.stale_reads += 1

    def _zero(self, f: _File, lo: int, hi: int) -> None:
        hi = min(hi, len(f.model))
        if lo < hi:
            f.model[lo:hi] = bytes(hi - lo)

    def _resize(self, f: _File, size: int) -> None:
        if size < len(f.model):
            del f.model[size:]
        else:
            f.model.extend(bytes(size - len(f.model)))

    # -- operations ---------------------------------------------------------------

    def _op_read(self, f: _File) -> None:
        kind, fd = self._reader(f)
        size = len(f.model)
        off = self._offset(size, size + PAGE)
        n = self._length()
        self._log(f"pread {kind} fd {fd} off {off:#x} len {n:#x} (size {size:#x})", f.name, off, off + n)
        got = os.pread(fd, n, off)
        self._count_stale(f, fd)
        self.stats.bytes_read += len(got)
        self._compare(f, off, got, "pread", want_len=n)

    def _op_write(self, f: _File) -> None:
        fd = self._rw(f)
        off, n = self._write_range(f)
        data = self.rng.randbytes(n)
        self._log(f"pwrite fd {fd} off {off:#x} len {n:#x} (size {len(f.model):#x}"
                  + (", past EOF)" if off > len(f.model) else ")"), f.name, min(off, len(f.model)), off + n)
        done = os.pwrite(fd, data, off)
        if done != n:
            self._fail(f"pwrite wrote {done} of {n} bytes", f.name)
        if off > len(f.model):
            self._resize(f, off)
        f.model[off : off + n] = data
        self.stats.bytes_written += n
        self._check_size(f, fd)

    def _op_append(self, f: _File) -> None:
        n = min(self._length(), self.max_size - len(f.model))
        if n <= 0:
            return
        data = self.rng.randbytes(n)
        size = len(f.model)
        fd = os.open(f.path, os.O_WRONLY | os.O_APPEND)
        f.written = True
        try:
            self._log(f"append {n:#x} bytes through a new O_APPEND fd {fd} (size {size:#x})", f.name, size, size + n)
            done = os.write(fd, data)
            if done != n:
                self._fail(f"O_APPEND write wrote {done} of {n} bytes", f.name)
            f.model += data
            self._check_size(f, fd)
        finally:
            os.close(fd)

    def _op_truncate(self, f: _File) -> None:
        size = len(f.model)
        r = self.rng.random()
        if r < 0.35:
            new = self.rng.randint(0, size)
        elif r < 0.7:
            new = min(self.max_size, size + self.rng.randint(0, 64 * KiB))
        else:
            new = self.rng.randint(0, self.max_size)
        lo, hi = min(new, size), max(new, size) + 1
        if self.rng.random() < 0.4:
            self._log(f"truncate(path) {size:#x} -> {new:#x}", f.name, lo, hi)
            os.truncate(f.path, new)
            f.written = True
            self._resize(f, new)
            self._check_size(f, by_path=True)
        else:
            fd = self._rw(f)
            self._log(f"ftruncate fd {fd} {size:#x} -> {new:#x}", f.name, lo, hi)
            os.ftruncate(fd, new)
            self._resize(f, new)
            self._check_size(f, fd)

    def _map_range(self, size: int) -> tuple[int, int]:
        off = self._offset(size, size - 1)
        return off, min(self._length(), size - off)

    def _op_mapread(self, f: _File) -> None:
        size = len(f.model)
        if size == 0:
            return
        kind, fd = self._reader(f)
        self._check_size(f, fd)  # mapping past the real EOF would be SIGBUS, not a report
        off, n = self._map_range(size)
        start = off - off % PAGE
        own = fd in f.stale and f.written and not self.early_mmap
        if own:  # the kernel's overlayfs would map the lower file: map through a fresh fd instead
            fd = os.open(f.path, os.O_RDONLY)
            kind = f"fresh ro (for {kind})"
        self._log(f"mmap read {kind} fd {fd} off {off:#x} len {n:#x} (map {start:#x}+{off + n - start:#x})",
                  f.name, off, off + n)
        try:
            with mmap.mmap(fd, off + n - start, mmap.MAP_SHARED, mmap.PROT_READ, offset=start) as m:
                populate(m, MADV_POPULATE_READ)
                got = m[off - start : off - start + n]
        finally:
            if own:
                os.close(fd)
        self._count_stale(f, fd)
        self.stats.bytes_read += n
        self._compare(f, off, got, "mmap read")

    def _op_mapwrite(self, f: _File) -> None:
        fd = self._rw(f)
        off, n = self._write_range(f)
        size = len(f.model)
        if off + n > size:  # a mapping cannot grow a file: extend first, as fsx does
            self._log(f"ftruncate fd {fd} {size:#x} -> {off + n:#x} (for mmap write)", f.name, size, off + n)
            os.ftruncate(fd, off + n)
            self._resize(f, off + n)
        self._check_size(f, fd)
        data = self.rng.randbytes(n)
        start = off - off % PAGE
        sync = self.rng.random() < 0.3
        self._log(f"mmap write fd {fd} off {off:#x} len {n:#x} (map {start:#x}+{off + n - start:#x})"
                  + (", msync" if sync else "") + ", munmap", f.name, off, off + n)
        with mmap.mmap(fd, off + n - start, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=start) as m:
            populate(m, MADV_POPULATE_WRITE)
            m[off - start : off - start + n] = data
            if sync:
                m.flush()
        f.model[off : off + n] = data
        self.stats.bytes_written += n

    def _falloc_range(self, f: _File) -> tuple[int, int]:
        size = len(f.model)
        off = self._offset(size, min(size + 16 * KiB, self.max_size - 1))
        return off, min(self._length(), self.max_size - off)

    def _op_punch_hole(self, f: _File) -> None:
        fd = self._rw(f)
        off, n = self._falloc_range(f)
        self._log(f"punch hole fd {fd} off {off:#x} len {n:#x} (size {len(f.model):#x})", f.name, off, off + n)
        fallocate(fd, PUNCH_HOLE | KEEP_SIZE, off, n)
        self._zero(f, off, off + n)
        self._check_size(f, fd)

    def _op_zero_range(self, f: _File) -> None:
        fd = self._rw(f)
        modes = sorted(self.modes & {ZERO_RANGE, ZERO_RANGE | KEEP_SIZE})
        mode = self.rng.choice(modes)
        off, n = self._falloc_range(f)
        keep = bool(mode & KEEP_SIZE)
        self._log(f"zero range{' keep-size' if keep else ''} fd {fd} off {off:#x} len {n:#x} "
                  f"(size {len(f.model):#x})", f.name, off, off + n)
        fallocate(fd, mode, off, n)
        self._zero(f, off, off + n)
        if not keep and off + n > len(f.model):
            self._resize(f, off + n)
        self._check_size(f, fd)

    def _op_keep_size(self, f: _File) -> None:
        fd = self._rw(f)
        off, n = self._falloc_range(f)
        self._log(f"fallocate keep-size fd {fd} off {off:#x} len {n:#x} (size {len(f.model):#x})",
                  f.name, off, off + n)
        fallocate(fd, KEEP_SIZE, off, n)
        self._check_size(f, fd)

    def _op_extend(self, f: _File) -> None:
        fd = self._rw(f)
        off, n = self._falloc_range(f)
        self._log(f"fallocate fd {fd} off {off:#x} len {n:#x} (size {len(f.model):#x})", f.name, off, off + n)
        fallocate(fd, 0, off, n)
        if off + n > len(f.model):
            self._resize(f, off + n)
        self._check_size(f, fd)

    def _op_fsync(self, f: _File) -> None:
        kind, fd = self._reader(f)
        data_only = self.rng.random() < 0.5
        self._log(f"{'fdatasync' if data_only else 'fsync'} {kind} fd {fd}", f.name)
        (os.fdatasync if data_only else os.fsync)(fd)

    def _op_drop_cache(self, f: _File) -> None:
        kind, fd = self._reader(f)
        self._log(f"fadvise DONTNEED {kind} fd {fd} (next reads reach the file system)", f.name)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _op_reopen(self, f: _File) -> None:
        fds = f.fds()
        if fds:
            kind, fd = self.rng.choice(fds)
            if kind == "early-ro" and self.rng.random() < 0.9:
                return  # early readers are what this test is about: keep them most of the time
            self._log(f"close {kind} fd {fd}", f.name)
            os.close(fd)
            f.stale.discard(fd)
            setattr(f, {"rw": "rw", "ro": "ro", "early-ro": "early"}[kind], None)
        if self.rng.random() < 0.6:
            if self.rng.random() < 0.5:
                self._rw(f)
            elif f.ro is None:
                f.ro = self._open_ro(f)
                self._log(f"open ro fd {f.ro}", f.name)
        if f.fds():
            self._check_size(f)

    def _op_otrunc(self, f: _File) -> None:
        if self.rng.random() < 0.7:
            return  # rare: it throws away a whole file
        if f.rw is not None:
            self._log(f"close rw fd {f.rw}", f.name)
            os.close(f.rw)
            f.rw = None
        f.rw = os.open(f.path, os.O_RDWR | os.O_TRUNC)
        f.written = True
        self._log(f"open rw fd {f.rw} with O_TRUNC (size {len(f.model):#x} -> 0)", f.name, 0, len(f.model) + 1)
        self._resize(f, 0)
        self._check_size(f, f.rw, by_path=True)
