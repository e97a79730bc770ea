#!/usr/bin/env python3
"""Build an image from a Dockerfile-like build file into the pyunionfs image store (an example).

    sudo python3 contrib/build.py contrib/Buildfile.example [--tag NAME[:TAG]] [--store DIR] [--no-cache]

The build file knows three instructions (and `# comments`, and `\\` to continue a line):

    FROM <directory>        the base tree, committed to the store as the image's first layer
    FROM image:NAME[:TAG]   or an image the store already has (`pyunionfs pull`, another build)
    RUN <shell command>     run with /bin/sh -c in a chroot of the image so far
    COPY <src> <dst>        copy a file or a directory's contents from the build folder

FROM and COPY sources are relative to the build file's folder. Each step is built the way
`docker build` does it, with pyunionfs commands only: `pyunionfs mount image:PREVIOUS` under a
fresh empty upper, make the change through the mount, unmount, then `pyunionfs commit UPPER
--from PREVIOUS --tag STEP -m INSTRUCTION` (`pyunionfs history` shows the instruction).

Build cache: a step's key is the sha256 of its parent's key, the instruction and, for COPY, the
copied files; the step's image is tagged pyunionfs-build-cache:<key[:16]>, and a tag the store
already has is used as it is, without mounting anything (`pyunionfs images` lists the cache,
`pyunionfs rmi` removes it). The key of `FROM <directory>` is its path, not its contents: after
changing the base, build with --no-cache. The base is committed as an upper would be, so a 0/0
device or a `.wh.` name in it counts as a whiteout.

A RUN step runs in new mount, PID, UTS, IPC and network namespaces (`unshare`), as a container
would: /dev is a small tmpfs with null, zero, full, random, urandom and tty (device nodes, as
docker makes them: the image's own mount stays nodev), /dev/pts (a new devpts instance), /dev/shm
and the /dev/fd, stdin, stdout, stderr links; /proc is the step's own PID namespace's, /sys is
read-only. There is no network: only a loopback interface (brought up when `ip` is installed),
and no /etc/resolv.conf is provided. All of that is gone when the step ends (the namespaces
die with it, and with them every process the step left running). None of it reaches the layer:
the mounts hide whatever is below them, and a /dev, /proc or /sys directory the image lacks is
made only as a mount point for the step and removed before the commit (docker's init layer, not
its image layers, holds them), so the image keeps exactly the directories its base had.

A step that changes nothing (`RUN true`) adds no layer: `pyunionfs commit` records it as an
`empty_layer` history entry, as BuildKit does. Nothing has a fixed timeout: a big base takes as
long as it takes, and `pyunionfs commit` prints progress lines (relayed here as they come).

The store's writes are atomic, and a step's upper lives in the store's tmp/, where a later
`pyunionfs commit` or `pull` removes what a killed build left: never a half image. Needs root (chroot,
namespaces, whiteout devices).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# the package next to this interpreter, else the command on the PATH
PYUNIONFS = [sys.executable, "-m", "pyunionfs"] if importlib.util.find_spec("pyunionfs") else ["pyunionfs"]
RUN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
#: The mount points a RUN step gets, in the image's root.
SPECIAL_DIRS = ("dev", "proc", "sys")
#: PID 1 of a RUN step's namespaces (the host's /bin/sh): mounts /dev, /proc, /sys on ROOT (those of
#: POINTS), brings up loopback, then runs the step chrooted as its child (not as PID 1, which
#: ignores Ctrl-C), and exits with its status. Its arguments: ROOT, POINTS, COMMAND.
RUN_INIT = r"""
set -eu
root=$1 points=$2 cmd=$3
case " $points " in *" dev "*)
    mount -t tmpfs -o nosuid,strictatime,mode=755,size=65536k tmpfs "$root/dev"
    for spec in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9" "tty 5 0"; do
        set -- $spec
        mknod -m 666 "$root/dev/$1" c "$2" "$3"
    done
    mkdir -m 755 "$root/dev/pts"
    mkdir -m 1777 "$root/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,nosuid,noexec devpts "$root/dev/pts"
    mount -t tmpfs -o nosuid,nodev,noexec,mode=1777,size=65536k shm "$root/dev/shm"
    ln -s pts/ptmx "$root/dev/ptmx"
    ln -s /proc/self/fd "$root/dev/fd"
    ln -s /proc/self/fd/0 "$root/dev/stdin"
    ln -s /proc/self/fd/1 "$root/dev/stdout"
    ln -s /proc/self/fd/2 "$root/dev/stderr";;
