"""The same command with the same --seed in two separate processes gives the same
run: identical metrics.csv values and identical checkpoint tensors. (tests/test_engine.py
repeats a run inside one process; a seed drawn from a string hash, a set's order or
anything else that differs between processes only shows up here: the two processes
get different PYTHONHASHSEEDs.)"""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from conftest import ROOT, make_image_dataset


def train_process(data: Path, out: Path, hash_seed: str) -> Path:
    """train.py in a process of its own: random crops and dropout draw random numbers
    every step, the validation images are drawn from train/ by --val-split, and
    images are decoded by two DataLoader worker processes (--num-workers 2)."""
    args = ["--data-dir", str(data), "--device", "cpu", "--weights", "none", "--epochs", "2", "--batch-size", "4",
            "--policy", "last", "--augment", "standard", "--dropout", "0.3", "--val-split", "0.25", "--seed", "4242",
            "--num-workers", "2", "--output-dir", str(out)]
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return Path(re.search(r"^RUN_DIR: (.+)$", p.stdout, re.M).group(1))


def metrics(run_dir: Path) -> list[dict]:
    """metrics.csv without its wall-clock column."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def tensors(obj, path=""):
    """Every tensor in a checkpoint (model, optimizer state, ...) by its path in the dict."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{path}/{i}")


def test_same_seed_in_two_processes_gives_identical_metrics_and_tensors(tmp_path):
    data = make_image_dataset(tmp_path / "ds", n_train=8, val=False)
    a = train_process(data, tmp_path / "a", hash_seed="1")
    b = train_process(data, tmp_path / "b", hash_seed="2")
    rows = metrics(a)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows == metrics(b)
    for name in ("latest.pt", "best_acc.pt", "best_loss.pt"):
        ta, tb = (dict(tensors(torch.load(d / name, weights_only=True))) for d in (a, b))
        assert ta.keys() == tb.keys() and any(k.startswith("/optimizer_state/") for k in ta), sorted(ta)[:5]
        different = [k for k in ta if not (ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]))]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:5]}"
