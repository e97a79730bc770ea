"""Push and pull with a real registry: Debian's docker-registry on 127.0.0.1, skopeo as the other client.

Why: an image must go to a registry and come back into another store identical (same IMAGE ID,
same manifest digest, the same tree when mounted), another client (skopeo) must read what we push
and we what it pushes, and every failure (a damaged blob, a cut connection, a refused login, an
unknown tag) must be one line that leaves the store as it was.  A proxy in front of the registry
counts requests, flips a byte of a blob or cuts a download halfway.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyunionfs.image.store import Store
from tests.support.ocigen import app_tree, base_tree, make_layer, put, write_layout
from tests.support.registryd import (
    Registry,
    TokenIssuer,
    htpasswd_line,
    proxy,
    running_registry,
    self_signed,
    token_server,
)
from tests.support.treesnap import Snapshot, diff, snapshot

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: whiteout devices, trusted xattrs, mounts"),
    pytest.mark.timeout(120),
]

ROOT = Path(__file__).resolve().parents[2]
SKOPEO = shutil.which("skopeo")


def _env(home: Path) -> dict[str, str]:
    """The environment of a command: credentials files of this test only."""
    env = {k: v for k, v in os.environ.items() if k not in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_RUNTIME_DIR=str(home / "run"))
    return env


def _run(home: Path, *args: str, ok: bool = True, cwd: Path | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "pyunionfs", *args], capture_output=True, text=True, timeout=60,
                         env=_env(home), cwd=cwd, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)
    if ok:
        assert res.returncode == 0, res.stderr
    return res


def _one_line(res: subprocess.CompletedProcess[str], status: int = 1) -> str:
    assert res.returncode == status, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def _listing(root: Path) -> list[str]:
    """Every path below *root*, for "nothing changed" (tmp/ included: no temporaries may remain)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _store_with_another_image(tmp_path: Path, home: Path) -> tuple[Path, list[str]]:
    """A second store holding one image of its own, and its listing: what a failed pull must not change."""
    mine = tmp_path / "store"
    _run(home, "commit", str(base_tree(tmp_path / "other")), "--tag", "other:1", "--store", str(mine))
    return mine, _listing(mine)


def _tree(root: Path) -> Snapshot:
    return snapshot(root).subset(lambda path, _: path != b".")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One anonymous registry for the module (each test uses repositories of its own)."""
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store holding ``app:1`` (two gzip layers, a whiteout among them); returns (store, image id)."""
    tmp = tmp_path_factory.mktemp("source")
    out = tmp / "tars"
    layers = [make_layer(base_tree(tmp / "base"), out), make_layer(app_tree(tmp / "app"), out)]
    write_layout(tmp / "lay", layers, "1")
    store = tmp / "store"
    img = Store(str(store)).pull(f"{tmp}/lay:1", "app:1")
    return store, img.id


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    (path / "run").mkdir(parents=True)
    return path


# --------------------------------------------------------------------------
# Round trips and interop
# --------------------------------------------------------------------------


