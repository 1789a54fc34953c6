"""The run folder (checkpoints/<run>_<time>/): made fresh for a new run, one
checkpoint save per epoch (latest.pt, best files as hard links, metrics.csv),
the reference's extra export formats at the end, nothing left by a run that
stopped before its first epoch, and the repair of what a crash left when a
run continues."""
from __future__ import annotations

import csv
import os
import shutil
from datetime import datetime
from pathlib import Path

from . import checkpoint as ck
from .best import RunState
from .config import TrainConfig
from .errors import ConfigError, UserError
from .fileio import (atomic_link_or_copy, atomic_torch_save, atomic_write_csv, new_folder, one_dir_sync,
                     remove_stale_temps)


def new_run_dir(output_dir, run_name: str) -> Path:
    """checkpoints/<run_name>_<YYYYmmdd_HHMMSS>, suffixed _2, _3 if taken."""
    root = Path(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output folder {root}: {e.strerror}; pass a writable {{setting}}",
                          field="output_dir", value=str(root)) from None
    if not os.access(root, os.W_OK):
        raise ConfigError(f"output folder {root} is not writable; pass a writable {{setting}}", field="output_dir",
                          value=str(root))
    path = new_folder(root, f"{run_name}_{datetime.now():%Y%m%d_%H%M%S}")
    if path is None:
        raise ConfigError(f"could not create a new run folder under {root}")
    return path


def remove_empty_run(run_dir: Path) -> None:
    """A run stopped before its first epoch leaves nothing behind."""
    try:
        if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {"args.json"}:
            shutil.rmtree(run_dir)
    except OSError:
        pass


def save_epoch(state: RunState, epoch: int, model, optimizer, scaler, cfg: TrainConfig) -> None:
    """latest.pt every epoch; best files are hard links to it (no second 45 MB write).
    state.epochs_done becomes `epoch` once everything is written."""
    run_dir = state.run_dir
    ckpt = ck.make_checkpoint(state, epoch, model, optimizer, scaler, cfg)
    try:
        with one_dir_sync():
            latest = atomic_torch_save(ckpt, run_dir / "latest.pt")
            if state.improved_acc:
                atomic_link_or_copy(latest, run_dir / "best_acc.pt")
            if state.improved_loss:
                atomic_link_or_copy(latest, run_dir / "best_loss.pt")
            atomic_write_csv(run_dir / "metrics.csv", state.history)
    except OSError as e:
        if not run_dir.is_dir():
            raise UserError(f"could not write checkpoints to {run_dir}: the run folder no longer exists (deleted or "
                            f"moved while training?), so no checkpoint of this run is left there") from None
        raise UserError(f"could not write checkpoints to {run_dir}: {e.strerror or e} "
                        f"(disk full or not writable?). {saved_state(run_dir, epoch - 1)}") from None
    state.epochs_done = epoch


def saved_state(run_dir: Path, previous: int) -> str:
    """What a failed save left in the run folder, as found on disk (files can
    be deleted or replaced under a running run)."""
    epochs = {name: ck.saved_epoch(run_dir / name) for name in ("latest.pt", "best_acc.pt", "best_loss.pt")
              if (run_dir / name).is_file()}
    epochs = {name: e for name, e in epochs.items() if e is not None}
    if not epochs:
        return "No checkpoint of this run is left there" + (" (none had been saved yet)." if previous == 0 else
                                                             " (latest.pt is missing or unreadable).")
    if epochs.get("latest.pt") == previous:
        return f"Files from earlier epochs are intact (latest.pt holds epoch {previous})."
    return "Left there: " + ", ".join(f"{name} (epoch {e})" for name, e in epochs.items()) + "."


def export_best(run_dir: Path, cfg: TrainConfig, classes) -> list[str]:
    """The reference's other save formats, made from the best-accuracy checkpoint."""
    if not (cfg.export_state_dict or cfg.export_full_model) or not (run_dir / "best_acc.pt").exists():
        return []
    model = ck.model_from_checkpoint(ck.read_checkpoint(run_dir / "best_acc.pt"), run_dir / "best_acc.pt")
    out = []
    if cfg.export_state_dict:
        out.append(str(ck.export_state_dict(model, run_dir / "state_dict.pt")))
    if cfg.export_full_model:
        out.append(str(ck.export_full_model(model, classes, run_dir / "full_model.pt")))
    return out


RUN_FILES = ("args.json", "latest.pt", "best_acc.pt", "best_loss.pt", "metrics.csv")


def recover_run_folder(run_dir, latest: dict, source=None) -> list[str]:
    """Call when resuming a run, before training continues. Repairs what a
    crash (SIGKILL, power loss) can leave in a run folder:
    - save_epoch replaces latest.pt, then links best_acc.pt / best_loss.pt to
      it; killed in between, a best file is older than the epoch latest.pt
      calls best. When the resumed checkpoint is that best epoch, link again.
    - metrics.csv is written after latest.pt; killed in between, it lacks the
      last epoch. Two such kills in a row (resume, kill, resume, kill) would
      leave it two rows behind, so rewrite it from the checkpoint's history.
      A longer csv (resuming an older checkpoint) is kept until the next save.
    - temp files of killed writers (`.<name>.<pid>.*.tmp`, up to 45 MB each).
    Returns what was done, e.g. ['best_acc.pt', 'removed .latest.pt.123.x.tmp']."""
    run_dir = Path(run_dir)
    src = Path(source) if source is not None else run_dir / "latest.pt"
    epoch, done = latest.get("epoch"), []
    for name, key in (("best_acc.pt", "best_epoch"), ("best_loss.pt", "best_loss_epoch")):
        dst = run_dir / name
        if epoch is None or latest.get(key) != epoch or not src.is_file():
            continue
        try:
            if dst.exists() and os.path.samefile(src, dst):
                continue
        except OSError:
            pass
        # The same epoch (a copy, on file systems without hard links) or a later
        # one (from a run that went further) is not crash damage: keep it.
        if dst.is_file() and (ck.saved_epoch(dst) or 0) >= epoch:
            continue
        atomic_link_or_copy(src, dst)
        done.append(name)
    history = latest.get("history") or []
    if history and _csv_rows(run_dir / "metrics.csv") < len(history):
        atomic_write_csv(run_dir / "metrics.csv", history)
        done.append("metrics.csv")
    for name in RUN_FILES:
        done += [f"removed {p.name}" for p in remove_stale_temps(run_dir / name)]
    return done


def _csv_rows(path) -> int:
    try:
        with open(path, newline="") as f:
            return max(sum(1 for _ in csv.reader(f)) - 1, 0)  # minus the header
    except OSError:
        return 0
