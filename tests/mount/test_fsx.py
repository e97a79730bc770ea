"""fsx-style data-integrity exercise of the mount (issue 6): random I/O checked against a model.

Each seed builds two lower layers with random files (tests/support/fsx.py:
``make_lowers``), mounts them under an empty upper, and runs the exerciser
through the mount: preads, pwrites past EOF, truncates both ways (by fd and by
path), MAP_SHARED reads and writes, fallocate punch hole / zero range /
keep-size / extension, O_TRUNC opens, O_APPEND writes, fsync, dropped page
cache, reopened descriptors, and read-only descriptors opened before the
first write that must see every later write.  After the unmount the upper must
hold exactly the model's bytes and the lowers must be untouched.

The same exerciser also runs on the kernel's overlayfs, each seed's first
operations (the model and the op sequence are right if the kernel
agrees; only mappings through descriptors opened before the copy-up are made
through a fresh descriptor there, as the kernel would map the lower file), and
with corruption injected, on a plain directory and in the upper under a live
mount: it must notice (a check that cannot fail proves nothing).

``PYUNIONFS_FSX_OPS`` sets the total number of operations through pyunionfs
(default 100000, split evenly over the seeds); ``PYUNIONFS_FSX_SEEDS`` the
seeds (comma-separated, default ``1,2,3,4``).  A failure report names the seed
and the operation number: ``PYUNIONFS_FSX_SEEDS=<seed> PYUNIONFS_FSX_OPS=<n>``
replays that run up to the failure (a run of n operations is a prefix of a
longer one).
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.fsx import (
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    PUNCH_HOLE,
    Fsx,
    FsxFailure,
    check_layer,
    make_lowers,
    populate,
    supported_fallocate_modes,
)
from tests.support.mounting import Daemon
from tests.support.writecheck import kernel_overlay, layer_state

Mount = Callable[..., Daemon]

TOTAL_OPS = int(os.environ.get("PYUNIONFS_FSX_OPS", "100000"))
SEEDS = [int(s) for s in os.environ.get("PYUNIONFS_FSX_SEEDS", "1,2,3,4").split(",") if s.strip()]
OPS_PER_SEED = -(-TOTAL_OPS // len(SEEDS))
#: Measured 0.27 to 0.45 ms per operation through the mount, 2 cores shared with other test runs: allow ~10x.
BUDGET = 60 + OPS_PER_SEED * 0.003
#: The kernel runs the first operations of each seed's sequence (a prefix of what pyunionfs runs).
KERNEL_OPS = min(OPS_PER_SEED, 10000)


def _layers(tmp_path: Path, seed: int) -> tuple[list[Path], Path, dict[str, bytes]]:
    lowers = [tmp_path / "lower0", tmp_path / "lower1"]
    for p in lowers:
        p.mkdir()
    upper = tmp_path / "upper"
    upper.mkdir()
    return lowers, upper, make_lowers(lowers, seed)


def _modes(tmp_path: Path) -> frozenset[int]:
    """The fallocate modes of the upper's filesystem (probed beside it, not in it)."""
    probe = tmp_path / "probe"
    probe.mkdir(exist_ok=True)
    return supported_fallocate_modes(probe)


@pytest.mark.timeout(BUDGET + 60)
@pytest.mark.parametrize("seed", SEEDS)
def test_fsx_through_pyunionfs(tmp_path: Path, mount: Mount, seed: int) -> None:
    lowers, upper, initial = _layers(tmp_path, seed)
    before = [layer_state(p) for p in lowers]
    d = mount(lowers, upper, deadline=BUDGET)
    fsx = Fsx(d.mnt, initial, seed, fallocate_modes=_modes(tmp_path), label="pyunionfs")
    started = time.monotonic()
    stats = fsx.run(OPS_PER_SEED)
    print(f"seed {seed}: {OPS_PER_SEED} ops in {time.monotonic() - started:.1f}s, {stats.checks} whole-file checks, "
          f"{stats.stale_reads} reads through fds opened before the copy-up, {dict(stats.ops)}")
    d.stop()
    check_layer(upper, fsx.model, unchanged=initial)
    assert [layer_state(p) for p in lowers] == before, "a lower layer was changed"
    if OPS_PER_SEED >= 1000:  # the run did what it is meant to do
        assert set(stats.ops) >= {"read", "write", "mapread", "mapwrite", "truncate", "punch_hole", "zero_range"}
        assert stats.stale_reads > 0, "no read went through a descriptor opened before the copy-up"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", SEEDS)
def test_fsx_itself_passes_on_the_kernel_overlay(tmp_path: Path, seed: int) -> None:
    """The exerciser's model and op sequence are right: the kernel's overlayfs agrees with them."""
    lowers, upper, initial = _layers(tmp_path, seed)
    before = [layer_state(p) for p in lowers]
    with kernel_overlay(lowers, upper, tmp_path / "work", tmp_path / "mnt") as mnt:
        fsx = Fsx(mnt, initial, seed, fallocate_modes=_modes(tmp_path), early_mmap=False, label="kernel overlayfs")
        stats = fsx.run(KERNEL_OPS)
    check_layer(upper, fsx.model, unchanged=initial)
    assert [layer_state(p) for p in lowers] == before
    assert stats.checks > KERNEL_OPS // 40


# -- the exerciser can fail ---------------------------------------------------------


