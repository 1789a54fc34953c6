"""Issue 5.2: nothing half-written. A training subprocess is SIGKILLed at many
moments (startup, setup, first epoch, mid-save, right after a save, between
epochs, during a resume); after every kill the run folder holds only complete,
consistent files, and `--resume RUN/latest.pt` finally completes the run."""
from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_image_dataset

EPOCHS = 40  # never reached by the kill chain; the final resume sets its own end
FINAL_NAMES = {"args.json", "latest.pt", "best_acc.pt", "best_loss.pt", "metrics.csv"}
TEMP_RE = re.compile(r"^\.(args\.json|latest\.pt|best_acc\.pt|best_loss\.pt|metrics\.csv)\..+\.tmp$")


def check_run_folder(run: Path) -> dict:
    """Every file is a finished file or a recognisable temp file; every .pt loads
    with weights_only=True and is self-consistent. Returns latest.pt (or {})."""
    names = {p.name for p in run.iterdir()}
    strays = {n for n in names - FINAL_NAMES if not TEMP_RE.match(n)}
    assert not strays, f"unexpected files in {run}: {strays}"
    if "args.json" in names:
        json.loads((run / "args.json").read_text())
    ckpts = {}
    for name in sorted(names & {"latest.pt", "best_acc.pt", "best_loss.pt"}):
        c = torch.load(run / name, map_location="cpu", weights_only=True)
        assert c["epoch"] >= 1 and len(c["history"]) == c["epoch"], name
        assert [h["epoch"] for h in c["history"]] == list(range(1, c["epoch"] + 1)), name
        assert c["best_epoch"] <= c["epoch"] and c["best_loss_epoch"] <= c["epoch"]
        ckpts[name] = c
    if ckpts:
        assert "latest.pt" in ckpts, "a best file without latest.pt"
        latest = ckpts["latest.pt"]
        for name in ("best_acc.pt", "best_loss.pt"):
            assert name in ckpts, f"{name} missing next to latest.pt"
            assert ckpts[name]["epoch"] <= latest["epoch"]
        # best_acc.pt holds the epoch latest.pt calls best (or, killed in the
        # instant between replacing latest.pt and linking best, an older one)
        assert ckpts["best_acc.pt"]["epoch"] <= latest["best_epoch"]
    if "metrics.csv" in names:
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
        for r in rows:
            float(r["train_loss"]), float(r["val_acc"])
        if ckpts:
            assert len(rows) in (ckpts["latest.pt"]["epoch"] - 1, ckpts["latest.pt"]["epoch"])
    return ckpts.get("latest.pt", {})


def _train_child(argv: list[str], log: str, cwd: str) -> None:
    """Body of a forked training process: exactly `python train.py ARGS`, minus
    the interpreter start (torch is preloaded in the fork server)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os.chdir(cwd)
    import threading

    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())  # tqdm's default multiprocessing lock would leak a semaphore per kill
    import train
    code = train.main(argv)
    sys.stdout.flush()
    os._exit(code)


_FORK = None


def fork_context():
    """A forkserver that has imported torch and the CLI once; each run forks
    from it in milliseconds instead of paying seconds of imports."""
    global _FORK
    if _FORK is None:
        import multiprocessing
        _FORK = multiprocessing.get_context("forkserver")
        _FORK.set_forkserver_preload(["torch", "torchvision", "train", "cli.train_output", "core.engine"])
    return _FORK


class Proc:
    """One training process, started as `python train.py` (cli=True) or forked
    from the preloaded server; killed with SIGKILL either way."""

    def __init__(self, args, cwd: Path, log: Path, cli: bool = False):
        self.log, self.t0 = log, time.monotonic()
        argv = [str(a) for a in args]
        if cli:
            env = dict(os.environ, TL_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
            with log.open("w") as out:
                self.p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=cwd, env=env,
                                          stdout=out, stderr=subprocess.STDOUT)
            self.pid = self.p.pid
        else:
            self.p = fork_context().Process(target=_train_child, args=(argv, str(log), str(cwd)), daemon=True)
            self.p.start()
            self.pid = self.p.pid

    def poll(self):
        if isinstance(self.p, subprocess.Popen):
            return self.p.poll()
        return self.p.exitcode

    def wait(self, timeout):
        if isinstance(self.p, subprocess.Popen):
            return self.p.wait(timeout=timeout)
        self.p.join(timeout)
        return self.p.exitcode

    def elapsed(self):
        return time.monotonic() - self.t0

    def text(self):
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def epoch_lines(self):
        return re.findall(r"^EPOCH (\d+)/", self.text(), re.M)

    def own_temp(self, folder: Path | None, name="latest.pt"):
        if folder is None or not folder.is_dir():
            return False
        return any(p.name.startswith(f".{name}.{self.pid}.") for p in folder.iterdir())

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)
        self.wait(30)


def wait_until(proc: Proc, cond, timeout=90.0, step=0.001) -> bool:
    """Poll `cond` until true (then SIGKILL at once) or the process exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            proc.kill()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(step)
    proc.kill()
    raise AssertionError(f"trigger not reached within {timeout}s:\n{proc.text()[-2000:]}")