def test_built_image_round_trip(tmp_path: Path, home: Path, registry: Registry, mount) -> None:
    """An image built with contrib/build.py goes to the registry and comes back into another store
    identical: same IMAGE ID, same manifest digest, the same tree mounted."""
    ctx = tmp_path / "ctx"
    base_tree(ctx / "base")
    put(ctx / "files" / "greeting.txt", b"hello from the build\n")
    (ctx / "Buildfile").write_text("FROM base\nCOPY files/greeting.txt /srv/\n")
    store_a, store_b = tmp_path / "a", tmp_path / "b"
    res = subprocess.run([sys.executable, str(ROOT / "contrib" / "build.py"), str(ctx / "Buildfile"),
                          "--tag", "built:1", "--store", str(store_a)], capture_output=True, text=True, timeout=90,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    pushed = _run(home, "push", "built:1", f"docker://{registry.host}/built/app:v1", "--store", str(store_a))
    name, manifest, dest = pushed.stdout.split()
    assert (name, dest) == ("built:1", f"docker://{registry.host}/built/app:v1")
    pulled = _run(home, "pull", f"docker://{registry.host}/built/app:v1", "--store", str(store_b)).stdout.split()
    a = Store(str(store_a)).image("built:1")
    assert pulled == [f"{registry.host}/built/app:v1", a.id, manifest]
    assert a.manifest_digest == manifest  # compressed layers sent as stored: the manifest is unchanged
    da = mount("image:built:1", None, extra_args=["--store", str(store_a)])
    db = mount(f"image:{registry.host}/built/app:v1", None, extra_args=["--store", str(store_b)])
    assert diff(_tree(da.mnt), _tree(db.mnt)) == []
    assert (db.mnt / "srv" / "greeting.txt").read_bytes() == b"hello from the build\n"
    da.stop()
    db.stop()


@pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed (bash contrib/install.sh installs it)")
def test_skopeo_reads_what_we_push_and_we_read_what_it_pushes(tmp_path: Path, home: Path, registry: Registry,
                                                              source: tuple[Path, str]) -> None:
    store, image_id = source
    assert SKOPEO is not None
    _run(home, "push", "app:1", f"docker://{registry.host}/interop/ours:1", "--store", str(store))
    # skopeo copies our pushed image to a layout, and the layout pull gives the same image
    subprocess.run([SKOPEO, "copy", "--src-tls-verify=false", f"docker://{registry.host}/interop/ours:1",
                    f"oci:{tmp_path}/from-registry:1"], check=True, capture_output=True, timeout=60)
    got = _run(home, "pull", f"{tmp_path}/from-registry:1", "--tag", "viaskopeo:1",
               "--store", str(tmp_path / "s1")).stdout.split()
    assert got[1] == image_id
    # skopeo pushes an image (a layout we wrote) to the registry, and we pull it
    _run(home, "push", "app:1", f"{tmp_path}/ours-layout:1", "--store", str(store))
    subprocess.run([SKOPEO, "copy", "--dest-tls-verify=false", f"oci:{tmp_path}/ours-layout:1",
                    f"docker://{registry.host}/interop/theirs:1"], check=True, capture_output=True, timeout=60)
    got = _run(home, "pull", f"docker://{registry.host}/interop/theirs:1", "--store",
               str(tmp_path / "s2")).stdout.split()
    assert got[:2] == [f"{registry.host}/interop/theirs:1", image_id]


def test_pull_by_digest(tmp_path: Path, home: Path, registry: Registry, source: tuple[Path, str]) -> None:
    store, image_id = source
    manifest = _run(home, "push", "app:1", f"docker://{registry.host}/bydigest/app:1",
                    "--store", str(store)).stdout.split()[1]
    got = _run(home, "pull", f"docker://{registry.host}/bydigest/app@{manifest}",
               "--store", str(tmp_path / "s")).stdout.split()
    assert got == [f"{registry.host}/bydigest/app:sha256-{manifest[7:19]}", image_id, manifest]
    wrong = "sha256:" + "0" * 64
    line = _one_line(_run(home, "pull", f"docker://{registry.host}/bydigest/app@{wrong}", "--store",
                          str(tmp_path / "s"), ok=False))
    assert "manifest unknown" in line


def test_index_picks_the_platform(tmp_path: Path, home: Path, registry: Registry, source: tuple[Path, str]) -> None:
    """A multi-platform index: this machine's entry by default, --platform to choose, one line when absent."""
    store, image_id = source
    manifest = _run(home, "push", "app:1", f"docker://{registry.host}/multi/app:single",
                    "--store", str(store)).stdout.split()[1]
    size = os.path.getsize(Store(str(store)).blob_path(manifest))
    from pyunionfs.image.ocilayout import host_platform

    os_name, arch = host_platform()
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest, "size": size}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {**entry, "platform": {"os": "linux", "architecture": "riscv64"}},
        {**entry, "platform": {"os": os_name, "architecture": arch}},
    ]}
    req = urllib.request.Request(f"http://{registry.host}/v2/multi/app/manifests/multi", method="PUT",
                                 data=json.dumps(index).encode(),
                                 headers={"Content-Type": "application/vnd.oci.image.index.v1+json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 201
    got = _run(home, "pull", f"docker://{registry.host}/multi/app:multi", "--store", str(tmp_path / "s")).stdout.split()
    assert got[1:] == [image_id, manifest]
    got = _run(home, "pull", f"docker://{registry.host}/multi/app:multi", "--platform", "linux/riscv64",
               "--tag", "rv:1", "--store", str(tmp_path / "s")).stdout.split()
    assert got == ["rv:1", image_id, manifest]
    line = _one_line(_run(home, "pull", f"docker://{registry.host}/multi/app:multi", "--platform", "linux/s390x",
                          "--store", str(tmp_path / "s"), ok=False))
    assert "no manifest for linux/s390x" in line and "linux/riscv64" in line


def test_platform_chooses_from_a_layouts_index_too(tmp_path: Path, home: Path) -> None:
    out = tmp_path / "tars"
    lay = tmp_path / "lay"
    digests = write_layout(lay, [make_layer(base_tree(tmp_path / "base"), out)], "1")
    manifest = lay / "blobs" / "sha256" / digests["manifest"][7:]
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digests["manifest"],
             "size": manifest.stat().st_size}
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {**entry, "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}}]}).encode()
    import hashlib

    index_digest = "sha256:" + hashlib.sha256(index).hexdigest()
    (lay / "blobs" / "sha256" / index_digest[7:]).write_bytes(index)
    (lay / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest, "size": len(index),
         "annotations": {"org.opencontainers.image.ref.name": "1"}}]}))
    store = tmp_path / "s"
    line = _one_line(_run(home, "pull", f"{lay}:1", "--platform", "linux/arm/v6", "--store", str(store), ok=False))
    assert line.endswith("no manifest for linux/arm/v6 in this image index (it has linux/arm/v7)")
    got = _run(home, "pull", f"{lay}:1", "--platform", "linux/arm/v7", "--store", str(store)).stdout.split()
    assert got[1:] == [digests["config"][7:19], digests["manifest"]]


