"""Helpers shared by the command-line entry points."""
from __future__ import annotations

import argparse
import gc
import io
import os
import sys

from core.config import ARCHS
from core.errors import UserError, render

# Each setting's name on the command line ({setting} placeholders in core's texts).
FLAG_NAMES = {name: "--" + name.replace("_", "-") for name in (
    "data_dir", "device", "epochs", "batch_size", "lr", "weight_decay", "freeze_backbone", "unfreeze_last",
    "unfreeze_all", "policy", "seed", "num_workers", "amp", "dropout", "run_name", "print_model", "arch", "weights",
    "augment", "val_split", "output_dir", "resume", "export_state_dict", "export_full_model", "cache",
    "cache_budget_mb", "image_size", "image", "checkpoint", "topk", "random", "n", "all", "csv", "classes",
    "trust_pickle", "format", "out", "quantize", "cam", "cam_class", "data", "min_confidence")}
# A setting with a value, where the CLI words it other than "<flag> <value>".
CLI_CHOICES: dict[tuple[str, str], str] = {
    ("trust_pickle", "1"): "predict.py --trust-pickle 1 (in the app: tick 'trust pickle')",  # said by load_file
}


def say(text: str, field: str | None = None) -> str:
    """A text from core (error, warning, note) in the CLI's words."""
    return render(text, FLAG_NAMES, CLI_CHOICES, field)


def bool01(value: str) -> int:
    """The reference's 0/1 flags; also accepts true/false/yes/no."""
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return 1
    if v in ("0", "false", "no", "off"):
        return 0
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {value!r}")


def exit_fast(code: int) -> None:
    """sys.exit(code) without the ~0.7 s the interpreter spends at exit
    garbage-collecting torch's and torchvision's tens of thousands of module
    objects: gc.freeze() moves them out of the collector's reach. Every file is
    already written and closed; atexit handlers and stream flushes still run.
    Only for the __main__ path (a long-lived caller such as a test session
    keeps its normal collector)."""
    gc.freeze()
    sys.exit(code)


def add_model_file_args(p: argparse.ArgumentParser) -> None:
    """What reading a bare state_dict or a full model needs besides --checkpoint
    (predict.py, export.py: core.predict.Predictor.load's arch, classes, trust_pickle)."""
    a = p.add_argument
    a("--arch", default=None, type=str.lower, help="architecture of a bare state_dict (resnet18 | mobilenet_v2); guessed if omitted")
    a("--classes", default=None, help="comma-separated class names for a bare state_dict or full model")
    a("--trust-pickle", type=bool01, default=0, help="1: allow loading a full pickled model (runs code from the file!)")


def model_file_classes(args) -> list[str] | None:
    """--checkpoint and --arch checked before any file is read; --classes as a list (None: not given)."""
    if not args.checkpoint.strip():
        raise UserError("--checkpoint is empty; give a .pt file (e.g. checkpoints/RUN/best_acc.pt)")
    if args.arch is not None and args.arch not in ARCHS:
        raise UserError(f"--arch {args.arch!r} is not supported; choose {' or '.join(ARCHS)}")
    return [c.strip() for c in args.classes.split(",")] if args.classes else None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage block
    above it, which hides what was wrong); exit code 2 as before."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(fn) -> int:
    """Run `fn`; user errors become `error: ...` and exit code 2, never a traceback.
    Ctrl-C exits with 130. Environment problems (OSError) and internal errors
    print one line and exit 1; set TL_DEBUG=1 to see their traceback."""
    debug = bool(os.environ.get("TL_DEBUG"))
    try:
        return fn() or 0
    except UserError as e:
        print(f"error: {e.render(FLAG_NAMES, CLI_CHOICES)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        print(missing_package(e), file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and closed: not an error worth a message
        _silence_stdout()
        return 1
    except MemoryError:
        print("error: out of memory; try a smaller --batch-size or --cache-budget-mb", file=sys.stderr)
        return 1
    except OSError as e:
        if debug:
            raise
        print(f"error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return 1
    except Exception as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"internal error: {type(e).__name__}{': ' + msg if msg else ''} "
              f"(a bug; run with TL_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
        return 1


REQUIRED = ("torch", "torchvision", "PIL", "numpy", "tqdm", "gradio", "plotly")
PIP_NAMES = {"PIL": "pillow"}  # module -> the name pip installs it by


def missing_package(e: ModuleNotFoundError) -> str:
    """Not a bug: this Python is not the project's (README: setup, then .venv/bin/python).
    Names every missing package, not just the first one imported."""
    import importlib.util
    first = (e.name or "?").split(".")[0]
    missing = [first] + [m for m in REQUIRED if m != first and importlib.util.find_spec(m) is None]
    names = ", ".join(f"'{PIP_NAMES.get(m, m)}'" for m in missing)
    return (f"error: the package{'s' if len(missing) > 1 else ''} {names} {'are' if len(missing) > 1 else 'is'} not "
            f"installed for {sys.executable}. Run `bash scripts/setup.sh` once, then use .venv/bin/python "
            f"(or `source .venv/bin/activate` first).")


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise
    BrokenPipeError again (the recipe from the Python signal docs)."""
    try:
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass
