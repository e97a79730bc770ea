"""The registry side of the command line: ``pull``/``push`` to ``docker://``, ``login``, ``logout``.

Option names are podman's and skopeo's, so a user's habits carry over:
``--tls-verify=false``, ``--creds USER[:PASSWORD]``, ``--authfile FILE``,
``--platform OS/ARCH[/VARIANT]``, and ``login -u USER -p PASSWORD |
--password-stdin``.  Everything registry-specific is imported when a registry
command runs: ``pyunionfs mount`` never loads an HTTP library.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from ..image.auth import Credentials
    from ..image.compression import Compression
    from ..image.remote import RegistryOptions
    from ..image.store import Store


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def add_connection_options(p: argparse.ArgumentParser, *, creds: bool = True) -> None:
    """--tls-verify, --authfile (and --creds): how a registry is reached, as podman spells them."""
    p.add_argument("--tls-verify", metavar="BOOL", type=_bool, nargs="?", const=True, default=None,
                   help="docker:// only: check the registry's TLS certificate (default true); false also allows "
                        "plain HTTP, which 127.0.0.1, ::1 and localhost get without asking")
    p.add_argument("--authfile", metavar="FILE",
                   help="docker:// only: credentials file (default: $REGISTRY_AUTH_FILE, "
                        "$XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json)")
    if creds:
        p.add_argument("--creds", metavar="USER[:PASSWORD]",
                       help="docker:// only: credentials for the registry (the password asked for if left out)")


def options(args: argparse.Namespace, remote: bool) -> RegistryOptions:
    """The registry options of *args*; given with a layout they are a usage error, not ignored."""
    from ..image.remote import RegistryOptions

    given = [f"--{n.replace('_', '-')}" for n in ("tls_verify", "authfile", "creds", "platform")
             if getattr(args, n, None) is not None]
    if not remote:
        wrong = [g for g in given if g != "--platform"]
        if wrong:
            raise UsageError(f"{', '.join(wrong)} {'goes' if len(wrong) == 1 else 'go'} with docker:// references, "
                             "not a layout directory")
        return RegistryOptions()
    creds = _parse_creds(args.creds) if getattr(args, "creds", None) is not None else None
    return RegistryOptions(tls_verify=args.tls_verify is not False, creds=creds, authfile=args.authfile)


def _parse_creds(text: str) -> Credentials:
    from ..image.auth import Credentials

    user, sep, password = text.partition(":")
    if not user:
        raise UsageError("--creds: want USER[:PASSWORD]")
    if not sep:
        password = _ask_password()
    return Credentials(user, password)


def _ask_password() -> str:
    if not sys.stdin.isatty():
        raise UsageError("no password given, and no terminal to ask for one (use --password-stdin or USER:PASSWORD)")
    import getpass

    return getpass.getpass("Password: ")


def add_login_parsers(sub: argparse._SubParsersAction) -> None:
    """``login`` and ``logout``: credentials in the file podman keeps them in."""
    li = sub.add_parser("login", help="check and record credentials for a registry (as podman login does)")
    li.add_argument("registry", metavar="HOST[:PORT]")
    li.add_argument("-u", "--username", metavar="USER")
    li.add_argument("-p", "--password", metavar="PASSWORD", help="(seen by other users in ps: prefer --password-stdin)")
    li.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add_connection_options(li, creds=False)
    lo = sub.add_parser("logout", help="remove the credentials login recorded for a registry")
    lo.add_argument("registry", metavar="HOST[:PORT]")
    lo.add_argument("--authfile", metavar="FILE", help="the credentials file (default: the one login writes)")


def login_command(args: argparse.Namespace) -> int:
    from ..errors import ImageError
    from ..image.auth import Credentials, forget_credentials
    from ..image.remote import RegistryOptions, login

    registry = args.registry.removeprefix("docker://").rstrip("/")
    if "/" in registry:
        raise UsageError(f"{args.registry}: name a registry HOST[:PORT], not a repository")
    if args.command == "logout":
        path = forget_credentials(registry, args.authfile)
        if path is None:
            raise ImageError(f"not logged in to {registry}")
        print(f"Removed login credentials for {registry}")
        return 0
    user = args.username
    if not user:
        if not sys.stdin.isatty():
            raise UsageError("login: no -u USER, and no terminal to ask for one")
        user = input("Username: ").strip()
    if args.password_stdin:
        if args.password is not None:
            raise UsageError("login: -p and --password-stdin both give the password: give one")
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = args.password if args.password is not None else _ask_password()
    opts = RegistryOptions(tls_verify=args.tls_verify is not False, authfile=args.authfile)
    path = login(registry, Credentials(user, password), opts)
    print(f"Login Succeeded! (credentials in {path})")
    return 0


def pull(store: Store, args: argparse.Namespace, opts: RegistryOptions) -> None:
    """``pull docker://...``: the image, recorded under --tag or HOST[:PORT]/REPO:TAG."""
    from ..image.references import Platform
    from ..image.remote import pull_remote

    platform = Platform.parse(args.platform) if args.platform else None
    img = pull_remote(store, args.source, args.tag, platform, opts)
    print(f"{img.name}  {img.id}  {img.manifest_digest}")


def push(store: Store, args: argparse.Namespace, compress: Compression | None, opts: RegistryOptions) -> None:
    """``push IMAGE docker://...``: one line, the image, its manifest digest and where it went."""
    from ..image.remote import push_remote

    img, tag, desc, _ = push_remote(store, args.image, args.dest, compress, convert=args.compress is not None,
                                    options=opts)
    dest = args.dest if args.dest.endswith(":" + tag) else f"{args.dest}:{tag}"
    print(f"{img.name}  {desc.digest}  {dest}")
