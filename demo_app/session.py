"""The app's training service: one run at a time across all browser sessions.

The engine (core.engine.train) runs in a worker thread owned by the service;
the Start handler only follows its events through a queue. So a closed browser
tab never leaves the engine half-iterated holding the lock, and Stop works from
any session (there is only one run to stop)."""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Iterator

from cli.common import say as cli_words
from core.config import TrainConfig
from core.engine import train
from core.errors import UserError
from core.events import BatchProgress, EpochEnded, RunEnded, RunStarted
from core.events import log_lines as core_log_lines

from .messages import os_error_text

log = logging.getLogger("demo_app")


# A run's random init and dropout come from torch's global RNG, seeded by the
# engine. Nothing else in the app draws from it (the Model tab and predictors
# build their models on the meta device), so a run in the app matches the same
# command in the CLI.


def history_row(ev: EpochEnded) -> dict:
    """An epoch as the app's table and charts take it: the metrics row, plus whether it is the new best."""
    return {**ev.as_row(), "best": ev.best_acc}


def log_lines(ev) -> list[str]:
    """The CLI's lines for an engine event (or a Failed), in the CLI's words: the app's run log."""
    if isinstance(ev, Failed):
        return [f"ERROR: {cli_words(ev.error.message, ev.error.field)}"]
    return [cli_words(line.text) for line in core_log_lines(ev)]


class BusyError(UserError):
    """A second Start while a run is in progress."""


@dataclass
class Failed:
    """The run could not start or crashed: `error` says why, for each screen to word."""
    error: UserError

    @property
    def kind(self) -> str:
        return type(self.error).__name__  # the core.errors class name


_DONE = object()


@dataclass
class RunHandle:
    cfg: TrainConfig
    stop_event: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)
    started_at: float = field(default_factory=time.time)
    run_dir: str | None = None
    epoch: int = 0
    phase: str = "setup"
    progress: tuple[int, int] = (0, 0)  # (done, total) of the current phase
    ended: RunEnded | None = None
    history: list[dict] = field(default_factory=list)  # epoch rows so far, for pages that join late
    log: list[str] = field(default_factory=list)  # the run log so far (replaced, never changed in place)
    failed: Failed | None = None

    def follow(self) -> Iterator:
        """Every engine event (and a final Failed, if any) until the worker is done."""
        return iter(self.events.get, _DONE)

    def describe(self) -> str:
        name = self.run_dir.rsplit("/", 1)[-1] if self.run_dir else self.cfg.run_name
        done, total = self.progress
        where = {"setup": "setting up", "run": "setting up", "decode": "decoding images",  # (per split: no total)
                 "cache": f"running the frozen layers once per image, {done}/{total}"}.get(
            self.phase, f"epoch {max(self.epoch, 1)}/{self.cfg.epochs}, {self.phase} batch {done}/{total}")
        return f"{name} ({self.cfg.policy}, {where}, started {time.time() - self.started_at:.0f} s ago)"


class TrainingService:
    def __init__(self):
        self._lock = threading.Lock()  # held for the whole run by the worker
        self.current: RunHandle | None = None

    def start(self, cfg: TrainConfig) -> RunHandle:
        """Start `cfg` in a worker thread, or raise BusyError at once."""
        cfg.validate()
        if not self._lock.acquire(blocking=False):
            h = self.current
            what = f": {h.describe()}" if h is not None else ""
            raise BusyError(f"A training run is already in progress{what}. Only one run trains at a time "
                            f"(across all browser tabs); wait for it to finish or press Stop.")
        try:
            handle = RunHandle(cfg)
            self.current = handle
            threading.Thread(target=self._work, args=(handle,), name="tl-train", daemon=True).start()
        except BaseException:
            self._lock.release()
            raise
        return handle

    def _work(self, h: RunHandle) -> None:
        try:
            for ev in train(h.cfg, h.stop_event):
                match ev:
                    case RunStarted():
                        h.run_dir, h.phase = ev.run_dir, "run"
                    case BatchProgress():
                        h.phase, h.epoch, h.progress = ev.phase, ev.epoch, (ev.step, ev.total)
                    case EpochEnded():
                        h.epoch = ev.epoch
                        h.history = h.history + [history_row(ev)]  # a new list: readers never see it change
                    case RunEnded():
                        h.ended = ev
                lines = log_lines(ev)
                if lines:  # (none for the per-batch progress events: no copy of the log per batch)
                    h.log = h.log + lines
                h.events.put(ev)
        except UserError as e:
            h.failed = Failed(e)
        except MemoryError:
            h.failed = Failed(UserError("out of memory: try a smaller {setting}", field="batch_size"))
        except OSError as e:  # not a bug: the disk is full, a file or folder went away or cannot be read
            log.error("training stopped by an OS error:\n%s", traceback.format_exc())
            h.failed = Failed(UserError(f"a file could not be read or written: {os_error_text(e)}"))
        except Exception as e:  # a bug, not a user error: keep the traceback in the server log
            log.error("training crashed:\n%s", traceback.format_exc())
            h.failed = Failed(UserError(f"internal error ({type(e).__name__}: {e}); details are in the server log"))
        finally:
            if h.failed:
                h.log = h.log + log_lines(h.failed)
                h.events.put(h.failed)
            h.done.set()
            self._lock.release()  # before _DONE: a client that starts again right after the last update gets in
            h.events.put(_DONE)

    def stop(self, wait: float = 0.0) -> RunHandle | None:
        """Ask the current run to end after its current batch; wait up to `wait`
        seconds for it. Returns the run's handle, or None when nothing runs."""
        h = self.current
        if h is None or h.done.is_set():
            return None
        h.stop_event.set()
        h.done.wait(wait)
        return h
