"""Sizes of the dataset and of the workloads: the full run, and the tiny --quick smoke run.

One frozen object carries every size so the dataset builder and the workloads cannot disagree,
and so the report can print exactly what was measured.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Profile:
    """Every size the bench uses; ``name`` also names the cached dataset's folder."""

    name: str
    min_lower_files: int  # entries in the lower (files, dirs, links): /usr/share fills up to this
    stdlib_full: bool  # copy the whole standard library, or only its top level and a few packages
    repo_max_files: int  # files committed in the git repository of the lower
    big_file: int  # bytes of the big lower file (sequential and random reads, copy-up)
    write_size: int  # bytes of the sequential writes
    small_files: int  # files created, written and deleted
    small_file_size: int
    rewrite_files: int  # lower files rewritten through rename by the container-like sequence
    pkg_files: int  # entries (files, symlinks) pkg-manager unpacks, a fifth of them over lower files
    pkg_verify_files: int  # lower files pkg-manager checksums, as dpkg --verify
    pkg_compile: tuple[str, ...]  # stdlib packages (folders of the lower's copy) pkg-manager byte-compiles
    max_modules: int  # modules imported from the lower
    randread_bytes: int  # bytes read by fio in 4 KiB random reads
    rounds: int


FULL = Profile(
    name="full",
    min_lower_files=25_000,
    stdlib_full=True,
    repo_max_files=4_000,
    big_file=GiB,
    write_size=GiB,
    small_files=10_000,
    small_file_size=1024,
    rewrite_files=2_000,
    pkg_files=2_000,
    pkg_verify_files=3_000,
    pkg_compile=("email", "json", "http", "urllib", "logging", "xml", "asyncio"),
    max_modules=400,
    randread_bytes=64 * MiB,
    rounds=3,
)

QUICK = Profile(
    name="quick",
    min_lower_files=600,
    stdlib_full=False,
    repo_max_files=150,
    big_file=8 * MiB,
    write_size=8 * MiB,
    small_files=300,
    small_file_size=1024,
    rewrite_files=100,
    pkg_files=120,
    pkg_verify_files=150,
    pkg_compile=("json", "html"),
    max_modules=60,
    randread_bytes=1 * MiB,
    rounds=1,
)
