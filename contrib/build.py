#!/usr/bin/env python3
"""Build an image from a Dockerfile-like build file with pyunionfs (an example).

    sudo python3 contrib/build.py contrib/Buildfile.example [--store DIR] [--no-cache]

The build file knows three instructions (and `# comments`, and `\\` to continue a line):

    FROM <directory>      the base tree: the bottom layer, only ever read
    RUN <shell command>   run with /bin/sh -c in a chroot of the image so far
    COPY <src> <dst>      copy a file or a directory's contents from the build folder

FROM and COPY sources are relative to the build file's folder. Each step is built the way
`docker build` does it: mount the layers so far under a fresh empty upper, make the change
through the mount, unmount, `pyunionfs commit` the upper to a layer tar and `pyunionfs apply`
it to a directory that is the next step's top lower layer. A step's cache key is the sha256 of
its parent's key, the instruction and, for COPY, the copied files: an unchanged step reuses
the stored layer without mounting anything. The FROM key is the base's path, not its
contents: after changing the base, build with --no-cache.

Store layout: STORE/layers/<key>/{layer.tar, diff/, meta.json}. A layer is built in STORE/tmp/
and renamed into place when complete, so a killed build never leaves a half layer behind.
Needs root (chroot, whiteout devices). RUN gets no /proc, /dev or network: a tiny example.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the package next to this interpreter, else the command on the PATH
PYUNIONFS = [sys.executable, "-m", "pyunionfs"] if importlib.util.find_spec("pyunionfs") else ["pyunionfs"]
RUN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}


class BuildError(Exception):
    pass


def parse(buildfile: Path) -> list[tuple[str, str]]:
    """[(INSTRUCTION, argument)] with FROM first; comments and blank lines dropped."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for number, line in enumerate(buildfile.read_text().splitlines(), 1):
        if not pending and line.strip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].strip() + " "
            continue
        line, pending = (pending + line.strip()).strip(), ""
        if not line:
            continue
        op, _, arg = line.replace("\t", " ").partition(" ")
        op, arg = op.upper(), arg.strip()
        if op not in ("FROM", "RUN", "COPY") or not arg:
            raise BuildError(f"{buildfile}:{number}: expected FROM, RUN or COPY with an argument: {line}")
        if not steps and op != "FROM":
            raise BuildError(f"{buildfile}:{number}: the first instruction must be FROM")
        if steps and op == "FROM":
            raise BuildError(f"{buildfile}:{number}: only one FROM (multi-stage builds are not supported)")
        if op == "COPY" and len(arg.split()) != 2:
            raise BuildError(f"{buildfile}:{number}: COPY takes a source and a destination: {line}")
        steps.append((op, arg))
    if not steps:
        raise BuildError(f"{buildfile}: no FROM instruction")
    return steps


def hash_tree(src: Path) -> str:
    """Digest of what COPY would copy: relative names, types, modes and contents."""
    h = hashlib.sha256()
    paths = [src] if not src.is_dir() or src.is_symlink() else sorted(src.rglob("*"))
    for p in paths:
        st = p.lstat()
        h.update(f"{p.relative_to(src)}\0{st.st_mode:o}\0".encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def cache_key(parent: str, instruction: str, content: str = "") -> str:
    return hashlib.sha256(f"{parent}\n{instruction}\n{content}".encode()).hexdigest()


def pyunionfs(*args: str) -> str:
    """Run a pyunionfs command; its one-line error becomes ours."""
    try:
        res = subprocess.run(PYUNIONFS + list(args), capture_output=True, text=True, timeout=300,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"pyunionfs {args[0]} timed out") from exc
    if res.returncode != 0:
        raise BuildError(f"pyunionfs {args[0]} failed: {res.stderr.strip() or res.returncode}")
    sys.stderr.write(res.stderr)  # warnings, such as a socket left out of a layer
    return res.stdout


def escape(path: Path) -> str:
    """A path as one entry of a `pyunionfs mount` lower list."""
    return str(path).replace("\\", "\\\\").replace(":", "\\:")


def mounted_below(path: Path) -> bool:
    """Is anything mounted at or below *path*? (mountinfo writes a space as \\040)"""
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]) for line in f]
    return any(p == prefix or p.startswith(prefix + "/") for p in points)


def remove_tmp(path: Path) -> None:
    """rm -r a work folder, never through a live mount below it."""
    if mounted_below(path):
        print(f"build.py: warning: {path} still has a mount below it; not removed", file=sys.stderr)
    else:
        shutil.rmtree(path, ignore_errors=True)


def copy_into(mnt: Path, src: Path, dst: str) -> None:
    """COPY src dst, through the mount; a symlink in the image is never followed."""
    parts = Path(dst).relative_to("/").parts if dst.startswith("/") else Path(dst).parts
    if ".." in parts:
        raise BuildError(f"COPY: no .. in the destination, please: {dst}")
    for i in range(1, len(parts) + 1):
        if mnt.joinpath(*parts[:i]).is_symlink():
            raise BuildError(f"COPY: /{'/'.join(parts[:i])} is a symlink in the image; not followed")
    target = mnt.joinpath(*parts)
    if src.is_dir():
        shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
    else:
        if dst.endswith("/") or target.is_dir():
            target = target / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)