# --------------------------------------------------------------------------
# What a push sends: HEAD skips, cross-repository mounts, chunks
# --------------------------------------------------------------------------


def test_second_push_sends_no_blob(home: Path, registry: Registry, source: tuple[Path, str]) -> None:
    store, _ = source
    with proxy(registry) as (host, seen):
        _run(home, "push", "app:1", f"docker://{host}/skip/app:1", "--store", str(store))
        first = len(seen.requests("PUT", "/blobs/uploads/"))
        assert first == 3  # two layers and the config
        before = len(seen.seen)
        _run(home, "push", "app:1", f"docker://{host}/skip/app:2", "--store", str(store))
        second = seen.seen[before:]
    assert [r[0] for r in second if "/blobs/" in r[1]] == ["HEAD"] * 3
    assert all(r[2] == 200 for r in second if r[0] == "HEAD")
    assert [(r[0], r[2]) for r in second if "/manifests/" in r[1]] == [("PUT", 201)]


def test_cross_repository_mount(tmp_path: Path, home: Path, registry: Registry, source: tuple[Path, str]) -> None:
    """An image the store knows from one repository of a registry is mounted into another, not sent."""
    store, image_id = source
    with proxy(registry) as (host, seen):
        _run(home, "push", "app:1", f"docker://{host}/mnt/src:1", "--store", str(store))
        mine = tmp_path / "store"
        _run(home, "pull", f"docker://{host}/mnt/src:1", "--store", str(mine))
        before = len(seen.seen)
        _run(home, "push", f"{host}/mnt/src:1", f"docker://{host}/mnt/dst:1", "--store", str(mine))
        pushed = seen.seen[before:]
    mounts = [r for r in pushed if r[0] == "POST" and "mount=sha256" in r[1]]
    assert len(mounts) == 3 and all(r[2] == 201 and "from=mnt%2Fsrc" in r[1] for r in mounts)
    assert not [r for r in pushed if r[0] in ("PUT", "PATCH") and "/blobs/" in r[1]]
    got = _run(home, "pull", f"docker://{registry.host}/mnt/dst:1", "--store", str(tmp_path / "s2")).stdout.split()
    assert got[1] == image_id


