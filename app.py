"""The web app: train, predict and inspect the model in the browser.

    python app.py                      # http://127.0.0.1:7860
    python app.py --port 8000 --checkpoints-dir runs --data-dir ~/photos
    python app.py --host 0.0.0.0 --auth-file logins.txt --data-root /srv/class-photos   # for others

Runs offline; no share link unless --share is given. Reachable by others
(--host not loopback, or --share), it needs a login (--auth / --auth-file, or
an explicit --no-auth) and reads only its own folders and --data-root ones."""
from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import signal
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Gradio app for transfer learning with ResNet-18.")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it, and then "
                        "a login is required: --auth-file)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.add_argument("--checkpoints-dir", default=str(ROOT / "checkpoints"), help="where runs are saved and listed")
    p.add_argument("--data-dir", default=str(ROOT / "data"), help="default dataset folder (train/ and val/)")
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                   help="require this login (repeatable); prefer --auth-file, which keeps passwords out of the shell "
                        "history and the process list")
    p.add_argument("--auth-file", metavar="PATH",
                   help="logins from a file: one user:password per line (the password may contain ':'); blank "
                        "lines and lines starting with # are ignored")
    p.add_argument("--no-auth", action="store_true",
                   help="start reachable by others (--host not loopback, or --share) without a login: anyone who "
                        "reaches the port can use the app")
    p.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="when reachable by others: a folder whose images users may name (repeatable); the app's "
                        "own folders (--checkpoints-dir, --data-dir, uploads/) always are. On 127.0.0.1 every "
                        "folder is allowed")
    p.add_argument("--allow-pickle-uploads", action="store_true",
                   help="show 'Trust pickle' in the Predict tab, so pickled full-model files can be loaded: loading "
                        "one runs its code as you. Only with the default --host 127.0.0.1 (refused with --share)")
    return p


class FlagError(Exception):
    """A flag combination the app refuses; the message says what to pass instead."""


