"""The merged view through a real mount, exercised with ordinary system calls."""

from __future__ import annotations

import errno
import mmap
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.mounting import drop_kernel_caches
from tests.support.writecheck import put, whiteout

mkfile = put  # a file (and its parents) in a layer being built


def oserror(fn, *args) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


@pytest.fixture
def stack(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Three layers with every kind of conflict overlayfs resolves."""
    top, mid, low = (tmp_path / n for n in ("top", "mid", "low"))
    for d in (top, mid, low):
        d.mkdir()
    mkfile(low / "only-low", "low")
    mkfile(low / "shadowed", "low")
    mkfile(mid / "shadowed", "mid")
    mkfile(top / "shadowed", "top")
    mkfile(low / "merged/a", "low-a")
    mkfile(mid / "merged/b", "mid-b")
    mkfile(top / "merged/c", "top-c")
    mkfile(low / "merged/deep/x", "low-x")
    mkfile(top / "merged/deep/y", "top-y")
    mkfile(low / "file-over-dir/inner", "hidden")
    mkfile(top / "file-over-dir", "i am a file")
    mkfile(low / "dir-over-file", "hidden file")
    mkfile(top / "dir-over-file/inner", "visible")
    mkfile(low / "gone", "whited out")
    whiteout(mid / "gone")
    mkfile(low / "gone-dir/f", "whited out")
    whiteout(top / "gone-dir")
    mkfile(low / "opaque/hidden", "hidden")
    mkfile(mid / "opaque/shown", "shown")
    os.setxattr(mid / "opaque", b"trusted.overlay.opaque", b"y")
    mkfile(top / "opaque/top", "top")
    # a non-directory in the middle ends the merge of a directory above it
    mkfile(top / "cut/t", "t")
    mkfile(mid / "cut", "file cuts the merge")
    mkfile(low / "cut/l", "never merged")
    return top, mid, low


def test_topmost_layer_wins_and_dirs_merge(stack, mount) -> None:
    d = mount(list(stack))
    m = d.mnt
    assert (m / "shadowed").read_text() == "top"
    assert (m / "only-low").read_text() == "low"
    assert sorted(os.listdir(m / "merged")) == ["a", "b", "c", "deep"]
    assert sorted(os.listdir(m / "merged/deep")) == ["x", "y"]
    assert (m / "merged/a").read_text() == "low-a"
    assert (m / "file-over-dir").read_text() == "i am a file"
    assert oserror(os.listdir, m / "file-over-dir") == errno.ENOTDIR
    assert os.listdir(m / "dir-over-file") == ["inner"]
    assert sorted(os.listdir(m / "opaque")) == ["shown", "top"]
    assert os.listdir(m / "cut") == ["t"]


def test_whiteouts_hide_and_are_invisible(stack, mount) -> None:
    m = mount(list(stack)).mnt
    names = os.listdir(m)
    assert "gone" not in names and "gone-dir" not in names
    assert oserror(os.lstat, m / "gone") == errno.ENOENT
    assert oserror(os.lstat, m / "gone-dir/f") == errno.ENOENT
    assert oserror(open, m / "gone") == errno.ENOENT
    # each name once, with . and ..
    out = subprocess.run(["ls", "-a", "-1", str(m)], capture_output=True, text=True, check=True).stdout.split("\n")
    out = [n for n in out if n]
    assert out[:2] == [".", ".."]
    assert len(out) == len(set(out))
    assert sorted(out[2:]) == sorted(
        ["only-low", "shadowed", "merged", "file-over-dir", "dir-over-file", "opaque", "cut"]
    )


def test_stat_fields_match_the_providing_layer(stack, mount) -> None:
    top, mid, low = stack
    os.chown(low / "only-low", 1234, 4321)
    os.chmod(low / "only-low", 0o640)
    os.utime(low / "only-low", ns=(1_000_000_123, 2_000_000_456))
    m = mount(list(stack)).mnt
    st, real = os.lstat(m / "only-low"), os.lstat(low / "only-low")
    assert (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns) == (
        real.st_mode, 1234, 4321, 3, 2_000_000_456)
    # fstat agrees with lstat
    with open(m / "only-low", "rb") as f:
        assert os.fstat(f.fileno()).st_ino == st.st_ino
    # merged directories report nlink 1 (as overlayfs); single-layer ones their own
    assert os.lstat(m / "merged").st_nlink == 1
    assert os.lstat(m / "dir-over-file").st_nlink == os.lstat(top / "dir-over-file").st_nlink == 2
    # one st_dev for everything
    devs = {os.lstat(os.path.join(dp, n)).st_dev for dp, dns, fns in os.walk(m) for n in dns + fns}
    assert devs == {os.lstat(m).st_dev}


def test_dotdot_everywhere(stack, mount) -> None:
    m = mount(list(stack)).mnt
    assert os.stat(m / "merged/deep/..").st_ino == os.stat(m / "merged").st_ino
    assert os.stat(m / "merged/..").st_ino == os.stat(m).st_ino
    assert (m / "merged/deep/../../shadowed").read_text() == "top"
    listed = subprocess.run(["ls", "-ai1", str(m / "merged/deep")], capture_output=True, text=True, check=True)
    inos = {name: int(ino) for ino, name in (line.split(None, 1) for line in listed.stdout.splitlines())}
    assert inos["."] == os.stat(m / "merged/deep").st_ino
    assert inos[".."] == os.stat(m / "merged").st_ino
    fd = os.open(m / "merged/deep", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.stat("..", dir_fd=fd).st_ino == os.stat(m / "merged").st_ino
    finally:
        os.close(fd)


def test_read_mmap_readlink_statfs(tmp_path, mount) -> None:
    low = tmp_path / "low"
    data = os.urandom(3 * 1024 * 1024 + 17)
    mkfile(low / "big", data)
    os.symlink("big", low / "link")
    os.symlink("/nonexistent/target", low / "dangling")
    m = mount([low]).mnt
    assert (m / "big").read_bytes() == data
    with open(m / "big", "rb") as f:
        f.seek(1_000_000)
        assert f.read(10) == data[1_000_000:1_000_010]
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert mm[: len(data)] == data
    assert os.readlink(m / "link") == "big"
    assert (m / "link").read_bytes() == data  # the kernel follows it, client side
    assert os.readlink(m / "dangling") == "/nonexistent/target"
    vfs, real = os.statvfs(m), os.statvfs(low)
    assert vfs.f_blocks == real.f_blocks and vfs.f_namemax == 255
    assert os.access(m / "big", os.R_OK)


def test_xattrs_pass_and_markers_do_not_leak(tmp_path, mount) -> None:
    up, low = tmp_path / "low1", tmp_path / "low2"
    mkfile(low / "d/f", "x")
    mkfile(up / "d/g", "y")
    os.setxattr(low / "d/f", b"user.color", b"blue")
    os.setxattr(up / "d", b"user.top", b"1")
    os.setxattr(low / "d", b"user.low", b"1")
    os.setxattr(up / "d", b"trusted.overlay.origin", b"private")
    os.setxattr(up / "d", b"user.overlay.impure", b"y")
    os.setxattr(up / "d", b"trusted.overlay.overlay.opaque", b"y")  # escaped: shown unescaped
    m = mount([up, low]).mnt
    assert os.getxattr(m / "d/f", b"user.color") == b"blue"
    names = set(os.listxattr(m / "d"))
    assert names == {"user.top", "trusted.overlay.opaque"}  # the top layer's, unescaped
    assert os.getxattr(m / "d", b"trusted.overlay.opaque") == b"y"
    assert oserror(os.getxattr, m / "d", b"trusted.overlay.origin") == errno.ENODATA
    assert sorted(os.listdir(m / "d")) == ["f", "g"]  # escaped marker is not a marker


def test_oci_whiteouts(tmp_path, mount) -> None:
    top, low = tmp_path / "top", tmp_path / "low"
    mkfile(low / "etc/passwd", "root")
    mkfile(low / "etc/shadow", "secret")
    mkfile(low / "var/cache/a", "a")
    mkfile(low / "var/log/b", "b")
    mkfile(top / "etc/.wh.shadow")
    mkfile(top / "var/cache/.wh..wh..opq")
    mkfile(top / "var/cache/new", "new")
    mkfile(top / ".wh.opt")
    mkfile(low / "opt/tool", "t")
    m = mount([top, low]).mnt
    assert sorted(os.listdir(m)) == ["etc", "var"]
    assert os.listdir(m / "etc") == ["passwd"]
    assert os.listdir(m / "var/cache") == ["new"]
    assert os.listdir(m / "var/log") == ["b"]
    assert oserror(os.lstat, m / "etc/.wh.shadow") == errno.ENOENT
    assert oserror(os.lstat, m / "opt") == errno.ENOENT


def test_xattr_whiteouts(tmp_path, mount) -> None:
    top, low = tmp_path / "top", tmp_path / "low"
    mkfile(low / "d/gone", "x")
    mkfile(low / "d/kept", "k")
    mkfile(top / "d/gone")
    os.setxattr(top / "d/gone", b"trusted.overlay.whiteout", b"")
    os.setxattr(top / "d", b"trusted.overlay.opaque", b"x")
    m = mount([top, low]).mnt
    assert os.listdir(m / "d") == ["kept"]
    assert oserror(os.lstat, m / "d/gone") == errno.ENOENT


def test_inode_numbers(tmp_path, mount) -> None:
    up, low = tmp_path / "up", tmp_path / "low"
    mkfile(low / "a", "1")
    os.link(low / "a", low / "a-link")
    mkfile(low / "sub/b", "2")
    os.link(low / "a", low / "sub/a-link2")
    mkfile(up / "c", "3")
    # a second filesystem whose inode numbers overlap the first's
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other)], check=True)
    try:
        for i in range(20):
            mkfile(other / f"t{i}", str(i))
        d = mount([up, other, low])
        m = d.mnt
        inos = {}
        for dp, dns, fns in os.walk(m):
            for n in dns + fns:
                p = os.path.join(dp, n)
                inos[p] = os.lstat(p).st_ino
        a, al, al2 = (inos[str(m / p)] for p in ("a", "a-link", "sub/a-link2"))
        assert a == al == al2, "hardlinked lower names must share one inode number"
        others = {p: i for p, i in inos.items() if p not in (str(m / "a-link"), str(m / "sub/a-link2"))}
        assert len(set(others.values())) == len(others), "inode numbers collide"
        assert os.lstat(m / "a").st_nlink == 3
        drop_kernel_caches()  # the kernel forgets; numbers must not change
        assert {p: os.lstat(p).st_ino for p in inos} == inos
        d.stop()
    finally:
        subprocess.run(["umount", "-l", str(other)], check=False)


def test_listing_numbers_and_types_are_what_lstat_shows(tmp_path, mount) -> None:
    """Directories of one lower layer (on ext4 or the like, and on a tmpfs
    lower), big enough that the kernel reads most of them with plain READDIRs
    (no attributes: the daemon then numbers files and symlinks from the
    layer's own entries): every entry's d_ino and d_type are those lstat
    shows, whiteouts and markers stay hidden, and the numbers outlive the
    kernel's caches."""
    from pyunionfs.fuse import control

    low, other = tmp_path / "low", tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other)], check=True)
    try:
        for big in (low / "big", other / "big2"):
            for i in range(3000):
                mkfile(big / f"f{i:04d}", "")
            os.link(big / "f0000", big / "hard")
            os.symlink("f0001", big / "link")
            (big / "sub").mkdir()
            os.mkfifo(big / "fifo")
            whiteout(big / "gone")
            mkfile(big / ".wh.marker", "")
        m = mount([low, other]).mnt
        for big in (m / "big", m / "big2"):
            before = control.stats(os.fsencode(str(m))).get("READDIR", 0)
            entries = {e.name: (e.inode(), e.is_dir(follow_symlinks=False), e.is_symlink(),
                                e.is_file(follow_symlinks=False)) for e in os.scandir(big)}  # fmt: skip
            assert control.stats(os.fsencode(str(m))).get("READDIR", 0) > before
            assert sorted(entries) == sorted([f"f{i:04d}" for i in range(3000)] + ["hard", "link", "sub", "fifo"])
            for name, (ino, is_dir, is_link, is_file) in entries.items():
                st = os.lstat(big / name)
                assert (ino, is_dir, is_link, is_file) == (
                    st.st_ino, stat.S_ISDIR(st.st_mode), stat.S_ISLNK(st.st_mode), stat.S_ISREG(st.st_mode)), name
            assert entries["hard"][0] == entries["f0000"][0]
            drop_kernel_caches()
            assert {e.name: e.inode() for e in os.scandir(big)} == {n: v[0] for n, v in entries.items()}
    finally:
        subprocess.run(["umount", "-l", str(other)], check=False)


