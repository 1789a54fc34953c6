"""The web app: train, predict and inspect the model in the browser.

    python app.py                      # http://127.0.0.1:7860
    python app.py --port 8000 --checkpoints-dir runs --data-dir ~/photos

Runs offline; no share link unless --share is given."""
from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Gradio app for transfer learning with ResNet-18.")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.add_argument("--checkpoints-dir", default=str(ROOT / "checkpoints"), help="where runs are saved and listed")
    p.add_argument("--data-dir", default=str(ROOT / "data"), help="default dataset folder (train/ and val/)")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
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
    sys.path.insert(0, str(ROOT))
    from cli.common import missing_package
    try:
        from core.device import configure_threads
        from demo_app.ui import build_app, launch_options  # gradio/torch import after flags parsed
    except ModuleNotFoundError as e:
        print(missing_package(e), file=sys.stderr)
        return 1

    configure_threads()

    if not is_loopback(args.host):
        print(f"WARNING: listening on {args.host}: anyone who can reach port {args.port} can use this app, "
              f"train on this machine's CPU/GPU, read image folders by path and download checkpoints. "
              f"Use --host 127.0.0.1 unless you mean it.", file=sys.stderr)
    if args.share:
        print("WARNING: --share opens a public link through gradio.live (needs internet).", file=sys.stderr)
    try:
        options = launch_options(args.checkpoints_dir, args.data_dir, ROOT / "uploads")
    except OSError as e:
        print(f"error: cannot create the folder {e.filename}: {e.strerror}; "
              f"the app writes its checkpoints, data and uploads folders (--checkpoints-dir, --data-dir; uploads/ "
              f"beside app.py)", file=sys.stderr)
        return 2
    problem = port_problem(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    demo = build_app(args.checkpoints_dir, args.data_dir)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"Transfer-learning app: http://{shown}:{args.port}  (Ctrl-C to quit)", flush=True)
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
