"""The exported files hold exactly the best epoch's weights: state_dict.pt and
full_model.pt (train.py --export-state-dict 1 --export-full-model 1) and
model.safetensors (export.py) compared tensor for tensor, with torch.equal, to
best_acc.pt's model_state, and shown to differ from the last epoch's (latest.pt),
so an export of the wrong epoch, or of a rebuilt or converted model, fails."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from conftest import ROOT


def cli(*args, home: Path) -> str:
    env = {**os.environ, "TORCH_HOME": str(home), "TL_OFFLINE": "1"}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
    different = [k for k in want if not (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))]
    assert not different, f"{what}: {len(different)} tensors differ from best_acc.pt's, e.g. {different[:5]}"


def test_exports_hold_the_best_epochs_tensors_exactly(tmp_path):
    # The reference settings on the shipped data/ with random weights: epoch 1 has the
    # best val_acc (tied) at the lower val_loss, so best_acc.pt is not the last epoch.
    out = cli("train.py", "--data-dir", "data", "--device", "cpu", "--epochs", "2", "--batch-size", "16",
              "--seed", "1337", "--weights", "none", "--export-state-dict", "1", "--export-full-model", "1",
              "--output-dir", str(tmp_path / "out"), home=tmp_path / "torch_home")
    run = Path(re.search(r"^RUN_DIR: (.+)$", out, re.M).group(1))
    assert re.findall(r"^EXPORTED: (.+)$", out, re.M) == [str(run / "state_dict.pt"), str(run / "full_model.pt")]
    best = torch.load(run / "best_acc.pt", weights_only=True)
    latest = torch.load(run / "latest.pt", weights_only=True)
    assert (best["epoch"], latest["epoch"]) == (1, 2), "the check needs a best epoch other than the last"
    want = best["model_state"]
    assert not torch.equal(want["fc.weight"], latest["model_state"]["fc.weight"])

    assert_same_tensors(torch.load(run / "state_dict.pt", weights_only=True), want, "state_dict.pt")
    full = torch.load(run / "full_model.pt", weights_only=False)  # our own pickle, written just now
    assert full.class_names == ["cat", "fish"]
    assert_same_tensors(full.state_dict(), want, "full_model.pt")

    from safetensors.torch import load_file
    cli("export.py", "--checkpoint", str(run / "best_acc.pt"), "--format", "safetensors", "--out",
        str(tmp_path / "export"), home=tmp_path / "torch_home")
    assert_same_tensors(load_file(tmp_path / "export" / "model.safetensors"), want, "model.safetensors")
