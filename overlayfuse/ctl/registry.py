"""``overlayctl pull``, ``push``, ``login``, ``logout`` (also as ``image pull`` and ``image push``).

Parsing and printing only; the work is in `overlayfuse.images.registry`, imported when one of these
commands runs (the HTTP client alone takes ~40 ms to import). Flags follow podman's:
``--creds``, ``--authfile``, ``--cert-dir``, ``--tls-verify``, ``--platform``, ``--quiet``, plus
``--retry``/``--retry-delay`` for the bounded retries of connection errors, 429 and 5xx.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..images.registry.client import Options
    from ..images.registry.credentials import Credentials

log = logging.getLogger(__name__)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _seconds(text: str) -> float:
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (like 2 or 0.5s), not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a delay cannot be negative")
    return value


def _connection_flags(parser: argparse.ArgumentParser, retries: bool = True) -> None:
    parser.add_argument("--creds", metavar="USER:PASSWORD", help="credentials (default: the auth files)")
    parser.add_argument("--authfile", metavar="FILE",
                        help="auth file (default: $REGISTRY_AUTH_FILE, else podman's and docker's)")
    parser.add_argument("--cert-dir", metavar="DIR", help="a dir with ca.crt, and client.cert/client.key")
    parser.add_argument("--tls-verify", type=_bool, nargs="?", const=True, default=True, metavar="BOOL",
                        help="verify TLS (default true); false also allows plain HTTP")
    if retries:
        parser.add_argument("--retry", type=int, default=3, metavar="N",
                            help="retries for connection errors, 429 and 5xx (default 3)")
        parser.add_argument("--retry-delay", type=_seconds, default=1.0, metavar="SECONDS",
                            help="first wait before a retry, doubled each time (default 1s)")


def _options(args: argparse.Namespace) -> Options:
    from ..images.registry.client import Options
    from ..images.registry.credentials import parse_creds

    creds = parse_creds(args.creds) if args.creds else None
    return Options(creds=creds, authfile=args.authfile, cert_dir=args.cert_dir, tls_verify=args.tls_verify,
                   retries=max(0, getattr(args, "retry", 3)), retry_delay=getattr(args, "retry_delay", 1.0))


def add_transfer_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``pull`` and ``push`` into SUB (the top level, and ``image``)."""
    p = sub.add_parser("pull", help="pull an image from a registry",
                       description="Pull REF (host[:port]/repo[:tag][@digest]; a short name means docker.io) "
                                   "into the store, named by its full reference.")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="from a multi-platform image (default: this machine)")
    p.add_argument("--quiet", "-q", action="store_true", help="print the image id only")
    _connection_flags(p)
    p.set_defaults(handler=cmd_pull)

    p = sub.add_parser("push", help="push an image to a registry",
                       description="Push IMAGE (a name or id in the store) to DEST (default: IMAGE's name).")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("dest", metavar="DEST", nargs="?")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    _connection_flags(p)
    p.set_defaults(handler=cmd_push)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``pull``, ``push``, ``login``, ``logout`` at the top level."""
    add_transfer_commands(commands)
    p = commands.add_parser("login", help="store credentials for a registry (checked first)")
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("--username", "-u", metavar="USER")
    p.add_argument("--password", "-p", metavar="PASSWORD", help="insecure: use --password-stdin")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    _connection_flags(p)
    p.set_defaults(handler=cmd_login)

    p = commands.add_parser("logout", help="forget the credentials for a registry")
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("--authfile", metavar="FILE")
    p.set_defaults(handler=cmd_logout)


def cmd_pull(args: argparse.Namespace) -> int:
    from ..images.progress import Progress
    from ..images.registry.progress import Transfers
    from ..images.registry.pull import parse_platform, pull_image
    from ..images.store import Store

    platform = parse_platform(args.platform)
    with Store.creating(args.root) as store:
        result = pull_image(store, args.ref, _options(args), platform, Transfers(quiet=args.quiet),
                            Progress(enabled=False) if args.quiet else Progress())
    if args.quiet:
        print(result.imported.image.id)
        return 0
    print(f"Pulled {result.ref} ({result.manifest_digest}): {result.downloaded} layers downloaded, "
          f"{result.present} already in the store")
    print(f"Image ID: {result.imported.image.id}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from ..images.registry.progress import Transfers
    from ..images.registry.push import push_image
    from ..images.store import Store

    store = Store.existing(args.root)
    result = push_image(store, args.image, args.dest, _options(args), Transfers(quiet=args.quiet))
    if not args.quiet:
        print(f"Pushed {result.ref} ({result.manifest_digest}): {result.uploaded} blobs uploaded, "
              f"{result.mounted} mounted, {result.skipped} already there")
    return 0


def _login_credentials(args: argparse.Namespace) -> Credentials:
    from ..images.registry.credentials import Credentials, parse_creds

    if args.creds:
        return parse_creds(args.creds)
    username = args.username
    if not username:
        if args.password_stdin or not sys.stdin.isatty():
            raise UserError("login: give --username (or --creds USER:PASSWORD)")
        username = input("Username: ").strip()
    if args.password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif args.password is not None:
        password = args.password
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        raise UserError("login: no terminal to ask the password on: use --password-stdin")
    if not username or not password:
        raise UserError("login: the user name and the password must not be empty")
    return Credentials(username, password)


def cmd_login(args: argparse.Namespace) -> int:
    from ..images.registry.client import Options, Session
    from ..images.registry.credentials import store_credentials
    from ..images.registry.reference import normalize_registry

    registry = normalize_registry(args.registry)
    creds = _login_credentials(args)
    options = Options(creds=creds, authfile=args.authfile, cert_dir=args.cert_dir, tls_verify=args.tls_verify,
                      retries=max(0, args.retry), retry_delay=args.retry_delay)
    with Session("registry-1.docker.io" if registry == "docker.io" else registry, options) as session:
        session.check_login()
    path = store_credentials(registry, creds, args.authfile)
    log.info("credentials for %s written to %s", registry, path)
    print("Login Succeeded!")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from ..images.registry.credentials import remove_credentials, write_target
    from ..images.registry.reference import RegistryError, normalize_registry

    registry = normalize_registry(args.registry)
    path = remove_credentials(registry, args.authfile)
    if path is None:
        raise RegistryError(f"not logged in to {registry} (no entry in {write_target(args.authfile)})")
    print(f"Removed login credentials for {registry}")
    return 0
