"""The reference command and every line it prints, byte for byte, on the shipped
data/ with random weights (--weights none): nothing from ../shared is needed, so
this runs everywhere. Then predict.py on the run's best checkpoint. Each regex
pins the spacing and the number of decimals; the numbers are tied to the run's
own metrics.csv and checkpoints, so a line that printed the wrong value fails too."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

# The chapter's command (README, "Train"), with --weights none (no ImageNet file
# offline), 2 epochs instead of 10, and a temporary --output-dir.
REFERENCE = ["--data-dir", "data", "--device", "cpu", "--epochs", "2", "--batch-size", "16", "--lr", "0.001",
             "--weight-decay", "0.0001", "--freeze-backbone", "1", "--unfreeze-last", "0", "--unfreeze-all", "0",
             "--seed", "1337", "--num-workers", "0", "--amp", "0", "--weights", "none"]

F4 = r"\d+\.\d{4}"  # a loss: 4 decimals
A4 = r"[01]\.\d{4}"  # an accuracy or a probability: 4 decimals


def run(script: str, *args, torch_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_HOME": str(torch_home), "TL_OFFLINE": "1"}
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def match_lines(lines: list[str], patterns: list[str]) -> list[re.Match]:
    """Every line, in order, matches its pattern in full (no extra or missing line)."""
    assert len(lines) == len(patterns), "\n".join(lines)
    found = []
    for line, pattern in zip(lines, patterns):
        m = re.fullmatch(pattern, line)
        assert m, f"{line!r} does not match {pattern!r}"
        found.append(m)
    return found


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    p = run("train.py", *REFERENCE, "--output-dir", str(tmp / "out"), torch_home=tmp / "torch_home")
    return p, tmp


def test_reference_command_prints_every_line_in_its_format(reference_run):
    p, tmp = reference_run
    out = str(tmp / "out")
    run_dir = rf"{re.escape(out)}/resnet18_\d{{8}}_\d{{6}}"
    lines = p.stdout.splitlines()
    notes = [line for line in lines if line.startswith("NOTE: ")]
    assert any(n.startswith("NOTE: --weights none with policy 'head'") for n in notes), notes
    assert re.fullmatch(r"NOTE: feature cache: frozen layers run once per image \(1 view\(s\)\), \d+\.\d MB", notes[-1])
    lines = [line for line in lines if not line.startswith("NOTE: ")]
    epoch = (rf"EPOCH (\d)/2  train_loss=({F4}) train_acc=({A4})  val_loss=({F4}) val_acc=({A4})  lr=0\.001")
    m = match_lines(lines, [
        rf"RUN_DIR: ({run_dir})",
        r"DATASET:",
        r"  root: data",
        r"  train: 40 images \| classes=\['cat', 'fish'\] \| per_class=\{'cat': 20, 'fish': 20\}",
        r"  val: 32 images \| classes=\['cat', 'fish'\] \| per_class=\{'cat': 16, 'fish': 16\}",
        r"MODEL: arch=resnet18 weights=none policy=head dropout=0\.0 augment=none device=cpu",
        r"PARAMS: trainable=1,026 total=11,177,538",
        epoch,
        epoch,
        r"BEST:",
        rf"  best_acc=({A4}) \(epoch (\d)\) -> ({run_dir})/best_acc\.pt",
        rf"  best_loss=({F4}) \(epoch (\d)\) -> ({run_dir})/best_loss\.pt",
        rf"CALIBRATION: temperature=({F4}) (?:fitted on |not fitted \()the best_acc epoch's \((\d)\) val logits"
        rf"(?: hold no mistake to calibrate against; T stays 1\))?: val NLL ({F4}) -> ({F4}), ECE ({A4}) -> ({A4})",
        r"PER_CLASS: val accuracy by class at the best_acc epoch \((\d)\)",
        r"  cat: (\d+)/16 = (" + A4 + r")( \((\d+) taken for fish\))?",
        r"  fish: (\d+)/16 = (" + A4 + r")( \((\d+) taken for cat\))?",
    ])
    folder = Path(m[0].group(1))
    assert folder.is_dir() and m[10].group(3) == m[11].group(3) == str(folder)
    assert p.stderr == "", p.stderr  # no progress bars when stderr is not a terminal, no warnings

    # The EPOCH lines print metrics.csv's values at 4 decimals
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(e.group(1)) for e in m[7:9]] == [1, 2] == [int(r["epoch"]) for r in rows]
    for e, row in zip(m[7:9], rows):
        assert [e.group(i) for i in range(2, 6)] == [f"{float(row[k]):.4f}" for k in
                                                     ("train_loss", "train_acc", "val_loss", "val_acc")]
        assert float(row["lr"]) == 0.001

    # BEST: the saved checkpoints' epochs and values (best_acc: the highest val_acc,
    # a tie going to the lower val_loss; best_loss: the lowest val_loss)
    acc, loss = (torch.load(folder / name, weights_only=True) for name in ("best_acc.pt", "best_loss.pt"))
    best_acc_row = max(rows, key=lambda r: (float(r["val_acc"]), -float(r["val_loss"])))
    best_loss_row = min(rows, key=lambda r: float(r["val_loss"]))
    assert (m[10].group(1), int(m[10].group(2))) == (f"{float(best_acc_row['val_acc']):.4f}", acc["epoch"])
    assert int(best_acc_row["epoch"]) == acc["epoch"]
    assert (m[11].group(1), int(m[11].group(2))) == (f"{float(best_loss_row['val_loss']):.4f}", loss["epoch"])
    assert int(best_loss_row["epoch"]) == loss["epoch"]

    # CALIBRATION: best_acc.pt holds the temperature fitted on its epoch; it never makes val NLL worse
    cal = m[12]
    assert int(cal.group(2)) == acc["epoch"] and cal.group(1) == f"{acc['temperature']:.4f}"
    assert float(cal.group(4)) <= float(cal.group(3))

    # PER_CLASS: the best_acc epoch's counts, which add up to its val_acc
    assert int(m[13].group(1)) == acc["epoch"]
    right = int(m[14].group(1)) + int(m[15].group(1))
    assert f"{right / 32:.4f}" == m[10].group(1)
    for row, other in ((m[14], m[15]), (m[15], m[14])):
        assert row.group(2) == f"{int(row.group(1)) / 16:.4f}"
        assert (row.group(4) is None) == (int(row.group(1)) == 16)  # "(k taken for ...)" only with misses
        if row.group(4):
            assert int(row.group(4)) == 16 - int(row.group(1))


def test_predict_prints_every_line_in_its_format(reference_run):
    p, tmp = reference_run
    folder = Path(re.search(r"^RUN_DIR: (.+)$", p.stdout, re.M).group(1))
    best = folder / "best_acc.pt"
    saved = torch.load(best, weights_only=True)
    image = sorted((ROOT / "data" / "val" / "fish").glob("*.jpg"))[0].relative_to(ROOT)
    r = run("predict.py", "--image", str(image), "--checkpoint", str(best), "--device", "cpu", "--topk", "2",
            torch_home=tmp / "torch_home")
    m = match_lines(r.stdout.splitlines(), [
        rf"CHECKPOINT: {re.escape(str(best))}",
        r"format: checkpoint dict",
        r"best_epoch: (\d+)",
        rf"best_val_acc: ({A4})",
        r"class_names: \['cat', 'fish'\]",
        rf"IMAGE: {re.escape(str(image))}",
        r"TOPK:",
        rf"  1\) (cat|fish)  p=({A4})",
        rf"  2\) (cat|fish)  p=({A4})",
    ])
    assert r.stderr == "", r.stderr
    assert int(m[2].group(1)) == saved["epoch"]
    assert m[3].group(1) == f"{saved['history'][saved['epoch'] - 1]['val_acc']:.4f}"
    (first, p1), (second, p2) = (m[7].group(1, 2), m[8].group(1, 2))
    assert {first, second} == {"cat", "fish"} and float(p1) >= float(p2)
    assert abs(float(p1) + float(p2) - 1) <= 1e-4  # two classes: the two probabilities are the whole softmax
