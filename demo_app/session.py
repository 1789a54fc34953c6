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

from core.config import TrainConfig
from core.engine import BatchProgress, EpochEnded, Notice, RunEnded, RunStarted, train
from core.errors import UserError

log = logging.getLogger("demo_app")


# A run's random init and dropout come from torch's global RNG, seeded by the
# engine. Nothing else in the app draws from it (the Model tab and predictors
# build their models on the meta device), so a run in the app matches the same
# command in the CLI.


def history_row(ev: EpochEnded) -> dict:
    """An epoch as the app's table and charts take it: the metrics row, plus whether it is the new best."""
    return {**ev.as_row(), "best": ev.best_acc}


def log_lines(ev) -> list[str]:
    """The CLI's lines for an engine event: the app's run log."""
    if isinstance(ev, RunStarted):
        return ev.header_lines() + [f"WARNING: {w}" for w in ev.dataset.warnings] + [f"NOTE: {n}" for n in ev.notes]
    if isinstance(ev, Notice):
        return [f"{ev.level.upper()}: {ev.text}"]
    if isinstance(ev, EpochEnded):
        return [ev.line()]
    if isinstance(ev, RunEnded):
        return ev.end_lines()
    if isinstance(ev, Failed):
        return [f"ERROR: {ev.message}"]
    return []


def os_error_text(e: OSError) -> str:
    """An environment problem (full disk, unreadable file) in the words the CLI uses: reason and file."""
    return f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"


class BusyError(UserError):
    """A second Start while a run is in progress."""


@dataclass
class Failed:
    """The run could not start or crashed; `message` is for the user."""
    message: str
    kind: str = "UserError"  # the core.errors class name


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
        while True:
            ev = self.events.get()
            if ev is _DONE:
                return
            yield ev

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

    @property
    def busy(self) -> bool:
        return self._lock.locked()

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
                if isinstance(ev, RunStarted):
                    h.run_dir, h.phase = ev.run_dir, "run"
                elif isinstance(ev, BatchProgress):
                    h.phase, h.epoch, h.progress = ev.phase, ev.epoch, (ev.step, ev.total)
                elif isinstance(ev, EpochEnded):
                    h.epoch = ev.epoch
                    h.history = h.history + [history_row(ev)]  # a new list: readers never see it change
                elif isinstance(ev, RunEnded):
                    h.ended = ev
                lines = log_lines(ev)
                if lines:  # (none for the per-batch progress events: no copy of the log per batch)
                    h.log = h.log + lines
                h.events.put(ev)
        except UserError as e:
            h.failed = Failed(str(e), kind=type(e).__name__)
        except MemoryError:
            h.failed = Failed("out of memory: try a smaller batch size")
        except OSError as e:  # not a bug: the disk is full, a file or folder went away or cannot be read
            log.error("training stopped by an OS error:\n%s", traceback.format_exc())
            h.failed = Failed(f"a file could not be read or written: {os_error_text(e)}", kind="OSError")
        except Exception as e:  # a bug, not a user error: keep the traceback in the server log
            log.error("training crashed:\n%s", traceback.format_exc())
            h.failed = Failed(f"internal error ({type(e).__name__}: {e}); details are in the server log")
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

    def wait_idle(self, timeout: float = 30.0) -> bool:
        h = self.current
        return h is None or h.done.wait(timeout)
