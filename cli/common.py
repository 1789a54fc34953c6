"""Helpers shared by the command-line entry points."""
from __future__ import annotations

import argparse
import os
import sys


def bool01(value: str) -> int:
    """The reference's 0/1 flags; also accepts true/false/yes/no."""
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return 1
    if v in ("0", "false", "no", "off"):
        return 0
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {value!r}")


def run_cli(fn) -> int:
    """Run `fn`; user errors become `error: ...` and exit code 2, never a traceback.
    Ctrl-C exits with 130. Set TL_DEBUG=1 to see tracebacks of internal errors."""
    from core.errors import UserError
    try:
        return fn() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; try a smaller --batch-size or --cache-budget-mb", file=sys.stderr)
        return 1
    except OSError as e:
        if os.environ.get("TL_DEBUG"):
            raise
        print(f"error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return 1
