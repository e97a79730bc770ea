"""The lower layer every system is measured on, built once and cached.

Building it (copying a standard library and part of /usr/share, committing a git repository,
writing a 1 GiB file) takes minutes, far longer than a quick run, so it lives under the work
directory with a stamp and is reused while the stamp matches the recipe and the interpreter
(the lower holds .pyc files, which only that interpreter's magic number accepts).

Layout of ``WORKDIR/PROFILE/``::

    lower/stdlib/   copy of this Python's standard library, .pyc compiled, lib-dynload included
    lower/repo/     git repository (a few thousand source files of the stdlib, committed)
    lower/big/file  the big file: random bytes, not sparse
    lower/share/    files of /usr/share, as many as it takes to reach the profile's entry count
    src.tar         tarball of the stdlib copy's sources, extracted by the tar workload
    files.txt       every entry of the lower, relative, one per line (the stat workload's list)
    modules.txt     modules that import from lower/stdlib (the import workload's list)
    meta.json       the stamp
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .osutil import BenchError, run, safe_rmtree
from .profile import MiB, Profile

RECIPE = 5  # bump when the layout or the content changes, so stale caches are rebuilt
FIXED_MTIME = 1_600_000_000  # repo files get an old mtime: git would otherwise re-hash "racily clean" files

# Packages left out of the stdlib copy: tests are the repo's content instead, GUIs and wheels add nothing.
STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "idlelib", "tkinter", "turtledemo"}
QUICK_PACKAGES = ["json", "email", "html", "http", "urllib", "logging", "concurrent", "lib-dynload"]
# Modules that do something on import (print, open a browser, need a display) or are not for this OS.
MODULE_SKIP = {
    "antigravity", "this", "turtle", "site", "sitecustomize", "usercustomize", "__hello__", "__phello__",
    "_bootsubprocess", "msilib", "ensurepip", "idlelib", "tkinter", "test", "pydoc_data", "lib2to3.tests",
}  # fmt: skip


@dataclass(frozen=True)
class Dataset:
    """A built lower and the files that describe it."""

    root: Path  # WORKDIR/PROFILE
    profile: Profile
    meta: dict[str, object]

    @property
    def lower(self) -> Path:
        return self.root / "lower"

    @property
    def tarball(self) -> Path:
        return self.root / "src.tar"

    @property
    def big_rel(self) -> str:
        return "big/file"

    def entries(self) -> list[bytes]:
        """Relative paths (bytes: some /usr/share names are not UTF-8) of every entry of the lower."""
        return (self.root / "files.txt").read_bytes().splitlines()

    def modules(self) -> list[str]:
        return (self.root / "modules.txt").read_text().split()


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stamp() -> dict[str, object]:
    return {"recipe": RECIPE, "python": sys.version.split()[0], "magic": importlib.util.MAGIC_NUMBER.hex()}


def ensure(workdir: Path, profile: Profile, log: bool = True) -> Dataset:
    """Return the cached dataset for *profile*, building it first if it is missing or stale."""
    root = workdir / profile.name
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / f".{profile.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two bench runs at once share one build
        meta_path = root / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if all(meta.get(k) == v for k, v in _stamp().items()):
                return Dataset(root, profile, meta)
        t0 = time.monotonic()
        if log:
            print(f"bench: building the {profile.name} dataset in {root} (once; reused later)", flush=True)
        safe_rmtree(root)
        root.mkdir(parents=True)
        meta = _build(root, profile)
        meta["build_seconds"] = round(time.monotonic() - t0, 1)
        meta_path.write_text(json.dumps(meta, indent=1))
        if log:
            print(f"bench: dataset built in {meta['build_seconds']} s: {meta['entries']} entries", flush=True)
        return Dataset(root, profile, meta)


def _build(root: Path, profile: Profile) -> dict[str, object]:
    lower = root / "lower"
    lower.mkdir()
    _copy_stdlib(lower / "stdlib", profile)
    _make_repo(lower / "repo", profile)
    _make_big(lower / "big" / "file", profile.big_file)
    run(["tar", "-cf", root / "src.tar", "--exclude=__pycache__", "-C", lower / "stdlib", "."])
    _fill_share(lower / "share", profile.min_lower_files - _count(lower))
    entries = sorted(_walk(lower))
    (root / "files.txt").write_bytes(b"".join(e + b"\n" for e in entries))
    modules = _importable_modules(lower / "stdlib", profile.max_modules)
    (root / "modules.txt").write_text("".join(m + "\n" for m in modules))
    os.sync()
    size = sum(os.lstat(os.path.join(os.fsencode(lower), e)).st_size for e in entries)
    return _stamp() | {
        "profile": profile.name,
        "entries": len(entries),
        "bytes": size,
        "modules": len(modules),
        "repo_files": int(run(["git", "-C", lower / "repo", "ls-files", "-z"]).stdout.count("\0")),
        "source_stdlib": str(stdlib_dir()),
    }


def _copy_stdlib(dest: Path, profile: Profile) -> None:
    src = stdlib_dir()

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = set(STDLIB_SKIP) & set(names)
        if not profile.stdlib_full and Path(folder) == src:
            skip |= {n for n in names if not n.endswith(".py") and n not in QUICK_PACKAGES}
        return skip

    shutil.copytree(src, dest, symlinks=True, ignore=ignore)
    # Compiled with this interpreter so imports read .pyc from the lower and never write one.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(dest)], capture_output=True, timeout=900)


def _make_repo(dest: Path, profile: Profile) -> None:
    """A git repository of real source files, committed inside the lower, with stable stat data."""
    src = stdlib_dir()
    copied = 0
    for folder, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "site-packages", "dist-packages"))
        for name in sorted(files):
            if copied >= profile.repo_max_files:
                break
            s = Path(folder) / name
            if s.is_symlink() or not s.is_file():
                continue
            d = dest / s.relative_to(src)
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s, d)
            copied += 1
    for folder, dirs, files in os.walk(dest):
        for name in files + dirs:
            os.utime(os.path.join(folder, name), (FIXED_MTIME, FIXED_MTIME))
    git = ["git", "-C", dest, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "-c", "commit.gpgsign=false"]
    run(git + ["init", "-q", "-b", "main"])
    run(git + ["add", "-A"])
    run(git + ["commit", "-q", "-m", "snapshot"])
    run(git + ["gc", "-q"])  # one pack instead of thousands of loose objects
    run(git + ["status", "--porcelain"])  # settles the index's stat data once, here, not in the mount


def _make_big(path: Path, size: int) -> None:
    """Random, non-sparse bytes: nothing below can shortcut zeroes or holes."""
    path.parent.mkdir(parents=True)
    rng = random.Random(20240101)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(rng.randbytes(n))
            left -= n
        os.fsync(f.fileno())


def _fill_share(dest: Path, wanted: int) -> None:
    """Copy files of /usr/share (in sorted walk order) until the lower holds enough entries."""
    src = Path("/usr/share")
    added = 0
    for folder, dirs, files in os.walk(src):
        dirs.sort()
        if added >= wanted:
            break
        for name in sorted(files):
            s = Path(folder) / name
            if b"\n" in os.fsencode(name) or not (s.is_symlink() or s.is_file()):
                continue
            d = dest / s.relative_to(src)
            if not d.parent.exists():
                missing = [p for p in [d.parent, *d.parent.parents] if not p.exists()]
                d.parent.mkdir(parents=True)
                added += len(missing)  # folders are entries too
            shutil.copy2(s, d, follow_symlinks=False)
            added += 1
    if added < wanted:
        print(f"bench: note: /usr/share had only {added} files to add, the lower is smaller than asked", flush=True)


def _walk(top: Path) -> Iterator[bytes]:
    base = os.fsencode(top)
    for folder, dirs, files in os.walk(base):
        rel = os.path.relpath(folder, base)
        for name in dirs + files:
            if b"\n" not in name:
                yield name if rel == b"." else os.path.join(rel, name)


def _count(top: Path) -> int:
    return sum(1 for _ in _walk(top))


_PROBE = r"""
import importlib, sys, warnings
warnings.simplefilter("ignore")
root = sys.argv[1]
sys.path[:0] = [root, root + "/lib-dynload"]
for name in sys.argv[2:]:
    try:
        mod = importlib.import_module(name)
    except BaseException:
        continue
    if (getattr(mod, "__file__", None) or "").startswith(root + "/"):
        print(name, flush=True)
"""


def _importable_modules(stdlib: Path, limit: int) -> list[str]:
    """Names that import cleanly from the copy (checked by importing them), evenly spread, at most *limit*."""
    names: list[str] = []
    for entry in sorted(stdlib.iterdir()):
        if entry.suffix == ".py":
            names.append(entry.stem)
        elif (entry / "__init__.py").exists():
            names.append(entry.name)
            for sub in sorted(entry.iterdir()):
                if sub.suffix == ".py" and sub.stem not in ("__init__", "__main__"):
                    names.append(f"{entry.name}.{sub.stem}")
                elif (sub / "__init__.py").exists():
                    names.append(f"{entry.name}.{sub.name}")
    names = [n for n in names if n not in MODULE_SKIP and n.split(".")[0] not in MODULE_SKIP and "win" not in n]
    res = subprocess.run(
        [sys.executable, "-S", "-B", "-E", "-c", _PROBE, str(stdlib), *names],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, cwd="/",
    )  # fmt: skip
    ok = res.stdout.split()
    if not ok:
        raise BenchError(f"no module imports from {stdlib}: {res.stderr.strip()[-500:]}")
    if len(ok) > limit:
        step = len(ok) / limit
        ok = [ok[int(i * step)] for i in range(limit)]
    return ok
