"""Print a training run in the reference's format while the engine runs."""
from __future__ import annotations

import os
import signal
import sys
import threading

from tqdm import tqdm

from cli.common import say
from core import distributed
from core.config import TrainConfig
from core.engine import train
from core.events import BatchProgress, EpochEnded, LogLine, RunEnded, RunStarted, log_lines, notice_lines


def print_training(cfg: TrainConfig, print_model: bool = False, notes=(), resume_checkpoint: dict | None = None) -> int:
    stop = threading.Event()
    # First Ctrl-C: finish cleanly between batches (completed epochs stay saved); second: abort.
    # Under torchrun, Ctrl-C or SIGTERM (torchrun forwards both, and the terminal's
    # Ctrl-C reaches every rank too) stops every rank between the same batches;
    # repeats are not escalated (torchrun kills what is left after 30 s). Only rank 0 prints.
    group = distributed.current()
    handler = (lambda *_: _request_stop(stop, quiet=not group.main, escalate=False)) if group else \
        (lambda *_: _request_stop(stop))
    previous = signal.signal(signal.SIGINT, handler)
    previous_term = signal.signal(signal.SIGTERM, handler) if group else None
    bar = None
    try:
        for ev in train(cfg, stop, resume_checkpoint):
            if group and not group.main:  # silent; TL_DEBUG=1: its own (all-reduced) EPOCH lines on stderr, marked
                if isinstance(ev, EpochEnded) and os.environ.get("TL_DEBUG"):
                    for line in log_lines(ev):
                        if line.text.startswith("EPOCH"):
                            print(f"[rank {group.rank}] {say(line.text)}", file=sys.stderr, flush=True)
                if isinstance(ev, RunEnded):
                    return {"completed": 0, "stopped": 130, "diverged": 3}[ev.status]
                continue
            match ev:
                case BatchProgress():
                    bar = update_bar(bar, ev)
                case RunStarted():
                    bar = close_bar(bar)
                    print_start(ev, print_model, notes)
                case RunEnded():
                    bar = close_bar(bar)
                    print_lines(log_lines(ev))
                    return {"completed": 0, "stopped": 130, "diverged": 3}[ev.status]
                case _:
                    bar = close_bar(bar)
                    print_lines(log_lines(ev))
    finally:
        close_bar(bar)
        signal.signal(signal.SIGINT, previous)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return 0


def print_lines(lines: list[LogLine]) -> None:
    for line in lines:
        print(say(line.text), file=sys.stderr if line.stderr else sys.stdout)
    sys.stdout.flush()
    sys.stderr.flush()


def _request_stop(stop: threading.Event, quiet: bool = False, escalate: bool = True) -> None:
    if stop.is_set():
        if escalate:
            raise KeyboardInterrupt
        return
    if not quiet:
        print("\nstopping after the current batch (Ctrl-C again to abort)...", file=sys.stderr, flush=True)
    stop.set()


def print_start(ev: RunStarted, print_model: bool, notes=()) -> None:
    cfg, classes = ev.config, ev.dataset.classes
    print(say("\n".join(ev.header_lines())))
    if print_model:
        from core.models import build_model
        from core.summary import print_model_report
        model = build_model(cfg.arch, len(classes), cfg.dropout, "none")
        print("\n".join(print_model_report(cfg.arch, model, len(classes), cfg.dropout)))
    print_lines(notice_lines(ev, notes))


def update_bar(bar, ev: BatchProgress):
    desc = ev.phase if ev.phase in ("cache", "decode") else f"epoch {ev.epoch} {ev.phase}"
    if bar is None or bar.tl_key != (desc, ev.total):
        close_bar(bar)
        # disable=None: no bar when stderr is not a terminal (logs stay clean)
        bar = tqdm(total=ev.total, desc=desc, unit="img" if ev.phase in ("cache", "decode") else "batch",
                   leave=False, file=sys.stderr, dynamic_ncols=True, disable=None)
        bar.tl_key = (desc, ev.total)
    bar.n = ev.step
    bar.refresh()
    return bar


def close_bar(bar):
    if bar is not None:
        bar.close()
    return None
