"""Which epoch is best: by validation accuracy (ties to the lower loss) and by
validation loss. `best` is a plain dict kept in every checkpoint's fields;
RunState is a run's record of its epochs and bests, saved with each epoch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .calibration import Calibration


def is_better_acc(acc: float, loss: float, best: dict) -> bool:
    """Higher val_acc wins; equal acc with lower loss wins (accuracy saturates on
    small sets). NaN is never best."""
    if math.isnan(acc) or math.isnan(loss):
        return False
    if best["acc_epoch"] == 0:
        return True
    return acc > best["acc"] or (acc == best["acc"] and loss < best["acc_loss"])


def is_better_loss(loss: float, best: dict) -> bool:
    if math.isnan(loss):
        return False
    return best["loss_epoch"] == 0 or loss < best["loss"]


def empty_best() -> dict:
    """acc_loss: val_loss of the best-accuracy epoch (the tie-breaker)."""
    return {"acc": 0.0, "acc_epoch": 0, "acc_loss": float("inf"), "loss": float("inf"), "loss_epoch": 0}


def update_best(best: dict, epoch: int, val_loss: float, val_acc: float) -> tuple[bool, bool]:
    """Apply one epoch's validation to `best`; (new best accuracy, new best loss)."""
    improved_acc, improved_loss = is_better_acc(val_acc, val_loss, best), is_better_loss(val_loss, best)
    if improved_acc:
        best.update(acc=val_acc, acc_epoch=epoch, acc_loss=val_loss)
    if improved_loss:
        best.update(loss=val_loss, loss_epoch=epoch)
    return improved_acc, improved_loss


@dataclass
class RunState:
    """What a run has achieved so far; saved with every epoch."""
    run_dir: Path
    classes: list[str]
    history: list[dict]
    best: dict
    best_confusion: list | None = None  # validation of the best-accuracy epoch
    epochs_done: int = 0
    confusion: list | None = None  # validation of the latest epoch
    improved_acc: bool = False
    improved_loss: bool = False
    calibration: Calibration | None = None  # temperature fitted on the latest epoch's val logits
    best_calibration: Calibration | None = None  # ... on the best-accuracy epoch's (None: before a resume)
    data_files: dict | None = None  # DatasetInfo.fingerprint() of the images this run trains and validates on

    def record(self, epoch: int, val_loss: float, val_acc: float, confusion: list,
               calibration: Calibration | None = None) -> tuple[bool, bool]:
        """One epoch's validation: updates the best results; (new best accuracy, new best loss)."""
        self.improved_acc, self.improved_loss = update_best(self.best, epoch, val_loss, val_acc)
        self.confusion, self.calibration = confusion, calibration
        if self.improved_acc:
            self.best_confusion, self.best_calibration = confusion, calibration
        return self.improved_acc, self.improved_loss

    def file(self, name: str) -> str | None:
        return str(self.run_dir / name) if (self.run_dir / name).exists() else None


def best_from_checkpoint(ckpt: dict) -> dict:
    acc_epoch = int(ckpt.get("best_epoch", 0))
    rows = [h for h in ckpt.get("history") or [] if isinstance(h, dict) and h.get("epoch") == acc_epoch]
    return {"acc": float(ckpt.get("best_val_acc", 0.0)), "acc_epoch": acc_epoch,
            "acc_loss": float(rows[0].get("val_loss", float("inf"))) if rows else float("inf"),  # the reference kept no val_loss
            "loss": float(ckpt.get("best_val_loss", float("inf"))),
            "loss_epoch": int(ckpt.get("best_loss_epoch", acc_epoch))}