@dataclass
class Plan:
    """What the flags ask for: who may read what, the logins, and what to warn about."""
    exposed: bool
    auth: list[tuple[str, str]] | None
    data_roots: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_auth_file(path: str) -> tuple[list[tuple[str, str]], list[str]]:
    """-> (logins, warnings). Errors name the line, never echo a password."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FlagError(f"--auth-file {path} does not exist") from None
    except IsADirectoryError:
        raise FlagError(f"--auth-file {path} is a folder; give a file of user:password lines") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FlagError(f"cannot read --auth-file {path}: {getattr(e, 'strerror', None) or e}") from None
    logins = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        logins.append(parse_login(line, f"--auth-file {path} line {n}"))
    if not logins:
        raise FlagError(f"--auth-file {path} holds no user:password line")
    warnings = []
    if os.name == "posix" and p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(f"--auth-file {path} can be read by other users of this machine; chmod 600 it")
    return logins, warnings


def parse_login(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        raise FlagError(f"{where} must be USER:PASSWORD with both parts non-empty")
    return user.strip(), password


def plan(args) -> Plan:
    """Check the security flags together; raises FlagError."""
    exposed = args.share or not is_loopback(args.host)
    where = "--share" if args.share else f"--host {args.host}"
    if args.allow_pickle_uploads and exposed:
        raise FlagError(f"--allow-pickle-uploads cannot be used with {where}: loading a pickled file runs its code, "
                        f"so anyone who can reach the app could run programs on this machine. Use it only with "
                        f"--host 127.0.0.1")
    logins, warnings = [parse_login(a, "--auth") for a in args.auth], []
    if args.auth_file:
        more, warnings = read_auth_file(args.auth_file)
        logins += more
    users = [u for u, _ in logins]
    twice = sorted({u for u in users if users.count(u) > 1})
    if twice:
        raise FlagError(f"user {twice[0]!r} is given more than one password (--auth / --auth-file)")
    if args.no_auth and logins:
        raise FlagError("--no-auth contradicts --auth / --auth-file; give one or the other")
    if exposed and not logins and not args.no_auth:
        raise FlagError(f"{where} lets anyone who can reach port {args.port} use this app: give a login with "
                        f"--auth-file PATH (lines of user:password) or --auth USER:PASSWORD, or pass --no-auth to "
                        f"run it open anyway")
    roots = []
    for d in args.data_root:
        r = Path(d).expanduser()
        if not r.is_dir():
            raise FlagError(f"--data-root {d} is not a folder" + ("" if r.exists() else " (it does not exist)"))
        roots.append(r)
    if roots and not exposed:
        warnings.append("--data-root only matters when others can reach the app; on 127.0.0.1 any folder is allowed")
    if exposed:
        login = ("after logging in, " if logins else "WITHOUT A LOGIN (--no-auth), ")
        listening = "--share (a public link)" if args.share else f"listening on {args.host}"
        warnings.append(
            f"{listening}: anyone who can reach port {args.port}, {login}can use this app: train on this machine's "
            f"CPU/GPU, read the images in its folders (--checkpoints-dir, --data-dir, uploads/"
            f"{', --data-root' if roots else ''}) and download the checkpoints there. Uploaded pickled model files are "
            f"never loaded (unpickling would run their code on this machine). Logins travel unencrypted over http: "
            f"use it on a network you trust, or behind an HTTPS proxy. Use --host 127.0.0.1 unless you mean it.")
    return Plan(exposed, logins or None, roots, warnings)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen there (another app holds the port, the
    host is not this machine's); None if it can. A pre-check, so the error
    names our flags and comes before the app's URL is printed."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET  # what the server (uvicorn) binds
    try:
        addr = socket.getaddrinfo(bare, port, family, socket.SOCK_STREAM)[0][4]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            s.bind(addr)
    except socket.gaierror as e:
        return f"cannot resolve --host {host}: {e.strerror or e}"
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            other = port + 1 if port < 65535 else port - 1
            return f"port {port} on {host} is already in use; is the app already running? Try --port {other}"
        if e.errno == errno.EADDRNOTAVAIL:
            return f"--host {host} is not an address of this machine; use 127.0.0.1 (or 0.0.0.0 for all)"
        return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    if not 1 <= args.port <= 65535:
        print(f"error: --port must be 1..65535 (got {args.port})", file=sys.stderr)
        return 2
    try:
        settings = plan(args)  # before the slow imports: a refused combination says so at once
    except FlagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from cli.common import missing_package
    try:
        from core.access import AccessPolicy
        from core.device import configure_threads
        from demo_app.ui import build_app, launch_options  # gradio/torch import after flags parsed
    except ModuleNotFoundError as e:
        print(missing_package(e), file=sys.stderr)
        return 1

    configure_threads()

    for w in settings.warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    if args.share:
        print("WARNING: --share opens a public link through gradio.live (needs internet).", file=sys.stderr)
    uploads = ROOT / "uploads"
    try:
        options = launch_options(args.checkpoints_dir, args.data_dir, uploads)
    except OSError as e:
        print(f"error: cannot create the folder {e.filename}: {e.strerror}; "
              f"the app writes its checkpoints, data and uploads folders (--checkpoints-dir, --data-dir; uploads/ "
              f"beside app.py)", file=sys.stderr)
        return 2
    problem = port_problem(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    policy = AccessPolicy.make(settings.exposed, [args.checkpoints_dir, args.data_dir, uploads, *settings.data_roots],
                               args.allow_pickle_uploads)
    demo = build_app(args.checkpoints_dir, args.data_dir, uploads, policy=policy)
    if settings.auth:
        options.update(auth=settings.auth, auth_message="Log in with the user name and password you were given.")
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"Transfer-learning app: http://{shown}:{args.port}  (Ctrl-C to quit)", flush=True)
    # `kill`, `docker stop` and a closed terminal end the app as Ctrl-C does: Gradio then removes its cache copies
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    try:
        demo.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, share=args.share, inbrowser=False, quiet=True, **options)
    except OSError as e:
        print(f"error: cannot start the server on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
