"""The registry client's parts that need no server: references, platforms and index selection,
authentication challenges, the credentials files, registry error bodies, and import laziness."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyunionfs.errors import ImageError, UsageError
from pyunionfs.image.auth import (
    Challenge,
    Credentials,
    auth_files,
    find_credentials,
    forget_credentials,
    login_file,
    parse_challenges,
    save_credentials,
)
from pyunionfs.image.ocilayout import choose_platform
from pyunionfs.image.references import Platform, RegistryRef, check_transport, parse_reference
from pyunionfs.image.registry import _messages
from pyunionfs.image.remote import default_name

D = "sha256:" + "ab" * 32

# -- references ----------------------------------------------------------------------------


@pytest.mark.parametrize(("arg", "want"), [
    ("docker://127.0.0.1:5000/app:1", RegistryRef("127.0.0.1:5000", "app", "1")),
    ("docker://localhost/a/b/c", RegistryRef("localhost", "a/b/c")),
    ("docker://localhost:5000/app@" + D, RegistryRef("localhost:5000", "app", None, D)),
    ("docker://reg.example.com/team/app:v1.2-rc_3@" + D, RegistryRef("reg.example.com", "team/app", "v1.2-rc_3", D)),
    ("docker://[::1]:5000/app:1", RegistryRef("[::1]:5000", "app", "1")),
    ("docker://alpine", RegistryRef("docker.io", "library/alpine")),
    ("docker://alpine:3.19", RegistryRef("docker.io", "library/alpine", "3.19")),
    ("docker://bitnami/redis:7", RegistryRef("docker.io", "bitnami/redis", "7")),
    ("docker://docker.io/library/busybox:1", RegistryRef("docker.io", "library/busybox", "1")),
    ("docker://a__b/c--d/e.f:x", RegistryRef("docker.io", "a__b/c--d/e.f", "x")),
])
def test_references_parse_as_distribution_reads_them(arg: str, want: RegistryRef) -> None:
    assert parse_reference(arg) == want


@pytest.mark.parametrize("arg", [
    "docker://", "docker://Upper/app", "docker://h.io/app:", "docker://h.io/app:-x", "docker://h.io/app@sha256:12",
    "docker://h.io/app@md5:" + "0" * 32, "docker://h.io/-app", "docker://h.io//app", "docker://h.io/app/",
    "docker://h_o.io:5000/app", "docker://h.io:port/app", "127.0.0.1:5000/app",
])
def test_bad_references_are_usage_errors(arg: str) -> None:
    with pytest.raises(UsageError):
        parse_reference(arg)


def test_reference_properties() -> None:
    ref = parse_reference("docker://LocalHost:5000/app")
    assert ref.loopback and ref.hostname == "localhost"
    assert parse_reference("docker://[::1]:5000/x").loopback
    assert parse_reference("docker://127.0.0.2:5000/x").loopback
    assert not parse_reference("docker://reg.example.com/x").loopback
    hub = parse_reference("docker://alpine")
    assert (hub.host, hub.reference, str(hub)) == ("registry-1.docker.io", "latest", "docker://docker.io/library/alpine")
    pinned = parse_reference(f"docker://h.io:1/a:t@{D}")
    assert pinned.reference == D and str(pinned) == f"docker://h.io:1/a:t@{D}"
    assert default_name(pinned) == "h.io:1/a:t"
    assert default_name(parse_reference(f"docker://h.io:1/a@{D}")) == f"h.io:1/a:sha256-{'ab' * 6}"
    assert default_name(parse_reference("docker://H.io/a")) == "h.io/a:latest"


def test_other_schemes_are_refused_not_taken_as_paths() -> None:
    check_transport("docker://h/r:t")
    check_transport("some/dir:tag")
    check_transport("./oci://odd")  # ./ makes anything a path
    for arg in ("oci://x", "http://h/r", "docker-archive://x.tar", "s3://bucket/x"):
        with pytest.raises(UsageError, match="unknown transport"):
            check_transport(arg)


# -- platforms and indexes ----------------------------------------------------------------


def _index(*platforms: dict[str, str] | None) -> dict[str, object]:
    entries = []
    for i, plat in enumerate(platforms):
        entry: dict[str, object] = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                    "digest": "sha256:" + f"{i:02x}" * 32, "size": 10 + i}
        if plat is not None:
            entry["platform"] = plat
        entries.append(entry)
    return {"schemaVersion": 2, "manifests": entries}


def test_platform_parse_and_match() -> None:
    assert Platform.parse("linux/arm/v7") == Platform("linux", "arm", "v7")
    assert Platform.parse("linux/amd64").text == "linux/amd64"
    for bad in ("linux", "linux/", "a/b/c/d", "Linux/AMD64 "):
        with pytest.raises(UsageError):
            Platform.parse(bad)
    assert Platform("linux", "arm64").matches({"os": "linux", "architecture": "arm64", "variant": "v8"})
    assert Platform("linux", "arm64", "v8").matches({"os": "linux", "architecture": "arm64"})
    assert not Platform("linux", "arm", "v7").matches({"os": "linux", "architecture": "arm", "variant": "v6"})
    assert not Platform("linux", "amd64").matches({"os": "windows", "architecture": "amd64"})


def test_index_selection() -> None:
    index = _index(None, {"os": "linux", "architecture": "arm", "variant": "v6"},
                   {"os": "linux", "architecture": "arm", "variant": "v7"}, {"os": "linux", "architecture": "amd64"},
                   {"os": "linux", "architecture": "amd64"})
    assert choose_platform(index, Platform("linux", "arm", "v7"), "x").digest == "sha256:" + "02" * 32
    assert choose_platform(index, Platform("linux", "arm"), "x").digest == "sha256:" + "01" * 32  # the first
    assert choose_platform(index, Platform("linux", "amd64"), "x").digest == "sha256:" + "03" * 32
    with pytest.raises(ImageError, match=r"no manifest for linux/s390x .*\(it has linux/amd64, linux/arm/v6, "
                                         r"linux/arm/v7\)"):
        choose_platform(index, Platform("linux", "s390x"), "x")


def test_index_selection_defaults_to_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyunionfs.image import ocilayout

    monkeypatch.setattr(ocilayout.platform, "machine", lambda: "aarch64")
    index = _index({"os": "linux", "architecture": "amd64"}, {"os": "linux", "architecture": "arm64", "variant": "v8"})
    assert choose_platform(index, None, "x").digest == "sha256:" + "01" * 32


# -- challenges ---------------------------------------------------------------------------


def test_challenges_parse_as_registries_send_them() -> None:
    hub = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
           'scope="repository:library/alpine:pull"')
    assert parse_challenges(hub) == [Challenge("bearer", {
        "realm": "https://auth.docker.io/token", "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull"})]
    assert parse_challenges('Basic realm="Registry Realm"') == [Challenge("basic", {"realm": "Registry Realm"})]
    two = parse_challenges('Basic realm="a, b", Bearer realm="https://t/x?y=1", error="insufficient_scope", '
                           'scope="repository:a:pull repository:b:pull,push"')
    assert [c.scheme for c in two] == ["basic", "bearer"]
    assert two[0].params == {"realm": "a, b"}
    assert two[1].params["scope"].split() == ["repository:a:pull", "repository:b:pull,push"]
    assert parse_challenges('Bearer realm=tok, service=svc') == [Challenge("bearer", {"realm": "tok",
                                                                                       "service": "svc"})]
    assert parse_challenges('Basic realm="quo\\"ted"')[0].params["realm"] == 'quo"ted'
    assert parse_challenges("") == []
    assert parse_challenges("Negotiate") == [Challenge("negotiate", {})]


# -- the credentials files ------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    return tmp_path


def _write(path: Path, auths: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths}))


def _auth(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_auth_files_in_the_order_container_tools_read_them(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert auth_files() == [f"{home}/run/containers/auth.json", f"{home}/cfg/containers/auth.json",
                            f"{home}/.docker/config.json"]
    assert auth_files("/x.json") == ["/x.json"]
    monkeypatch.setenv("REGISTRY_AUTH_FILE", "/y.json")
    assert login_file() == "/y.json" and auth_files()[0] == "/y.json"
    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert login_file() == f"/run/containers/{os.geteuid()}/auth.json"


def test_credentials_found_most_specific_first(home: Path) -> None:
    _write(home / ".docker" / "config.json", {
        "https://index.docker.io/v1/": _auth("hubuser", "hubpw"),
        "reg.io:5000": _auth("docker", "pw:with:colons"),
        "other.io": {"username": "u", "password": "p"},
    })
    _write(home / "run" / "containers" / "auth.json", {"reg.io:5000/team": _auth("team", "tpw")})
    assert find_credentials("reg.io:5000", "team/app") == Credentials("team", "tpw")
    assert find_credentials("reg.io:5000", "solo/app") == Credentials("docker", "pw:with:colons")
    assert find_credentials("docker.io", "library/alpine") == Credentials("hubuser", "hubpw")
    assert find_credentials("other.io", "x") == Credentials("u", "p")
    assert find_credentials("nowhere.io", "x") is None


def test_malformed_auth_files_are_one_line(home: Path) -> None:
    path = home / ".docker" / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ImageError, match=r"config.json: not valid JSON"):
        find_credentials("r.io", "x")
    _write(path, {"r.io": {"auth": "!!!"}})
    with pytest.raises(ImageError, match=r"the auth of 'r.io' is not base64 of USER:PASSWORD"):
        find_credentials("r.io", "x")


def test_login_writes_podmans_file_and_keeps_the_rest(home: Path) -> None:
    path = home / "run" / "containers" / "auth.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"auths": {"keep.io": _auth("k", "k")}, "credHelpers": {"x.io": "pass"}}))
    assert save_credentials("reg.io:5000", Credentials("me", "pw")) == str(path)
    data = json.loads(path.read_text())
    assert data["credHelpers"] == {"x.io": "pass"}
    assert data["auths"] == {"keep.io": _auth("k", "k"), "reg.io:5000": _auth("me", "pw")}
    assert path.stat().st_mode & 0o777 == 0o600
    assert find_credentials("reg.io:5000", "a") == Credentials("me", "pw")
    assert forget_credentials("reg.io:5000") == str(path)
    assert forget_credentials("reg.io:5000") is None
    assert json.loads(path.read_text())["auths"] == {"keep.io": _auth("k", "k")}
    assert [p.name for p in path.parent.iterdir()] == ["auth.json"]  # no temporary left


def test_login_file_made_with_private_directory(home: Path) -> None:
    path = save_credentials("r.io", Credentials("a", "b"))
    assert path == f"{home}/run/containers/auth.json"
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700


# -- registry error bodies ------------------------------------------------------------------


def test_registry_errors_become_one_line() -> None:
    body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown",
                                   "detail": {"Tag": "x"}}]}).encode()
    assert _messages(body) == ": manifest unknown (MANIFEST_UNKNOWN)"
    many = json.dumps({"errors": [{"code": "A", "message": "one\ntwo"}, {"message": "three"}, "junk"]}).encode()
    assert _messages(many) == ": one two (A); three"
    assert _messages(b"<html>502</html>") == ""
    assert _messages(b'{"errors": "no"}') == ""
    assert len(_messages(json.dumps({"errors": [{"message": "x" * 1000}]}).encode())) <= 300


# -- what mount does not pay for --------------------------------------------------------------


def test_the_command_line_imports_no_http_library() -> None:
    """``pyunionfs mount`` start-up is measured: parsing any command line must not load urllib3."""
    code = ("import sys; from pyunionfs.cli import commands; p = commands._parser(); "
            "p.parse_args(['mount', 'a', 'b', 'c']); p.parse_args(['pull', 'docker://h.io/a']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('urllib3', 'ssl', 'http')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


# -- progress of parallel downloads -------------------------------------------------------------


def test_progress_shows_each_layer_under_way_on_a_terminal() -> None:
    import io

    from pyunionfs.image.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    p = Progress("pull x:1", 3, stream=out)
    p.start_layer("a" * 12, 100)
    p.start_layer("b" * 12, 1000)
    p.add(50, "a" * 12)
    p.add(250, "b" * 12)
    p.layer_done("a" * 12)
    assert out.getvalue().endswith("\rpull x:1: 1/3 layers, 300B | bbbbbbbbbbbb 25%\x1b[K")
    p.close()
    assert out.getvalue().endswith("\r\x1b[K")
    quiet = io.StringIO()
    q = Progress("pull x:1", 1, stream=quiet)
    q.start_layer("a" * 12, 10)
    q.add(10, "a" * 12)
    q.layer_done("a" * 12)
    q.close()
    assert quiet.getvalue() == ""  # a log gets lines only every few seconds, none for a quick command


def test_without_urllib3_a_registry_command_is_one_line(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['urllib3'] = None; from pyunionfs.cli import main; "
            f"sys.exit(main(['pull', 'docker://127.0.0.1:9/x:1', '--store', '{tmp_path}/store']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == (1, "pyunionfs: registries need the urllib3 package (pip install "
                                               "'urllib3>=2.3'; bash contrib/install.sh installs it)\n")