def run_dirs(out: Path) -> set[Path]:
    return set(out.iterdir()) if out.is_dir() else set()


class After:
    """A condition that, once first true, waits `delay` more seconds."""

    def __init__(self, cond, delay=0.0):
        self.cond, self.delay, self.since = cond, delay, None

    def __call__(self):
        if self.since is None and self.cond():
            self.since = time.monotonic()
        return self.since is not None and time.monotonic() - self.since >= self.delay


@pytest.mark.slow
def test_sigkill_at_many_moments_never_leaves_a_broken_checkpoint(tmp_path):
    data = make_image_dataset(tmp_path / "ds", n_train=4, n_val=2)
    out = tmp_path / "out"
    common = ["--data-dir", data, "--weights", "none", "--device", "cpu", "--epochs", EPOCHS,
              "--batch-size", "2", "--output-dir", out]
    rng = random.Random(5)
    kills, report = 0, []

    def new_run(before):
        new = run_dirs(out) - before
        return next(iter(new)) if new else None

    def fresh(label, make_cond, cli=False):
        nonlocal kills
        before = run_dirs(out)
        proc = Proc(common, tmp_path, tmp_path / f"log{len(report)}.txt", cli=cli)
        killed = wait_until(proc, make_cond(proc, lambda: new_run(before)))
        kills += killed
        new = run_dirs(out) - before
        for run in new:
            check_run_folder(run)
        report.append((label, killed, sorted(p.name for r in new for p in r.iterdir())))
        return new

    # 1. fresh runs killed before any checkpoint exists: no checkpoint, no junk
    fresh("python train.py: startup (imports)", lambda p, run: lambda: p.elapsed() > 0.4, cli=True)
    fresh("setup / first epoch", lambda p, run: lambda: run() is not None and (run() / "args.json").exists())
    fresh("mid-save of epoch 1", lambda p, run: lambda: p.own_temp(run()))
    # 2. the run that is then resumed and killed again and again
    new = fresh("between epochs (EPOCH 2 line + random delay)",
                lambda p, run: After(lambda: len(p.epoch_lines()) >= 2, rng.uniform(0, 0.3)))
    assert len(new) == 1
    run = next(iter(new))
    latest = check_run_folder(run)
    assert latest.get("epoch", 0) >= 2

    def resumed(label, make_cond):
        nonlocal kills, latest
        before_epoch = latest["epoch"]
        inode = (run / "latest.pt").stat().st_ino
        replaced = lambda: (run / "latest.pt").stat().st_ino != inode  # noqa: E731
        proc = Proc(common + ["--resume", run / "latest.pt"], tmp_path, tmp_path / f"log{len(report)}.txt")
        killed = wait_until(proc, make_cond(proc, replaced))
        kills += killed
        latest = check_run_folder(run)
        assert latest["epoch"] >= before_epoch  # never goes back
        report.append((label, killed, latest["epoch"]))

    resumed("resume: while loading", lambda p, replaced: lambda: p.elapsed() > 0.3)
    resumed("resume: mid-save", lambda p, replaced: lambda: p.own_temp(run))
    resumed("resume: the instant latest.pt is replaced (best link, metrics.csv)", lambda p, replaced: replaced)
    resumed("resume: the instant an EPOCH line appears", lambda p, replaced: lambda: len(p.epoch_lines()) >= 1)
    resumed("resume: mid-save of the 2nd epoch in this process",
            lambda p, replaced: lambda: len(p.epoch_lines()) >= 1 and p.own_temp(run))
    for _ in range(2):
        delay = rng.uniform(0.0, 0.9)
        resumed(f"resume: random moment, {delay:.2f}s after the first save",
                lambda p, replaced, d=delay: After(replaced, d))

    assert kills >= 10, report
    # 3. a last resume (`python train.py --resume`) runs the rest of the run to its end
    final = latest["epoch"] + 3
    args = [a if a != EPOCHS else final for a in common]
    proc = Proc(args + ["--resume", run / "latest.pt"], tmp_path, tmp_path / "final.txt", cli=True)
    assert proc.wait(timeout=240) == 0, proc.text()[-3000:]
    latest = check_run_folder(run)
    assert latest["epoch"] == final
    assert f"RESUME: continuing at epoch {final - 2}/{final}" in proc.text() and f"EPOCH {final}/{final}" in proc.text()
    assert len(list(csv.DictReader((run / "metrics.csv").open()))) == final
    leftovers = sorted(p.name for p in run.iterdir() if p.name not in FINAL_NAMES)
    # latest.pt and metrics.csv are written every epoch, so their writers' leftovers are gone
    assert not [n for n in leftovers if n.startswith((".latest.pt.", ".metrics.csv."))], leftovers
    # a resume repairs what a kill left (core.run_folder.recover_run_folder): no temp files, best_acc.pt is the best epoch
    assert not leftovers
    best = torch.load(run / "best_acc.pt", weights_only=True)
    assert best["epoch"] == latest["best_epoch"], "best_acc.pt is not the epoch latest.pt calls best"
    print(f"\nRELIABILITY kill test: {kills} SIGKILLs survived, run resumed to epoch {final}")
    for r in report:
        print("  ", r)
