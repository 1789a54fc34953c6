"""Issue 19: the DataLoader pipeline gives the same run whatever the number of
worker processes and whether decoded images are kept; torchrun (2 CPU
processes, gloo) trains one run with global metrics, writes today's files once,
resumes, and stops cleanly on SIGTERM."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import ROOT, make_image_dataset, need_shared, train_config, train_run

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def train(args, runner=(sys.executable,), env=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*runner, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_dir(p: subprocess.CompletedProcess) -> Path:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    dirs = re.findall(r"^RUN_DIR: (.+)$", p.stdout, re.M)
    assert len(dirs) == 1, p.stdout  # printed once, by rank 0
    return Path(dirs[0])


def metrics(d: Path) -> list[dict]:
    with open(d / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def weights(d: Path, name="latest.pt") -> dict:
    return torch.load(d / name, weights_only=True)["model_state"]


def assert_same_run(a: Path, b: Path) -> None:
    assert metrics(a) == metrics(b)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def engine_run(data: Path, out: Path, **kw) -> Path:
    """One run of the engine in this process (DataLoader workers fork from it)."""
    _, epochs, ended = train_run(train_config(data, out, arch="mobilenet_v2", **kw))
    assert ended.status == "completed", ended.message
    return Path(ended.run_dir)


def test_random_crops_do_not_depend_on_workers_or_on_keeping_images(tmp_path):
    """Random crops and flips every step (augment standard): streamed from disk in
    this process, streamed by 2 worker processes, and kept in memory."""
    data = make_image_dataset(tmp_path / "ds", n_train=6, n_val=2, size=(80, 60))
    common = dict(epochs=1, policy="last", augment="standard", seed=11)
    streamed0 = engine_run(data, tmp_path / "a", num_workers=0, cache_budget_mb=0, **common)
    streamed2 = engine_run(data, tmp_path / "b", num_workers=2, cache_budget_mb=0, **common)
    kept = engine_run(data, tmp_path / "c", num_workers=2, **common)
    assert_same_run(streamed0, streamed2)
    assert_same_run(streamed0, kept)


def test_feature_pass_is_the_image_check_with_or_without_workers(tmp_path):
    """Head-only: the feature pass is the image check (each image decoded once, by 2
    workers or in this process); a broken JPEG is skipped and named, and both runs
    are the same."""
    from core.events import Notice
    data = make_image_dataset(tmp_path / "ds", n_train=6, n_val=2)
    (data / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    runs = []
    for out, kw in (("a", dict(num_workers=2)), ("b", dict(num_workers=0))):
        events, _, ended = train_run(train_config(data, tmp_path / out, arch="mobilenet_v2", policy="head", seed=3, **kw))
        warning = "\n".join(e.text for e in events if isinstance(e, Notice))
        assert "broken.jpg" in warning and "train now: 12 images" in warning, warning
        runs.append(Path(ended.run_dir))
    assert_same_run(*runs)


def catfish_args(out: Path, *extra) -> list:
    return ["--data-dir", need_shared("data/catfish-mini"), "--device", "cpu", "--arch", "mobilenet_v2",
            "--weights", need_shared("weights/mobilenet_v2_imagenet_features.pth"), "--output-dir", out, *extra]


def epoch_lines(text: str, prefix: str = "") -> list[str]:
    return re.findall(rf"^{re.escape(prefix)}(EPOCH .+)$", text, re.M)


def test_torchrun_two_ranks_head_one_run_global_metrics_loads_in_predict(tmp_path, capsys):
    import predict
    args = ["--policy", "head", "--epochs", "2", "--num-workers", "0", "--seed", "5"]
    p = train(catfish_args(tmp_path / "ddp", *args), runner=TORCHRUN, env={"TL_DEBUG": "1"})
    single = engine_run(need_shared("data/catfish-mini"), tmp_path / "one", policy="head", epochs=2, num_workers=0,
                        seed=5, batch_size=16, weights=str(need_shared("weights/mobilenet_v2_imagenet_features.pth")))
    ddp = run_dir(p)
    assert [d.name for d in (tmp_path / "ddp").iterdir()] == [ddp.name]  # one run folder
    lines = epoch_lines(p.stdout)
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]  # each EPOCH line once
    assert epoch_lines(p.stderr, "[rank 1] ") == lines  # rank 1 holds the same (all-reduced) metrics
    # same files, same formats as a single-process run
    assert sorted(f.name for f in ddp.iterdir()) == sorted(f.name for f in single.iterdir())
    assert json.loads((ddp / "args.json").read_text()).keys() == json.loads((single / "args.json").read_text()).keys()
    assert (ddp / "metrics.csv").read_text().splitlines()[0] == (single / "metrics.csv").read_text().splitlines()[0]
    best = [max(float(r["val_acc"]) for r in metrics(d)) for d in (single, ddp)]
    assert abs(best[0] - best[1]) <= 1 / 32 + 1e-9  # catfish-mini val: 32 images
    image = sorted((need_shared("data/catfish-mini") / "val" / "cat").iterdir())[0]
    assert predict.main(["--checkpoint", str(ddp / "best_acc.pt"), "--image", str(image), "--device", "cpu"]) == 0
    assert re.search(r"\b(cat|fish)\b", capsys.readouterr().out)


def test_torchrun_sigterm_mid_epoch_leaves_loadable_files_then_resumes(tmp_path):
    """policy last, images streamed (cache off, one DataLoader worker per rank) so an
    epoch takes long enough to be interrupted."""
    args = ["--policy", "last", "--cache", "off", "--num-workers", "1", "--batch-size", "4"]
    cmd = [*TORCHRUN, "train.py", *map(str, catfish_args(tmp_path / "out", *args, "--epochs", "4"))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out = []
        for line in proc.stdout:
            out.append(line)
            if line.startswith("EPOCH 1/4"):
                time.sleep(1.0)  # into epoch 2
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(out) + rest
    assert "EPOCH 1/4" in text, text + err
    # no rank failed (torchrun itself logs the signal it got, with its own traceback)
    assert "internal error" not in err and not re.search(r"^error:", err, re.M), err
    d = Path(re.search(r"^RUN_DIR: (.+)$", text, re.M).group(1))
    done = torch.load(d / "latest.pt", weights_only=True)["epoch"]
    assert 1 <= done < 4
    assert len(metrics(d)) == done
    json.loads((d / "args.json").read_text())
    for name in ("best_acc.pt", "best_loss.pt"):
        torch.load(d / name, weights_only=True)
    assert not [f.name for f in d.iterdir() if f.name.startswith(".") or "tmp" in f.name]
    # --resume under torchrun continues in the same folder
    p = train(["--resume", d / "latest.pt", "--epochs", done + 1, "--num-workers", "1"], runner=TORCHRUN)
    assert run_dir(p) == d
    assert f"RESUME: continuing at epoch {done + 1}/{done + 1}" in p.stdout
    assert [r["epoch"] for r in metrics(d)] == [str(e) for e in range(1, done + 2)]


def test_default_workers_leave_a_core_to_the_model_and_share_cores_between_ranks(monkeypatch):
    from core.loader import default_num_workers
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [default_num_workers(c) for c in (1, 2, 3, 16)] == [0, 1, 2, 4]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun, 8 processes on this machine
    assert [default_num_workers(c) for c in (8, 16, 64)] == [0, 1, 4]
