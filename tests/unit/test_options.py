"""The option table and everything that reads it: each consumer must agree with it.

If a test here fails after a change to pyunionfs/options.py, a consumer (the
``pyunionfs mount -o`` validation, ``--help``, the drop-in form or
docs/options.md) no longer says what the table says.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyunionfs.cli import commands, dropin
from pyunionfs.config import MOUNT_FLAG_PAIRS, build_config, mount_flags
from pyunionfs.errors import UsageError
from pyunionfs.options import (
    DROPIN,
    TABLE,
    Form,
    Kind,
    Option,
    Use,
    lookup,
    markdown,
    option,
    plain,
    read,
    taken_by,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "options.md"


def good_value(o: Option, tmp: Path) -> str | None:
    """A value *o* takes (None: a flag), for the accept-everything tests."""
    if o.kind is Kind.FLAG:
        return None
    if o.name == "workdir":
        return str(tmp / "work")
    if o.choices:
        return o.default or o.choices[-1]
    if o.kind in (Kind.INT, Kind.NUMBER):
        return f"{o.low or 0:g}" if o.low else "7"
    if o.name in ("uidmapping", "gidmapping"):
        return "1000:0:1"
    return "some-text"


def item(o: Option, value: str | None) -> str:
    return o.name if value is None else f"{o.name}={value}"


@pytest.fixture
def dirs(tmp_path: Path) -> Path:
    for d in ("l", "u", "m"):
        (tmp_path / d).mkdir()
    return tmp_path


def mount_args(dirs: Path) -> tuple[str, str, str]:
    return str(dirs / "l"), str(dirs / "u"), str(dirs / "m")


# -- the table itself ----------------------------------------------------------------------


def test_rows_are_well_formed() -> None:
    names = [o.name for o in TABLE]
    assert len(names) == len(set(names)), "an option is in the table twice"
    for o in TABLE:
        assert o.forms, o
        assert o.use is not Use.REFUSED or o.help, f"{o.name}: a refusal needs its reason"
        assert (o.kind is Kind.CHOICE) == bool(o.choices), o
        assert o.kind in (Kind.FLAG, Kind.CHOICE) or o.metavar, f"{o.name}: a value needs a placeholder"
        if o.default is not None:
            o.validate(o.default)  # a default the option itself would refuse is a bug
        assert not o.quiet or o.use is Use.WARNED, o
        if o.opposite is not None:
            assert option(o.opposite).opposite == o.name, f"{o.name}/{o.opposite} is not a pair both ways"
        # one parser reads both drop-in forms: they cannot take different options
        assert (Form.OVERLAY in o.forms) == (Form.FUSE3 in o.forms), o
        assert o.use is Use.HONOURED or o.use is Use.REFUSED or o.forms == DROPIN, (
            f"{o.name}: pyunionfs mount refuses what it does not honour; only the drop-in forms ignore options")


def test_every_option_of_the_mount_command_is_in_the_drop_in_forms() -> None:
    """The drop-in forms mount through build_config: whatever it takes, they take."""
    assert set(taken_by(Form.MOUNT)) <= set(taken_by(Form.OVERLAY))
    honoured = {o.name for o in taken_by(Form.OVERLAY) if o.use is Use.HONOURED}
    assert honoured - {o.name for o in taken_by(Form.MOUNT)} == {"lowerdir", "upperdir"}


def test_kernel_mount_flag_pairs_come_from_the_table() -> None:
    assert MOUNT_FLAG_PAIRS == (("dev", "nodev"), ("suid", "nosuid"), ("exec", "noexec"), ("async", "sync"),
                                ("atime", "noatime"))
    assert {n for pair in MOUNT_FLAG_PAIRS for n in pair} == {o.name for o in TABLE if o.opposite}
    assert mount_flags(["nodev,noatime,dev", "sync", "atime"]) == ("dev", "sync", "atime")


def test_lookup_knows_prefixes_in_any_case() -> None:
    assert lookup("x-systemd.requires") is lookup("X-mount.mkdir") is option("x-")
    assert lookup("timeout") is option("timeout")
    assert lookup("frobnicate") is None


# -- validation: pyunionfs mount -o (build_config) ------------------------------------------


@pytest.mark.parametrize("o", [o for o in taken_by(Form.MOUNT) if o.use is Use.HONOURED], ids=lambda o: o.name)
def test_build_config_takes_every_option_the_table_gives_it(dirs: Path, o: Option) -> None:
    cfg = build_config(*mount_args(dirs), [item(o, good_value(o, dirs))])
    assert cfg.lowers == (os.fsencode(str(dirs / "l")),) or o.name == "ro"


@pytest.mark.parametrize("o", [o for o in TABLE if Form.MOUNT not in o.forms], ids=lambda o: o.name)
def test_build_config_refuses_options_only_the_drop_in_forms_take(dirs: Path, o: Option) -> None:
    with pytest.raises(UsageError, match=f"^unknown option '{o.name}'"):
        build_config(*mount_args(dirs), [item(o, good_value(o, dirs))])


def bad_values(o: Option) -> list[str | None]:
    """Values (None: no ``=``) the table says *o* does not take."""
    if o.kind is Kind.FLAG:
        return ["1", ""]
    bad: list[str | None] = [None]
    if o.kind is Kind.CHOICE:
        bad += ["bogus", *sorted({o.choices[0].upper(), "9"} - set(o.choices))]  # (digits have no upper case)
    elif o.kind in (Kind.INT, Kind.NUMBER):
        bad += ["many", "", "-1", "nan" if o.kind is Kind.NUMBER else "1.5"]
    elif o.check is not None:
        bad += ["", "a\tb"]
    return bad


@pytest.mark.parametrize("o", [o for o in taken_by(Form.MOUNT) if o.use is Use.HONOURED], ids=lambda o: o.name)
def test_bad_values_are_one_line_naming_the_option(dirs: Path, o: Option) -> None:
    for value in bad_values(o):
        for parse in (lambda opt: build_config(*mount_args(dirs), [opt]),
                      lambda opt: dropin.parse_argv(["-o", f"lowerdir=/a,{opt}", "/m"])):
            with pytest.raises(UsageError) as info:
                parse(item(o, value))
            message = str(info.value)
            assert "\n" not in message and o.name in message, (value, message)


def test_unknown_options_name_the_closest_one(dirs: Path) -> None:
    with pytest.raises(UsageError, match=r"^unknown option 'timout' \(did you mean 'timeout'\?\)$"):
        build_config(*mount_args(dirs), ["ro,timout=5"])
    with pytest.raises(UsageError, match=r"^unknown option 'frobnicate' \(see pyunionfs mount --help\)$"):
        build_config(*mount_args(dirs), ["frobnicate"])
    with pytest.raises(UsageError, match=r"^unknown option 'volatilee' \(did you mean 'volatile'\?\)$"):
        dropin.parse_argv(["-o", "lowerdir=/a,volatilee", "/m"])
    with pytest.raises(UsageError, match=r"^unknown option 'frobnicate' \(pyunionfs --help lists them\)$"):
        dropin.parse_argv(["src", "/m", "-o", "lowerdir=/a,frobnicate"])
    # the suggestion is one the form takes: mount -o has no upperdir=
    with pytest.raises(UsageError, match=r"^unknown option 'upperdr'") as info:
        build_config(*mount_args(dirs), ["upperdr=/x"])
    assert "'upperdir'" not in str(info.value)


def test_read_keeps_escapes_for_the_value_reader_and_the_last_of_a_repeat_wins(dirs: Path) -> None:
    given = read([r"lowerdir=/a\:b:/c,fsname=x\,y", "timeout=1", "timeout=2"], Form.OVERLAY, "/m")
    assert [(g.key, g.raw, g.value) for g in given] == [
        ("lowerdir", r"/a\:b:/c", "/a:b:/c"), ("fsname", r"x\,y", "x,y"), ("timeout", "1", "1"),
        ("timeout", "2", "2")]
    assert build_config(*mount_args(dirs), ["timeout=1", "timeout=2"]).timeout == 2.0


def test_defaults_come_from_the_table(dirs: Path) -> None:
    cfg = build_config(*mount_args(dirs), [])
    assert cfg.timeout == float(option("timeout").default or "")
    assert cfg.engine == option("engine").default
    assert cfg.fsname == option("fsname").default
    assert cfg.oci_whiteouts is (option("oci_whiteouts").default == "on")
    assert cfg.passthrough is (option("passthrough").default == "on")


# -- the drop-in forms ---------------------------------------------------------------------


@pytest.mark.parametrize("source", [None, "pyunionfs"], ids=["fuse-overlayfs", "mount.fuse3"])
def test_the_drop_in_forms_take_every_option_and_do_what_the_table_says(source: str | None) -> None:
    for o in taken_by(Form.OVERLAY):
        if o.use is Use.REFUSED:
            with pytest.raises(UsageError, match=f"^{o.name} is not supported: unmount /m and mount it again"):
                dropin.parse_argv([*([source] if source else []), "/m", "-o", f"lowerdir=/a,{o.name}"])
            continue
        value = "x-systemd.after=y" if o.prefix else item(o, good_value(o, Path("/tmp")))
        argv = [*([source] if source else []), "/m", "-o", f"lowerdir=/a,{value}"]
        inv = dropin.parse_argv(argv)
        passed = o.use is Use.HONOURED and o.name not in ("lowerdir", "upperdir", "workdir", "rw")
        assert (value in inv.options) is passed, (o.name, inv.options)
        assert len(inv.warnings) == (o.use is Use.WARNED and value.partition("=")[2] not in o.quiet), o.name
        if inv.warnings:
            assert inv.warnings[0].startswith(f"{o.name}") and plain(o.help) in inv.warnings[0]


def test_xattr_permissions_is_honoured_and_checked() -> None:
    for value in ("0", "1", "2"):
        inv = dropin.parse_argv(["/m", "-o", f"lowerdir=/a,xattr_permissions={value}"])
        assert inv.warnings == [] and f"xattr_permissions={value}" in inv.options
    with pytest.raises(UsageError, match=r"^xattr_permissions must be one of 0, 1, 2, not '3'$"):
        dropin.parse_argv(["/m", "-o", "lowerdir=/a,xattr_permissions=3"])


# -- help and docs ---------------------------------------------------------------------------


def help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        commands.main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_mount_help_lists_every_option_it_takes(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(["mount", "--help"], capsys)
    listed = text[text.index("options for -o"):text.index("positional arguments")]
    for o in taken_by(Form.MOUNT):
        if o.use is Use.HONOURED:
            line = next((ln for ln in listed.splitlines() if ln.split()[:1] == [o.spelling]), None)
            assert line is not None, f"pyunionfs mount --help lacks {o.spelling}"
            assert plain(o.help)[:40] in line, line
            if o.default is not None:
                assert f"(default {o.default})" in line, line
    names = {ln.split()[0] for ln in listed.splitlines()[1:] if ln.strip()}
    assert names == {o.spelling for o in taken_by(Form.MOUNT) if o.use is Use.HONOURED}


def test_drop_in_help_lists_every_option_by_what_is_done(capsys: pytest.CaptureFixture[str]) -> None:
    text = dropin.help_text()
    assert help_of(["--help"], capsys).rstrip().endswith(text.rstrip())  # the top-level epilog
    words = " ".join(text.split())
    honoured = words[words.index("honoured options:"):words.index("ignored options:")].split()[2:]
    ignored = words[words.index("ignored options:"):words.index("and anything else is refused")].split()[2:]
    assert honoured == [o.spelling for o in TABLE if o.use is Use.HONOURED and Form.OVERLAY in o.forms]
    assert ignored[:-1] == [o.spelling for o in TABLE if o.use in (Use.IGNORED, Use.WARNED)]
    assert ignored[-1] == "remount"


def test_docs_options_md_is_the_rendering_of_the_table() -> None:
    assert DOC.read_text() == markdown(), (
        "docs/options.md differs from the option table: regenerate it with "
        "`python -m pyunionfs.options > docs/options.md`")
    rows = [ln for ln in markdown().splitlines() if ln.startswith("| `")]
    assert [r.split(" | ")[0][3:-1].replace("\\|", "|") for r in rows] == [o.spelling for o in TABLE]


def test_the_regeneration_command_prints_the_rendering() -> None:
    res = subprocess.run([sys.executable, "-m", "pyunionfs.options"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stdout == markdown()