def build_layer(store: Path, key: str, parent: str, lowers: list[Path], op: str, arg: str,
                context: Path) -> None:
    """Make STORE/layers/KEY: mount, change, unmount, commit, apply, rename into place."""
    tmp = Path(tempfile.mkdtemp(prefix="step-", dir=store / "tmp"))
    upper, mnt, layer = tmp / "upper", tmp / "mnt", tmp / "layer"
    for d in (upper, mnt, layer):
        d.mkdir()
    busy = False
    try:
        pyunionfs("mount", ":".join(escape(p) for p in lowers), str(upper), str(mnt))
        try:
            if op == "RUN":
                print(f" ---> Running in {mnt}", flush=True)
                rc = subprocess.run(["chroot", str(mnt), "/bin/sh", "-c", arg], env=RUN_ENV,
                                    stdin=subprocess.DEVNULL).returncode
                if rc != 0:
                    raise BuildError(f"'{op} {arg}' returned a non-zero code: {rc}")
            else:
                src, dst = arg.split()
                copy_into(mnt, (context / src).resolve(), dst)
        finally:
            try:
                pyunionfs("umount", str(mnt))
            except BuildError as exc:  # a process the command left running keeps the mount busy
                busy = True
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # detach it at least
                raise BuildError(f"{exc} (left {tmp} for a later build to remove)") from exc
        out = pyunionfs("commit", str(upper), "-o", str(layer / "layer.tar"))
        pyunionfs("apply", str(layer / "layer.tar"), str(layer / "diff"))
        meta = {"key": key, "parent": parent, "diff_id": out.split()[0], "created_by": f"{op} {arg}",
                "size": (layer / "layer.tar").stat().st_size,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (layer / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if (store / "layers" / key).exists():  # rebuilt with --no-cache: the old one goes
            os.rename(store / "layers" / key, tmp / "old")
        os.rename(layer, store / "layers" / key)
    finally:
        if not busy:
            remove_tmp(tmp)


def human(size: float) -> str:
    """Decimal units, as docker prints sizes: 10.24kB."""
    units = ["B", "kB", "MB", "GB", "TB"]
    while size >= 1000 and len(units) > 1:
        size, units = size / 1000, units[1:]
    return f"{size:.4g}{units[0]}"


def build(buildfile: Path, store: Path, no_cache: bool) -> None:
    steps = parse(buildfile)
    context = buildfile.resolve().parent
    base = (context / steps[0][1]).resolve()
    if not base.is_dir():
        raise BuildError(f"FROM {steps[0][1]}: {base} is not a directory")
    (store / "layers").mkdir(parents=True, exist_ok=True)
    (store / "tmp").mkdir(exist_ok=True)
    lock = os.open(store / "lock", os.O_CREAT | os.O_WRONLY, 0o644)  # held until we exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BuildError(f"another build is using {store}") from None
    for stale in (store / "tmp").iterdir():  # left by a killed build: never reused
        remove_tmp(stale)
    key, lowers = cache_key("", f"FROM {base}"), [base]
    history: list[tuple[dict, bool]] = []  # (meta.json, from the cache), newest first
    print(f"Step 1/{len(steps)} : FROM {base}")
    for n, (op, arg) in enumerate(steps[1:], 2):
        print(f"Step {n}/{len(steps)} : {op} {arg}", flush=True)
        content = ""
        if op == "COPY":
            src = (context / arg.split()[0]).resolve()
            if not src.is_relative_to(context) or not src.exists():
                raise BuildError(f"COPY {arg}: {src} is not a file or directory in {context}")
            content = hash_tree(src)
        parent, key = key, cache_key(key, f"{op} {arg}", content)
        cached = (store / "layers" / key / "meta.json").exists() and not no_cache
        if cached:
            print(" ---> Using cache")
        else:
            build_layer(store, key, parent, lowers, op, arg, context)
        meta = json.loads((store / "layers" / key / "meta.json").read_text())
        print(f" ---> {meta['diff_id'].split(':')[1][:12]}")
        lowers.insert(0, store / "layers" / key / "diff")
        history.insert(0, (meta, cached))
    print(f"Successfully built {key[:12]}\n")
    rows = [("DIFF ID", "CREATED", "CREATED BY", "SIZE", "CACHED")]
    for meta, cached in history:
        rows.append((meta["diff_id"].split(":")[1][:12], meta["created"], meta["created_by"],
                     human(meta["size"]), "yes" if cached else "no"))
    rows.append(("<base>", "", f"FROM {base}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print("\nLayers (topmost first):")
    for p in lowers:
        print(f"  {p}")
    print(f"\nTo look inside:\n  pyunionfs mount {':'.join(escape(p) for p in lowers)} \"\" MNT")


def main() -> int:
    ap = argparse.ArgumentParser(description="Build image layers from a Dockerfile-like file with pyunionfs.")
    ap.add_argument("buildfile", type=Path)
    ap.add_argument("--store", type=Path, default=Path(".pyunionfs-build"), help="layers and cache (%(default)s)")
    ap.add_argument("--no-cache", action="store_true", help="rebuild every step")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("build.py: must run as root (RUN uses chroot, and layers hold whiteout devices)", file=sys.stderr)
        return 1
    try:
        build(args.buildfile, args.store.resolve(), args.no_cache)
    except (BuildError, OSError) as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("build.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
