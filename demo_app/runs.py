"""Earlier runs under the checkpoints folder: listing, labels, metrics.csv."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from core.best import empty_best, update_best

CHECKPOINT_FILES = ("best_acc.pt", "best_loss.pt", "latest.pt")


@dataclass
class RunInfo:
    name: str
    path: Path
    args: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    mtime: float = 0.0

    @property
    def best_val_acc(self) -> float | None:
        accs = [r["val_acc"] for r in self.history if r.get("val_acc") is not None]
        return max(accs) if accs else None

    def short_name(self) -> str:
        """For chart legends: 'resnet18-head 15:43:58' (the run folder without its date)."""
        m = re.match(r"^(.*)_(\d{8})_(\d{2})(\d{2})(\d{2})(_\d+)?$", self.name)
        short = f"{m.group(1)} {m.group(3)}:{m.group(4)}:{m.group(5)}" if m else self.name
        policy = str(self.args.get("policy") or "")
        return short if not policy or policy in short else f"{short} ({policy})"

    def label(self) -> str:
        a = self.args
        bits = [self.name]
        if a.get("policy"):
            bits.append(str(a["policy"]))
        if a.get("weights"):
            w = str(a["weights"])
            bits.append("weights " + (Path(w).name if w not in ("imagenet", "none") else w))
        bits.append(f"{len(self.history)} ep")
        if self.best_val_acc is not None:
            bits.append(f"best val_acc {self.best_val_acc:.2f}")
        return " · ".join(bits)


def read_metrics(path) -> list[dict]:
    """metrics.csv (written by the engine each epoch) -> its rows as numbers. A
    blank or non-numeric cell (a column an older or the reference's history
    lacks, a hand edit) is left out of its row; a row without an epoch is dropped."""
    try:
        table = pd.read_csv(path).apply(pd.to_numeric, errors="coerce")
    except (OSError, ValueError):  # unreadable, empty or not a CSV (pandas' parse errors are ValueErrors)
        return []
    rows = [{k: v for k, v in row.items() if pd.notna(v)} for row in table.to_dict("records")]
    return [{**r, "epoch": int(r["epoch"])} for r in rows if "epoch" in r]


def _read_args(run: Path) -> dict:
    try:
        return json.loads((run / "args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def list_runs(checkpoints_dir) -> list[RunInfo]:
    """Runs that finished at least one epoch, newest (last written) first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    runs = []
    for d in root.iterdir():
        metrics = d / "metrics.csv"
        if not d.is_dir() or d.name.startswith(".") or not metrics.is_file():
            continue
        try:
            mtime = max(p.stat().st_mtime for p in d.iterdir() if p.is_file())
        except (OSError, ValueError):
            continue
        runs.append(RunInfo(d.name, d, _read_args(d), read_metrics(metrics), mtime))
    runs.sort(key=lambda r: (r.mtime, r.name), reverse=True)
    return runs


def checkpoint_choices(checkpoints_dir) -> list[tuple[str, str]]:
    """(label, path) for the dropdown of the Predict tab, newest run's best_acc.pt
    first; each label says which epoch the file holds and that epoch's metric."""
    out = []
    for run in list_runs(checkpoints_dir):
        rows = file_rows(run.history)
        for fname in CHECKPOINT_FILES:
            p = run.path / fname
            if p.is_file():
                row, metric = rows.get(fname), "val_loss" if fname == "best_loss.pt" else "val_acc"
                what = f" · epoch {row['epoch']} · {metric} {row[metric]:.3f}" if row else ""
                out.append((f"{run.name} / {fname}{what}", str(p)))
        exported = run.path / "export" / "model.safetensors"  # export.py's or the Predict tab's export
        if exported.is_file():
            out.append((f"{run.name} / export/model.safetensors", str(exported)))
    return out


def file_rows(history: list[dict]) -> dict[str, dict]:
    """The metrics.csv row each checkpoint file holds, by the engine's own rules
    (a best file is the latest.pt of its epoch): no 45-135 MB file is opened."""
    best, out = empty_best(), {}
    for row in history:
        if not all(isinstance(row.get(k), (int, float)) for k in ("epoch", "val_loss", "val_acc")):
            continue  # a hand-edited or foreign metrics.csv
        improved_acc, improved_loss = update_best(best, row["epoch"], row["val_loss"], row["val_acc"])
        if improved_acc:
            out["best_acc.pt"] = row
        if improved_loss:
            out["best_loss.pt"] = row
        out["latest.pt"] = row
    return out
