"""What the training engine reports, and the text lines the CLI prints and the
app's run log shows for it (one format for both; texts may hold {setting}
placeholders, core.errors.render puts them in a front end's words).

    for event in engine.train(config, stop_event):
        RunStarted   -> once, after setup (run folder, dataset, notes)
        BatchProgress-> per batch (or image chunk), phase "decode" | "cache" | "train" | "val"
        Notice       -> e.g. images found unreadable while decoding
        EpochEnded   -> per epoch, metrics and checkpoint paths
        RunEnded     -> once: "completed", "stopped" or "diverged"
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .data import DatasetInfo
from .config import TrainConfig
from .calibration import Calibration
from .metrics import per_class, per_class_lines


class Stopped(Exception):
    """Raised inside the engine when the stop flag is seen: the run ends with status "stopped"."""


class Diverged(Exception):
    """Raised inside the engine when the loss blows up: the run ends with status "diverged"."""


@dataclass
class RunStarted:
    run_dir: str
    dataset: DatasetInfo
    config: TrainConfig
    device: str
    trainable_params: int
    total_params: int
    start_epoch: int
    notes: list[str] = field(default_factory=list)

    def header_lines(self) -> list[str]:
        """RUN_DIR, the DATASET block, MODEL and PARAMS lines (the CLI's stdout)."""
        cfg, info = self.config, self.dataset
        held = (f" (held out of train/ by {{setting:val_split}} {info.val_from_split}: {len(info.val.samples)} of "
                f"{len(info.val.samples) + len(info.train.samples)} images, at least 1 per class)"
                if info.val_from_split else "")
        lines = [f"RUN_DIR: {self.run_dir}", "DATASET:", f"  root: {info.root}", f"  {info.train.summary_line()}",
                 f"  {info.val.summary_line()}{held}",
                 f"MODEL: arch={cfg.arch} weights={cfg.weights} policy={cfg.policy} dropout={cfg.dropout} "
                 f"augment={cfg.effective_augment} device={self.device}",
                 f"PARAMS: trainable={self.trainable_params:,} total={self.total_params:,}"]
        if self.start_epoch > 1:
            lines.append(f"RESUME: continuing at epoch {self.start_epoch}/{cfg.epochs}")
        return lines


@dataclass
class BatchProgress:
    phase: str  # "decode" | "cache" | "train" | "val"
    epoch: int
    step: int
    total: int


@dataclass
class Notice:
    """Something the user should know that was found after RunStarted (e.g. unreadable images)."""
    level: str  # "warning" | "info"
    text: str


@dataclass
class EpochEnded:
    epoch: int
    epochs: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float
    best_acc: bool
    best_loss: bool
    latest_path: str
    confusion: list = field(default_factory=list)  # [[true, predicted, count], ...] on val (core.metrics)

    def line(self) -> str:
        """The reference's EPOCH line, byte for byte."""
        return (f"EPOCH {self.epoch}/{self.epochs}  train_loss={self.train_loss:.4f} train_acc={self.train_acc:.4f}  "
                f"val_loss={self.val_loss:.4f} val_acc={self.val_acc:.4f}  lr={self.lr:g}")

    def as_row(self) -> dict:
        return {"epoch": self.epoch, "train_loss": self.train_loss, "train_acc": self.train_acc,
                "val_loss": self.val_loss, "val_acc": self.val_acc, "lr": self.lr, "seconds": round(self.seconds, 3)}


@dataclass
class RunEnded:
    status: str  # "completed" | "stopped" | "diverged"
    message: str
    run_dir: str
    epochs_done: int
    best: dict
    best_acc_path: str | None
    best_loss_path: str | None
    history: list[dict]
    exports: list[str] = field(default_factory=list)
    best_confusion: list | None = None  # validation of the best-accuracy epoch, when known
    classes: list[str] = field(default_factory=list)
    calibration: Calibration | None = None  # temperature scaling fitted on the best_acc epoch's val logits

    def end_lines(self) -> list[str]:
        """Status (unless completed), the BEST block, calibration, per-class results and exported files."""
        lines = [] if self.status == "completed" else [f"{self.status.upper()}: {self.message}"]
        return (lines + self.best_lines() + self.calibration_lines() + self.per_class_lines() +
                [f"EXPORTED: {p}" for p in self.exports])

    def calibration_lines(self) -> list[str]:
        if self.calibration is None or not self.best.get("acc_epoch"):
            return []
        return [self.calibration.line(f"the best_acc epoch's ({self.best['acc_epoch']}) val logits")]

    def per_class_rows(self) -> list[dict]:
        return per_class(self.best_confusion, self.classes)

    def per_class_lines(self) -> list[str]:
        rows = self.per_class_rows()
        if not rows:
            return []
        return [f"PER_CLASS: val accuracy by class at the best_acc epoch ({self.best['acc_epoch']})",
                *per_class_lines(rows)]

    def best_lines(self) -> list[str]:
        if not self.best.get("acc_epoch") and not self.best.get("loss_epoch"):
            return ["BEST: none (no completed epoch with a finite validation loss)"]
        return [
            "BEST:",
            f"  best_acc={self.best['acc']:.4f} (epoch {self.best['acc_epoch']}) -> {self.best_acc_path or 'none'}",
            f"  best_loss={self.best['loss']:.4f} (epoch {self.best['loss_epoch']}) -> {self.best_loss_path or 'none'}",
        ]


@dataclass(frozen=True)
class LogLine:
    text: str
    stderr: bool = False  # the CLI's stream: warnings and abnormal ends go to stderr


def prefixed(level: str, text: str, stderr: bool = True) -> LogLine:
    """A WARNING: / NOTE: / INFO: line: the level in capitals, then the text."""
    return LogLine(f"{level.upper()}: {text}", stderr)


def notice_lines(ev: RunStarted, notes=()) -> list[LogLine]:
    """RunStarted's WARNING and NOTE lines (`notes`: the caller's own, printed first)."""
    return ([prefixed("warning", w) for w in ev.dataset.warnings] +
            [prefixed("note", n, stderr=False) for n in [*notes, *ev.notes]])


def log_lines(ev, notes=()) -> list[LogLine]:
    """The lines of an event, as the CLI prints them and the app's log shows them."""
    match ev:
        case RunStarted():
            return [LogLine(t) for t in ev.header_lines()] + notice_lines(ev, notes)
        case Notice():
            return [prefixed(ev.level, ev.text)]
        case EpochEnded():
            return [LogLine(ev.line())]
        case RunEnded():
            return [LogLine(t, t.startswith(("STOPPED:", "DIVERGED:"))) for t in ev.end_lines()]
    return []