def test_long_names_and_deep_paths(tmp_path, mount) -> None:
    low = tmp_path / "low"
    mkfile(low / ("n" * 255), "max")
    # a chain of directories longer than PATH_MAX in total
    low.mkdir(exist_ok=True)
    fd = os.open(low, os.O_RDONLY)
    depth = 2500
    for _ in range(depth):
        os.mkdir("dd", dir_fd=fd)
        nfd = os.open("dd", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    wfd = os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(wfd, b"deep")
    os.close(wfd)
    os.close(fd)
    d = mount([low])
    try:
        _walk_deep(d.mnt, depth)
    finally:
        d.stop()
        _remove_chain(low, depth)  # shutil.rmtree recurses and cannot


def _remove_chain(root: Path, depth: int) -> None:
    fds = [os.open(root, os.O_RDONLY)]
    for _ in range(depth):
        fds.append(os.open("dd", os.O_RDONLY, dir_fd=fds[-1]))
    os.unlink("bottom", dir_fd=fds[-1])
    for i in range(depth, 0, -1):
        os.close(fds[i])
        os.rmdir("dd", dir_fd=fds[i - 1])
    os.close(fds[0])


def _walk_deep(m: Path, depth: int) -> None:
    assert (m / ("n" * 255)).read_text() == "max"
    assert oserror(os.lstat, m / ("n" * 256)) == errno.ENAMETOOLONG
    near = m / "/".join(["dd"] * ((4000 - len(str(m))) // 3))
    assert len(str(near)) > 3900
    assert os.path.isdir(near)
    fd = os.open(m, os.O_RDONLY)
    try:
        for _ in range(depth):
            nfd = os.open("dd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        rfd = os.open("bottom", os.O_RDONLY, dir_fd=fd)
        assert os.read(rfd, 10) == b"deep"
        os.close(rfd)
    finally:
        os.close(fd)


def test_symlinks_in_layers_are_never_followed(tmp_path, mount) -> None:
    top, low = tmp_path / "top", tmp_path / "low"
    top.mkdir()
    mkfile(low / "etc/local", "lower etc")
    os.symlink("/etc", top / "etc")           # symlink over a real directory
    mkfile(top / "d/mine", "top")
    os.symlink("/etc", low / "d")             # real directory over a symlink
    mkfile(top / "x/y", "y")
    os.symlink("/", low / "x")
    m = mount([top, low]).mnt
    st = os.lstat(m / "etc")
    assert stat.S_ISLNK(st.st_mode) and os.readlink(m / "etc") == "/etc"
    assert os.listdir(m / "d") == ["mine"], "the daemon merged through a symlink"
    assert oserror(os.lstat, m / "d/passwd") == errno.ENOENT
    assert oserror(os.lstat, m / "x/etc") == errno.ENOENT
    assert os.listdir(m / "x") == ["y"]


def test_lower_layers_are_never_modified(stack, mount) -> None:
    for layer in stack:
        for p in layer.rglob("*"):
            os.utime(p, ns=(1_000_000_000, 2_000_000_000), follow_symlinks=False)

    def state():
        out = {}
        for layer in stack:
            for p in sorted(layer.rglob("*")):
                st = os.lstat(p)
                body = b""
                if stat.S_ISREG(st.st_mode):  # read without touching atime ourselves
                    fd = os.open(p, os.O_RDONLY | os.O_NOATIME)
                    body = os.read(fd, 1 << 20)
                    os.close(fd)
                out[p] = (st.st_mode, st.st_size, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, body)
        return out

    before = state()
    m = mount(list(stack)).mnt
    for dp, _dns, fns in os.walk(m):
        for n in fns:
            p = os.path.join(dp, n)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    f.read()
            os.listxattr(p, follow_symlinks=False)
    assert state() == before


@pytest.mark.parametrize("how", ["ro-option", "empty-upper"])
def test_read_only_mount_refuses_writes(stack, mount, how) -> None:
    top, mid, low = stack
    d = mount([mid, low], top, "ro") if how == "ro-option" else mount(list(stack), None)
    m = d.mnt
    assert (m / "shadowed").read_text() == "top"
    assert oserror(open, m / "shadowed", "w") == errno.EROFS
    assert oserror(open, m / "new", "w") == errno.EROFS
    assert oserror(os.mkdir, m / "newdir") == errno.EROFS
    assert oserror(os.unlink, m / "shadowed") == errno.EROFS
    assert oserror(os.chmod, m / "shadowed", 0o600) == errno.EROFS
    assert oserror(os.setxattr, m / "shadowed", b"user.x", b"1") == errno.EROFS
    assert not os.access(m / "shadowed", os.W_OK)


def test_other_users_get_kernel_permission_checks(tmp_path, mount) -> None:
    low = tmp_path / "low"
    mkfile(low / "public", "everyone", 0o644)
    mkfile(low / "private", "root only", 0o600)
    # pytest's tmp_path lives under a 0700 folder: put the mountpoint where nobody can reach it
    import tempfile

    m = Path(tempfile.mkdtemp(prefix="pyunionfs-perm-"))
    os.chmod(m, 0o755)
    try:
        mount([low], None, mnt=m)
        _check_as_nobody(m)
    finally:
        subprocess.run(["fusermount3", "-u", str(m)], capture_output=True)
        m.rmdir()


def _check_as_nobody(m: Path) -> None:
    with open("/proc/self/mounts") as f:
        opts = next(line.split()[3] for line in f if line.split()[1] == str(m))
    assert "allow_other" in opts and "default_permissions" in opts
    script = (
        "import os,sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        f"print(open({str(m / 'public')!r}).read())\n"
        f"try: open({str(m / 'private')!r})\n"
        "except PermissionError: print('EACCES')\n"
    )
    out = subprocess.run([os.sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["everyone", "EACCES"], out.stderr


def test_mounts_inside_a_layer_are_not_crossed(tmp_path, mount) -> None:
    """As in overlayfs: a layer is its own filesystem, not whatever is mounted on it."""
    low, other = tmp_path / "low", tmp_path / "other"
    mkfile(low / "m/underneath", "under")
    mkfile(other / "outside", "outside")
    subprocess.run(["mount", "--bind", str(other), str(low / "m")], check=True)
    try:
        assert os.listdir(low / "m") == ["outside"]
        m = mount([low]).mnt
        assert os.listdir(m / "m") == ["underneath"]
    finally:
        subprocess.run(["umount", "-l", str(low / "m")], check=False)