def test_chunked_upload(tmp_path: Path, home: Path, registry: Registry, source: tuple[Path, str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob larger than the monolithic limit goes as PATCH chunks then a PUT (limits made small here)."""
    from pyunionfs.image import registry as client
    from pyunionfs.image.remote import push_remote

    monkeypatch.setattr(client, "MONOLITHIC_MAX", 100)
    monkeypatch.setattr(client, "UPLOAD_CHUNK", 700)
    store, image_id = source
    with proxy(registry) as (host, seen):
        img, _, desc, _ = push_remote(Store(str(store), create=False), "app:1", f"docker://{host}/chunked/app:1")
        patches = seen.requests("PATCH", "/blobs/uploads/")
    big = max(d.size for d in img.layer_descriptors)
    assert len(patches) >= -(-big // 700) and all(r[2] == 202 for r in patches)
    got = _run(home, "pull", f"docker://{registry.host}/chunked/app:1", "--store", str(tmp_path / "s")).stdout.split()
    assert got[1:] == [image_id, desc.digest]


# --------------------------------------------------------------------------
# Failures: one line, nothing stored
# --------------------------------------------------------------------------


def test_damaged_blob_is_refused_and_nothing_stored(tmp_path: Path, home: Path, registry: Registry,
                                                    source: tuple[Path, str]) -> None:
    store, _ = source
    layer = Store(str(store)).image("app:1").layer_descriptors[1].digest
    mine, before = _store_with_another_image(tmp_path, home)
    with proxy(registry) as (host, seen):
        _run(home, "push", "app:1", f"docker://{host}/damaged/app:1", "--store", str(store))
        seen.damage.add(layer)
        line = _one_line(_run(home, "pull", f"docker://{host}/damaged/app:1", "--store", str(mine), ok=False))
    assert line == f"pyunionfs: blob {layer}: content does not match its digest (got {line.split('(got ')[1]}"
    assert _listing(mine) == before


@pytest.mark.parametrize("how", ["resume", "restart"])
def test_interrupted_download_resumes_or_restarts(tmp_path: Path, home: Path, registry: Registry,
                                                  source: tuple[Path, str], how: str) -> None:
    """A connection cut mid-layer: the download goes on with a Range request (206), or starts the
    layer again when the registry sends it whole (200); either way the right image is stored."""
    store, image_id = source
    layer = Store(str(store)).image("app:1").layer_descriptors[0].digest
    with proxy(registry) as (host, seen):
        _run(home, "push", "app:1", f"docker://{host}/cut/app:1", "--store", str(store))
        seen.cut_once.add(layer)
        seen.ignore_range = how == "restart"
        got = _run(home, "pull", f"docker://{host}/cut/app:1", "--store", str(tmp_path / "s")).stdout.split()
        gets = seen.requests("GET", f"/blobs/{layer}")
    assert got[1] == image_id
    assert len(gets) == 2 and gets[0][3] == "" and gets[1][3].startswith("bytes=")
    assert gets[1][2] == (206 if how == "resume" else 200)
    assert _listing(tmp_path / "s" / "tmp") == []


def test_plain_layers_are_compressed_on_the_way(tmp_path: Path, home: Path, registry: Registry) -> None:
    """An image whose layers are stored as plain tars goes out gzipped (as to a layout): same IMAGE ID."""
    out = tmp_path / "tars"
    layers = [make_layer(base_tree(tmp_path / "base"), out), make_layer(app_tree(tmp_path / "app"), out)]
    write_layout(tmp_path / "lay", layers, "1", gzip=False)
    store = tmp_path / "store"
    image_id = _run(home, "pull", f"{tmp_path}/lay:1", "--tag", "plain:1", "--store", str(store)).stdout.split()[1]
    manifest = _run(home, "push", "plain:1", f"docker://{registry.host}/plain/app:1", "--store",
                    str(store)).stdout.split()[1]
    _run(home, "push", "plain:1", f"{tmp_path}/out:1", "--store", str(store))
    assert (tmp_path / "out" / "blobs" / "sha256" / manifest[7:]).exists()  # the same manifest as a layout gets
    got = _run(home, "pull", f"docker://{registry.host}/plain/app:1", "--store", str(tmp_path / "s")).stdout.split()
    assert got[1:] == [image_id, manifest]
    assert not list(Path("/tmp").glob("pyunionfs-push-*/layer-*"))


def test_tls_is_verified_unless_told_otherwise(tmp_path: Path, home: Path, source: tuple[Path, str]) -> None:
    """A registry with a self-signed certificate on 127.0.0.1: refused in one line (never retried over
    plain HTTP), accepted with --tls-verify=false, and trusted when the system trusts it (SSL_CERT_FILE)."""
    store, image_id = source
    cert, key = self_signed(tmp_path / "tls")
    with running_registry(tmp_path / "reg", tls=(cert, key)) as reg:
        ref = f"docker://{reg.host}/tls/app:1"
        line = _one_line(_run(home, "push", "app:1", ref, "--store", str(store), ok=False))
        assert line.startswith(f"pyunionfs: registry {reg.host}: cannot connect: ") and "certificate verify failed" \
            in line and line.endswith("(to accept it: --tls-verify=false)")
        _run(home, "push", "app:1", ref, "--tls-verify=false", "--store", str(store))
        env = _env(home) | {"SSL_CERT_FILE": str(cert)}
        res = subprocess.run([sys.executable, "-m", "pyunionfs", "pull", ref, "--store", str(tmp_path / "s")],
                             capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split()[1] == image_id
    line = _one_line(_run(home, "pull", f"{tmp_path}/x:1", "--tls-verify=false", "--store", str(store), ok=False),
                     status=2)
    assert line == "pyunionfs: --tls-verify goes with docker:// references, not a layout directory"


def test_server_errors_are_retried(tmp_path: Path, home: Path, registry: Registry, source: tuple[Path, str]) -> None:
    """A 503 on a manifest and a 500 on a blob are tried again (after a backoff), and the pull succeeds."""
    store, image_id = source
    layer = Store(str(store)).image("app:1").layer_descriptors[0].digest
    with proxy(registry) as (host, seen):
        _run(home, "push", "app:1", f"docker://{host}/retry/app:1", "--store", str(store))
        seen.fail_once.update({"/manifests/1": 503, f"/blobs/{layer}": 500})
        got = _run(home, "pull", f"docker://{host}/retry/app:1", "--store", str(tmp_path / "s")).stdout.split()
        statuses = [r[2] for r in seen.requests("GET", "/manifests/1")], [r[2] for r in seen.requests("GET", layer)]
    assert got[1] == image_id
    assert statuses == ([503, 200], [500, 200])


def test_ctrl_c_leaves_the_store_as_it_was(tmp_path: Path, home: Path, registry: Registry,
                                          source: tuple[Path, str]) -> None:
    """SIGINT while a layer is half downloaded: one line, exit 130, soon, and the store unchanged."""
    store, _ = source
    layer = Store(str(store)).image("app:1").layer_descriptors[0].digest
    mine, before = _store_with_another_image(tmp_path, home)
    with proxy(registry) as (host, seen):
        _run(home, "push", "app:1", f"docker://{host}/intr/app:1", "--store", str(store))
        seen.stall.add(layer)
        proc = subprocess.Popen([sys.executable, "-m", "pyunionfs", "pull", f"docker://{host}/intr/app:1",
                                 "--store", str(mine)], env=_env(home), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while not seen.requests("GET", layer) and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.02)
            assert seen.requests("GET", layer), "the pull never asked for the layer"
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert (proc.returncode, out, err) == (130, "", "pyunionfs: pull: interrupted\n")
    assert took < 5
    assert _listing(mine) == before


def test_unknown_manifest_and_unreachable_registry_are_one_line(tmp_path: Path, home: Path,
                                                                registry: Registry) -> None:
    store = tmp_path / "store"
    line = _one_line(_run(home, "pull", f"docker://{registry.host}/nothing/here:1", "--store", str(store), ok=False))
    assert line == (f"pyunionfs: registry {registry.host}: manifest nothing/here:1: manifest unknown "
                    "(MANIFEST_UNKNOWN)")
    from tests.support.registryd import free_port

    line = _one_line(_run(home, "pull", f"docker://127.0.0.1:{free_port()}/x:1", "--store", str(store), ok=False))
    assert line.startswith("pyunionfs: registry 127.0.0.1:") and "cannot connect" in line
    assert not (store / "images").exists() or _listing(store / "images") == []


def test_a_scheme_is_never_a_folder(tmp_path: Path, home: Path, registry: Registry, source: tuple[Path, str]) -> None:
    """``push IMAGE docker://...`` used to write a local folder named ``docker:``; other schemes are refused."""
    store, _ = source
    _run(home, "push", "app:1", f"docker://{registry.host}/scheme/app", "--store", str(store), cwd=tmp_path)
    line = _one_line(_run(home, "push", "app:1", "oci-archive://x/y:1", "--store", str(store), ok=False,
                          cwd=tmp_path), status=2)
    assert "unknown transport 'oci-archive://'" in line
    line = _one_line(_run(home, "pull", "docker://Upper/Case:1", "--store", str(store), ok=False), status=2)
    assert "invalid repository name" in line
    assert sorted(os.listdir(tmp_path)) == ["home"]
    got = _run(home, "pull", f"docker://{registry.host}/scheme/app:1", "--store", str(tmp_path / "s")).stdout
    assert got.startswith(f"{registry.host}/scheme/app:1 ")  # the push took the image's own tag


# --------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------


def test_basic_auth_login_and_logout(tmp_path: Path, home: Path, source: tuple[Path, str]) -> None:
    store, image_id = source
    (tmp_path / "htpasswd").write_text(htpasswd_line("alice", "s3cret"))
    auth = f"  htpasswd:\n    realm: test\n    path: {tmp_path / 'htpasswd'}\n"
    with running_registry(tmp_path / "reg", auth) as reg:
        ref = f"docker://{reg.host}/private/app:1"
        line = _one_line(_run(home, "push", "app:1", ref, "--store", str(store), ok=False))
        assert line == (f"pyunionfs: registry {reg.host}: authentication required "
                        f"(pyunionfs login {reg.host}, or --creds USER:PASSWORD)")
        line = _one_line(_run(home, "push", "app:1", ref, "--creds", "alice:wrong", "--store", str(store), ok=False))
        assert line.startswith(f"pyunionfs: registry {reg.host}: ") and line.endswith(": access denied as alice "
                                                                                    "(HTTP 401 Unauthorized)")
        _run(home, "push", "app:1", ref, "--creds", "alice:s3cret", "--store", str(store))
        # login checks, then writes podman's file ($XDG_RUNTIME_DIR/containers/auth.json)
        line = _one_line(_run(home, "login", reg.host, "-u", "alice", "-p", "nope", ok=False))
        assert line.endswith("login: access denied as alice (authentication required (UNAUTHORIZED))")
        assert not (home / "run" / "containers" / "auth.json").exists()
        out = _run(home, "login", reg.host, "-u", "alice", "--password-stdin", stdin="s3cret\n").stdout
        authfile = home / "run" / "containers" / "auth.json"
        assert out == f"Login Succeeded! (credentials in {authfile})\n"
        assert oct(authfile.stat().st_mode & 0o777) == "0o600"
        assert list(json.loads(authfile.read_text())["auths"]) == [reg.host]
        got = _run(home, "pull", ref, "--store", str(tmp_path / "s")).stdout.split()
        assert got[1] == image_id
        assert _run(home, "logout", reg.host).stdout == f"Removed login credentials for {reg.host}\n"
        assert json.loads(authfile.read_text())["auths"] == {}
        _one_line(_run(home, "pull", ref, "--store", str(tmp_path / "s"), ok=False))
        # docker's file works too
        docker = home / ".docker" / "config.json"
        docker.parent.mkdir()
        import base64

        docker.write_text(json.dumps({"auths": {reg.host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
        assert _run(home, "pull", ref, "--tag", "d:1", "--store", str(tmp_path / "s")).stdout.split()[1] == image_id


def test_token_auth(tmp_path: Path, home: Path, source: tuple[Path, str]) -> None:
    """The registry's ``auth: token`` mode: a bearer token from the challenge's realm, scoped per repository."""
    store, image_id = source
    issuer = TokenIssuer.make(tmp_path / "keys", {"bob": "hunter2"})
    with token_server(issuer) as realm, running_registry(tmp_path / "reg", issuer.auth_yaml(realm)) as reg:
        ref = f"docker://{reg.host}/team/app:1"
        line = _one_line(_run(home, "pull", ref, "--store", str(tmp_path / "s"), ok=False))
        assert line == (f"pyunionfs: registry {reg.host}: token server refused access without credentials "
                        "(HTTP 401: anonymous access is not allowed (UNAUTHORIZED))")
        _run(home, "login", reg.host, "-u", "bob", "-p", "hunter2")
        _run(home, "push", "app:1", ref, "--store", str(store))
        assert {"user": "bob", "scope": ["repository:team/app:pull,push"]} in issuer.requests
        got = _run(home, "pull", ref, "--store", str(tmp_path / "s")).stdout.split()
        assert got[1] == image_id
        # a mount from another repository needs a token for both
        _run(home, "push", f"{reg.host}/team/app:1", f"docker://{reg.host}/team/copy:1", "--store",
             str(tmp_path / "s"))
        assert any(r["scope"] and "repository:team/app:pull" in r["scope"] and "repository:team/copy:pull,push"
                   in r["scope"] for r in issuer.requests)