def _plain(tmp_path: Path, seed: int = 7) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "plain"
    root.mkdir()
    return root, make_lowers([root], seed)


def test_fsx_passes_on_a_plain_directory(tmp_path: Path) -> None:
    root, initial = _plain(tmp_path)
    fsx = Fsx(root, initial, 7)
    fsx.run(3000)
    check_layer(root, fsx.model)


def test_fsx_notices_a_byte_changed_behind_its_back(tmp_path: Path) -> None:
    root, initial = _plain(tmp_path)
    flipped: set[tuple[str, int]] = set()

    def corrupt(fsx: Fsx, num: int) -> None:
        if num == 500:  # one byte in the middle of every file, written past the exerciser
            for f in fsx.files:
                if f.model:
                    at = len(f.model) // 2
                    _flip(f.path, at, f.model[at] ^ 0x5A)
                    flipped.add((f.name, at))

    with pytest.raises(FsxFailure) as info:
        Fsx(root, initial, 7, after_op=corrupt).run(3000)
    report = str(info.value)
    print(report)
    found = re.search(r"file (\S+): first differing offset (0x[0-9a-f]+)", report)
    assert found and (found[1], int(found[2], 16)) in flipped, report
    op = re.search(r"seed 7, operation #(\d+)", report)
    assert op and 500 < int(op[1]) <= 3000, report
    assert len(re.findall(r"^  [ *] #\d+", report, re.M)) == 30, "the report lists the last 30 steps"


def test_fsx_notices_a_size_changed_behind_its_back(tmp_path: Path) -> None:
    root, initial = _plain(tmp_path)

    def shrink(fsx: Fsx, num: int) -> None:
        if num == 300:  # every file one byte shorter, past the exerciser
            for f in fsx.files:
                if f.model:
                    os.truncate(f.path, len(f.model) - 1)

    with pytest.raises(FsxFailure, match=r"st_size is .*the model's size is"):
        Fsx(root, initial, 7, after_op=shrink).run(3000)


def test_fsx_notices_an_ignored_punch_hole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that answers 0 to a punch hole but leaves the data must fail the run."""
    import tests.support.fsx as fsx_module

    real = fsx_module.fallocate

    def lazy(fd: int, mode: int, offset: int, length: int) -> None:
        if not mode & PUNCH_HOLE:
            real(fd, mode, offset, length)

    monkeypatch.setattr(fsx_module, "fallocate", lazy)
    root, initial = _plain(tmp_path)
    with pytest.raises(FsxFailure, match="data mismatch|content differs"):
        Fsx(root, initial, 7).run(3000)


def test_a_page_the_file_system_cannot_provide_is_an_error_not_a_sigbus(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 8192) as m:
            os.ftruncate(fd, 100)  # the second page is past EOF now: touching it would be SIGBUS
            for advice in (MADV_POPULATE_READ, MADV_POPULATE_WRITE):
                with pytest.raises(OSError, match="would have been SIGBUS") as info:
                    populate(m, advice)
                assert info.value.errno == errno.EFAULT
    finally:
        os.close(fd)


@pytest.mark.timeout(120)
def test_fsx_notices_data_changed_in_the_upper_during_the_run(tmp_path: Path, mount: Mount) -> None:
    """What a daemon writing wrong data looks like: the exerciser must see it through the mount."""
    lowers, upper, initial = _layers(tmp_path, 11)
    d = mount(lowers, upper)
    flipped: set[tuple[str, int]] = set()

    def corrupt(fsx: Fsx, num: int) -> None:
        if num == 300:  # a byte of every copied-up file, written straight into the upper
            for f in fsx.files:
                if f.model and (upper / f.name).exists():
                    at = len(f.model) // 3
                    _flip(upper / f.name, at, f.model[at] ^ 0xFF)
                    flipped.add((f.name, at))

    with pytest.raises(FsxFailure) as info:
        Fsx(d.mnt, initial, 11, fallocate_modes=_modes(tmp_path), after_op=corrupt).run(3000)
    report = str(info.value)
    assert flipped
    found = re.search(r"file (\S+): first differing offset (0x[0-9a-f]+)", report)
    assert found and (found[1], int(found[2], 16)) in flipped, report
    op = re.search(r"seed 11, operation #(\d+)", report)
    assert op and 300 < int(op[1]) <= 3000, report


@pytest.mark.timeout(120)
def test_the_final_upper_check_notices_a_changed_byte(tmp_path: Path, mount: Mount) -> None:
    lowers, upper, initial = _layers(tmp_path, 11)
    d = mount(lowers, upper)
    fsx = Fsx(d.mnt, initial, 11, fallocate_modes=_modes(tmp_path))
    fsx.run(300)
    d.stop()
    model = fsx.model
    check_layer(upper, model)  # (every file was copied up)
    name = max(model, key=lambda n: len(model[n]))
    path = upper / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(data)
    with pytest.raises(FsxFailure, match=re.escape(name) + f": size .*first differing offset {len(data) - 1:#x}"):
        check_layer(upper, model)


def _flip(path: object, at: int, value: int) -> None:
    """Write one byte behind the exerciser's back (so a test can check it is caught)."""
    fd = os.open(path, os.O_RDWR)  # type: ignore[arg-type]
    try:
        os.pwrite(fd, bytes([value]), at)
    finally:
        os.close(fd)