esac
case " $points " in *" proc "*) mount -t proc -o nosuid,nodev,noexec proc "$root/proc";; esac
case " $points " in *" sys "*) mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys";; esac
ip link set lo up 2>/dev/null || true
set +e
chroot "$root" /bin/sh -c "$cmd"
exit $?
"""
UNSHARE = ["unshare", "--mount", "--propagation", "private", "--uts", "--ipc", "--net", "--pid", "--fork",
           "--kill-child"]


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
    """Run a pyunionfs command, without a time limit (a big layer takes long); its one-line error becomes ours.

    Its stderr (progress lines, warnings) is relayed as it comes, one line behind: a failing
    command's last line is its error, which goes into ours instead of being printed twice.
    """
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(PYUNIONFS + list(args), stdout=out, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        assert proc.stderr is not None
        last = ""
        with proc:
            for line in proc.stderr:
                sys.stderr.write(last)
                sys.stderr.flush()
                last = line
        if proc.returncode != 0:
            raise BuildError(f"pyunionfs {args[0]} failed: {last.strip() or proc.returncode}")
        sys.stderr.write(last)
        out.seek(0)
        return out.read()


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


def images() -> dict[str, str]:
    """NAME:TAG -> IMAGE ID of every image in the store, as `pyunionfs images` lists them."""
    rows = pyunionfs("images").splitlines()[1:-1]  # a header above, a summary line below
    return {name: image_id for name, image_id, *_ in (row.split() for row in rows)}


def run_in_namespaces(mnt: Path, command: str) -> int:
    """Run a RUN command chrooted in *mnt* with /dev, /proc and /sys of its own (see the docstring).

    A mount point the image lacks is made for the step and removed after it, so that neither a
    new directory nor (as none of them is in a lower) a whiteout ends in the layer. A name the
    image has as something else than a directory (a /dev symlink, say) is left alone, unmounted.
    Returns the command's exit status.
    """
    points, made = [], []
    for name in SPECIAL_DIRS:
        path = mnt / name
        if not os.path.lexists(path):
            path.mkdir(mode=0o755)
            made.append(path)
        if path.is_dir() and not path.is_symlink():
            points.append(name)
    try:
        res = subprocess.run([*UNSHARE, "/bin/sh", "-c", RUN_INIT, "build-run", str(mnt), " ".join(points), command],
                             env=RUN_ENV, stdin=subprocess.DEVNULL)
        return res.returncode if res.returncode >= 0 else 128 - res.returncode
    finally:
        for path in made:  # the namespaces, and their mounts, died with the step
            try:
                path.rmdir()
            except OSError as exc:  # the step put something there after all: it is the step's change
                print(f"build.py: warning: {path.name}: not removed ({exc.strerror})", file=sys.stderr)


def build_step(store: Path, parent: str, tag: str, op: str, arg: str, context: Path) -> str:
    """Mount image PARENT under a fresh upper, make the change, unmount, commit the upper as TAG.

    Returns the new image's ID.
    """
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=store / "tmp"))
    # pyunionfs removes a tmp/ folder a minute old unless its .lock is flock()ed: ours is, until
    # this step is done (so the next command removes what a killed build leaves, not a live step)
    lock = os.open(tmp / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    upper, mnt = tmp / "upper", tmp / "mnt"
    upper.mkdir()
    mnt.mkdir()
    busy = False
    try:
        try:
            pyunionfs("mount", f"image:{parent}", str(upper), str(mnt))
            if op == "RUN":
                print(f" ---> Running in {mnt}", flush=True)
                rc = run_in_namespaces(mnt, arg)
                if rc != 0:
                    raise BuildError(f"'{op} {arg}' returned a non-zero code: {rc}")
            else:
                src, dst = arg.split()
                copy_into(mnt, (context / src).resolve(), dst)
        finally:
            try:
                if mounted_below(mnt):
                    pyunionfs("umount", str(mnt))
            except BuildError as exc:  # a process the command left running keeps the mount busy
                busy = True
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # detach it at least
                raise BuildError(f"{exc} (left {tmp}: a later pyunionfs commit or pull removes it)") from exc
        out = pyunionfs("commit", str(upper), "--from", parent, "--tag", tag, "-m", f"{op} {arg}")
        return out.split()[1]  # NAME:TAG  IMAGE-ID  DIFFID
    finally:
        if not busy:
            remove_tmp(tmp)
        os.close(lock)


def retag(image: str, name: str) -> None:
    """Record IMAGE under a second NAME as well (no layer is copied)."""
    pyunionfs("tag", image, name)


def build(buildfile: Path, store: Path, tag: str | None, no_cache: bool) -> None:
    steps = parse(buildfile)
    context = buildfile.resolve().parent
    store.mkdir(parents=True, exist_ok=True)
    os.environ["PYUNIONFS_STORE"] = str(store)  # the store of every pyunionfs command below
    lock = os.open(store / "build.lock", os.O_CREAT | os.O_WRONLY, 0o644)  # held until we exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BuildError(f"another build is using {store}") from None
    known = images()  # NAME:TAG -> IMAGE ID
    key = name = ""  # the cache key and the image of the steps so far
    for n, (op, arg) in enumerate(steps, 1):
        print(f"Step {n}/{len(steps)} : {op} {arg}", flush=True)
        content = ""
        if op == "FROM" and arg.startswith("image:"):  # an image of the store: its ID is the key
            name = arg.removeprefix("image:")
            name += "" if ":" in name.rpartition("/")[2] else ":latest"
            if name not in known:
                raise BuildError(f"FROM {arg}: no image {name} in {store}")
            key = cache_key("", f"FROM {known[name]}")
            print(f" ---> {known[name]}")
            continue
        if op == "FROM":
            arg = str((context / arg).resolve())
            if not Path(arg).is_dir():
                raise BuildError(f"FROM {steps[0][1]}: {arg} is not a directory")
        elif op == "COPY":
            src = (context / arg.split()[0]).resolve()
            if not src.is_relative_to(context) or not src.exists():
                raise BuildError(f"COPY {arg}: {src} is not a file or directory in {context}")
            content = hash_tree(src)
        key = cache_key(key, f"{op} {arg}", content)
        parent, name = name, f"pyunionfs-build-cache:{key[:16]}"
        if name in known and not no_cache:
            print(" ---> Using cache")
        elif op == "FROM":  # the base directory becomes the image's first layer
            known[name] = pyunionfs("commit", arg, "--tag", name, "-m", f"FROM {arg}").split()[1]
        else:
            known[name] = build_step(store, parent, name, op, arg, context)
        print(f" ---> {known[name]}")
    print(f"Successfully built {known[name]}")
    if tag:
        retag(name, tag)
        name = tag
        print(f"Successfully tagged {tag}")
    print(f"\n{pyunionfs('history', '--no-trunc', name)}")
    print(f"To look inside:\n  pyunionfs mount image:{name} UPPER MNT --store {store}")


def main() -> int:
    ap = argparse.ArgumentParser(description="Build an image from a Dockerfile-like file into the pyunionfs store.")
    ap.add_argument("buildfile", type=Path)
    ap.add_argument("--tag", metavar="NAME[:TAG]", help="name the image built (as well as its cache tag)")
    ap.add_argument("--store", type=Path, metavar="DIR",
                    default=Path(os.environ.get("PYUNIONFS_STORE") or "/var/lib/pyunionfs"),
                    help="the pyunionfs image store (%(default)s)")
    ap.add_argument("--no-cache", action="store_true", help="rebuild every step")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("build.py: must run as root (RUN uses chroot, and layers hold whiteout devices)", file=sys.stderr)
        return 1
    try:
        build(args.buildfile, args.store.resolve(), args.tag, args.no_cache)
    except (BuildError, OSError) as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("build.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
