"""Side-by-side benchmark: naive reference-style loop vs the project's engine.

    python bench/run_bench.py                      # the full run (about 1 h on an idle 2-core machine, longer on a busy one)
    python bench/run_bench.py --quick              # smoke run (about 5-10 min)
    python bench/run_bench.py --datasets mini --repeats 3 --sections train
    python bench/run_bench.py --render results.json   # re-write the markdown from saved results

Every training measurement is a whole child process (imports included), as a user
would run it; naive and project runs are interleaved (order alternates per repeat)
so background load hits both alike, and ratios are medians of per-repeat ratios.
See bench/README.md for what each column means. Not part of the test suite."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared").resolve()
DATASETS = {"mini": SHARED / "data" / "catfish-mini", "full": SHARED / "data" / "catfish"}
DS_LABEL = {"mini": "catfish-mini", "full": "catfish"}
MNV2_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"
PY = sys.executable

# Targets from issue 4 (ratios of 10-epoch wall time, naive / project).
TARGETS = {("full", "head"): 10.0, ("mini", "head"): 4.0, ("full", "last"): 3.0, ("mini", "last"): 3.0}


# ---------------------------------------------------------------- planning

def row_epochs(ds: str, policy: str, args) -> tuple[int, int]:
    """(naive epochs, project epochs). 10 each unless a side would take far more than
    ~10 minutes on 2 busy cores; then the naive loop (identical work every epoch) runs
    fewer epochs and is projected to 10 from its steady s/epoch."""
    if args.epochs:
        return args.epochs, args.epochs
    if args.quick:
        return 3, 3
    if policy == "full":
        return (10, 10) if ds == "mini" else (2, 2)  # no cache on either side: per-epoch ratio is the point
    return (10, 10) if ds == "mini" else (args.naive_epochs_full, 10)


def plan(args) -> list[dict]:
    """Rows in priority order: A = the targets (mobilenet_v2 head/last, real weights),
    B = resnet18 timings (random weights), C = full fine-tune."""
    rows = []
    groups = [("A", ["mobilenet_v2"], ["head", "last"]), ("B", ["resnet18"], ["head", "last"]),
              ("C", ["mobilenet_v2", "resnet18"], ["full"])]
    for group, archs, policies in groups:
        for ds in args.datasets:
            for arch in archs:
                for policy in policies:
                    if arch not in args.archs or policy not in args.policies:
                        continue
                    n_ep, p_ep = row_epochs(ds, policy, args)
                    reps = args.repeats if ds == "mini" else args.repeats_full
                    if group != "A":
                        reps = min(reps, args.repeats_other)
                    variants = [("default", [])]
                    if policy == "head" and not args.no_variants:  # the other cacheable choice (two flip views)
                        variants.append(("augment light", ["--augment", "light"]))
                    if policy != "head" and not args.no_variants and not args.no_amp:  # bf16 on CPUs that have it
                        variants.append(("amp 1", ["--amp", "1"]))
                    rows.append({"group": group, "ds": ds, "arch": arch, "policy": policy, "naive_epochs": n_ep,
                                 "proj_epochs": p_ep, "repeats": max(1, reps),
                                 "weights": str(MNV2_WEIGHTS) if arch == "mobilenet_v2" else "none",
                                 "variants": variants})
    return rows


# ---------------------------------------------------------------- child processes

def child_env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", TL_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


def code_version() -> str:
    """Commit (+dirty) of the code a child runs: the engine may change between runs of a long bench."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "core", "cli", "train.py", "predict.py", "app.py"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return head + ("+dirty" if dirty else "")


def run_child(cmd: list[str], log_path: Path, timeout: float = 3600) -> dict:
    """Run a whole process; time-stamp each stdout line; peak RSS via wait4."""
    version = code_version()
    load0 = os.getloadavg()[0]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path.with_suffix(".err"), "w") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        killer = threading.Timer(timeout, p.kill)
        killer.start()
        lines = []
        for line in p.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        killer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
    log_path.write_text("".join(f"{t:9.3f} {l}\n" for t, l in lines))
    return {"cmd": cmd, "rc": p.returncode, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "maxrss_mb": ru.ru_maxrss / 1024,
            "lines": lines, "load": [load0, os.getloadavg()[0]], "log": str(log_path), "code": version}


EPOCH_RE = re.compile(r"^EPOCH (\d+)/(\d+) .*val_loss=([0-9.naninf]+) val_acc=([0-9.]+)")


def parse_training(res: dict) -> dict:
    epochs = [(t, int(m[1]), float(m[4])) for t, l in res["lines"] if (m := EPOCH_RE.match(l))]
    out = {"rc": res["rc"], "wall": res["wall"], "cpu": res["cpu"], "code": res.get("code"), "maxrss_mb": res["maxrss_mb"], "load": res["load"], "log": res["log"],
           "epochs_done": len(epochs), "val_acc": [a for _, _, a in epochs]}
    if len(epochs) >= 2:
        out["period"] = (epochs[-1][0] - epochs[0][0]) / (len(epochs) - 1)  # steady-state s/epoch, saves included
    elif epochs:  # one epoch: the in-process epoch time (project: metrics.csv, which excludes the save)
        secs = [float(l.split()[1]) for _, l in res["lines"] if l.startswith("EPOCH_SECONDS ")]
        run_dir = next((l[9:] for _, l in res["lines"] if l.startswith("RUN_DIR: ")), None)
        if not secs and run_dir and (Path(run_dir) / "metrics.csv").exists():
            import csv
            with open(Path(run_dir) / "metrics.csv") as fh:
                secs = [float(r["seconds"]) for r in csv.DictReader(fh)]
        out["period"] = secs[-1] if secs else epochs[0][0]
    if epochs:
        out["setup"] = max(0.0, epochs[0][0] - out["period"])  # imports, model, decoding, feature cache
    for _, l in res["lines"]:
        if m := re.match(r"^RUN_DIR: (.*)$", l):
            out["run_dir"] = m[1]
        if m := re.match(r"^\s+val: (\d+) images", l):
            out["n_val"] = int(m[1])
        if l.startswith("NOTE: feature cache"):
            out["cache_note"] = l[6:]
        if l.startswith("MODEL:") and (m := re.search(r"augment=(\w+)", l)):
            out["augment"] = m[1]
    return out


def train_cmds(row: dict, out: Path, tag: str, extra: list[str]) -> tuple[list[str], list[str], Path, Path]:
    data = str(DATASETS[row["ds"]])
    common = ["--data-dir", data, "--arch", row["arch"], "--weights", row["weights"], "--policy", row["policy"]]
    ndir, pdir = out / "tmp" / f"naive_{tag}", out / "tmp" / f"proj_{tag}"
    naive = [PY, str(ROOT / "bench" / "naive_reference.py"), *common, "--epochs", str(row["naive_epochs"]),
             "--output-dir", str(ndir)]
    proj = [PY, str(ROOT / "train.py"), *common, "--epochs", str(row["proj_epochs"]), "--device", "cpu",
            "--output-dir", str(pdir), "--run-name", "bench", *extra]
    return naive, proj, ndir, pdir


def run_training(args, results: dict, save) -> None:
    rows = plan(args)
    results["train_rows"] = rows_out = []
    for row in rows:
        row_out = {k: v for k, v in row.items() if k != "variants"}
        row_out.update(naive=[], project={name: [] for name, _ in row["variants"]})
        rows_out.append(row_out)
    for row, row_out in zip(rows, rows_out):
        for rep in range(row["repeats"]):
            jobs = []
            for i, (name, extra) in enumerate(row["variants"]):
                tag = f"{row['ds']}_{row['arch']}_{row['policy']}_{name.replace(' ', '-')}_r{rep}"
                naive, proj, ndir, pdir = train_cmds(row, Path(args.out), tag, extra)
                if i == 0:
                    jobs.append(("naive", "", naive, ndir, tag, row["naive_epochs"]))
                jobs.append(("project", name, proj, pdir, tag, row["proj_epochs"]))
            if rep % 2:  # alternate who goes first, so drifting background load hits both alike
                jobs.reverse()
            for who, name, cmd, d, tag, ep in jobs:
                print(f"[{time.strftime('%H:%M:%S')}] {row['group']} rep {rep + 1}/{row['repeats']} {DS_LABEL[row['ds']]} "
                      f"{row['arch']} {row['policy']} {who}{' (' + name + ')' if name else ''} {ep} ep ...",
                      end=" ", flush=True)
                m = parse_training(run_child(cmd, Path(args.out) / "logs" / f"{who}_{tag}.log"))
                print(f"wall {m['wall']:.1f}s cpu {m['cpu']:.1f}s rc {m['rc']} val_acc {m['val_acc'][-1:]} "
                      f"rss {m['maxrss_mb']:.0f}MB load {m['load'][0]:.1f}", flush=True)
                keep_ckpt(args, row, rep, who, name, m)
                shutil.rmtree(d, ignore_errors=True)
                (row_out["naive"] if who == "naive" else row_out["project"][name]).append(m)
                save()


def keep_ckpt(args, row, rep, who, name, m) -> None:
    """Keep one project checkpoint per arch for the prediction benchmarks."""
    if who != "project" or name != "default" or row["policy"] != "head" or m["rc"] != 0 or "run_dir" not in m:
        return
    src = Path(m["run_dir"]) / "best_acc.pt"
    dst = Path(args.out) / "ckpt" / f"{row['arch']}.pt"
    if src.exists() and not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


# ---------------------------------------------------------------- prediction

def ensure_ckpt(args, arch: str) -> Path | None:
    dst = Path(args.out) / "ckpt" / f"{arch}.pt"
    if dst.exists():
        return dst
    row = {"ds": "mini", "arch": arch, "policy": "head", "naive_epochs": 2, "proj_epochs": 2,
           "weights": str(MNV2_WEIGHTS) if arch == "mobilenet_v2" else "none"}
    _, proj, _, pdir = train_cmds(row, Path(args.out), f"ckpt_{arch}", [])
    m = parse_training(run_child(proj, Path(args.out) / "logs" / f"ckpt_{arch}.log"))
    keep_ckpt(args, {**row}, 0, "project", "default", m)
    shutil.rmtree(pdir, ignore_errors=True)
    return dst if dst.exists() else None


def run_predict(args, results: dict, save) -> None:
    results["predict"] = {}
    ds = "full" if "full" in args.datasets and DATASETS["full"].is_dir() else "mini"
    root = DATASETS[ds]
    folders = [str(root / "val")] + ([str(root / "test")] if (root / "test").is_dir() else [])
    image = str(sorted((root / "val" / "cat").glob("*.jpg"))[0])
    for arch in args.archs:
        ck = ensure_ckpt(args, arch)
        if ck is None:
            results["predict"][arch] = {"error": "could not make a checkpoint"}
            continue
        print(f"[{time.strftime('%H:%M:%S')}] predict {arch} ...", end=" ", flush=True)
        res = run_child([PY, str(ROOT / "bench" / "predict_bench.py"), "--checkpoint", str(ck), "--image", image,
                         "--folders", *folders, "--n", str(10 if args.quick else 40),
                         "--folder-repeats", str(1 if args.quick else 5)],
                        Path(args.out) / "logs" / f"predict_{arch}.log")
        try:
            r = json.loads(res["lines"][-1][1])
        except (IndexError, ValueError):
            r = {"error": f"rc {res['rc']}, see {res['log']}"}
        cli = []
        for _ in range(1 if args.quick else 3):  # whole-process predict.py: what a CLI user waits
            c = run_child([PY, str(ROOT / "predict.py"), "--checkpoint", str(ck), "--image", image, "--device", "cpu"],
                          Path(args.out) / "logs" / f"predict_cli_{arch}.log")
            cli.append(c["wall"])
        r["cli_wall_s"] = statistics.median(cli)
        r["dataset"] = DS_LABEL[ds]
        results["predict"][arch] = r
        print(json.dumps({k: r.get(k) for k in ("single", "folder")})[:400], flush=True)
        save()


# ---------------------------------------------------------------- app

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_app(args, results: dict, save) -> None:
    app = ROOT / "app.py"
    if not app.exists():
        print("app.py not found: skipping the app launch measurement (rerun with --sections app later)", flush=True)
        results["app"] = {"error": "app.py not found"}
        save()
        return
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    times, rss, errors = [], [], []
    for rep in range(1 if args.quick else 3):
        port = free_port()
        log = Path(args.out) / "logs" / f"app_{rep}.log"
        with open(log, "w") as err:
            t0 = time.perf_counter()
            p = subprocess.Popen([PY, str(app), "--port", str(port)], cwd=ROOT, env=child_env(),
                                 stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
        ok, ru = None, None  # never p.wait()/p.poll(): os.wait4 reaps the child and gives its rusage

        def reap(block_s: float):
            end = time.perf_counter() + block_s
            while True:
                pid, _, r = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    return r
                if time.perf_counter() >= end:
                    return None
                time.sleep(0.1)

        while time.perf_counter() - t0 < 180:
            try:
                with opener.open(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        ok = time.perf_counter() - t0
                        break
            except OSError:
                pass
            if (ru := reap(0)) is not None:
                break  # exited before serving
            time.sleep(0.1)
        for sig, grace in ((signal.SIGINT, 15), (signal.SIGKILL, 10)):
            if ru is not None:
                break
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            ru = reap(grace)
        p.returncode = 0  # already reaped
        if ru is not None:
            rss.append(ru.ru_maxrss / 1024)
        if ok is None:
            errors.append(f"no HTTP 200 within 180 s (or it exited); see {log}")
        else:
            times.append(ok)
        print(f"[{time.strftime('%H:%M:%S')}] app launch -> first page: {ok}", flush=True)
    results["app"] = {"first_page_s": statistics.median(times) if times else None, "all": times,
                      "maxrss_mb": max(rss) if rss else None, "errors": errors}
    save()


# ---------------------------------------------------------------- machine

def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":")[1].strip()
    except OSError:
        pass
    v = subprocess.run([PY, "-c", "import torch, torchvision; print(torch.__version__, torchvision.__version__, "
                                  "torch.get_num_threads())"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    t = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", "import torch, torchvision"], cwd=ROOT)
        t.append(time.perf_counter() - t0)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "core", "train.py", "cli"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "mem": mem,
            "python": platform.python_version(), "torch": v[0] if v else "?", "torchvision": v[1] if len(v) > 1 else "?",
            "torch_threads": v[2] if len(v) > 2 else "?", "import_torch_s": statistics.median(t),
            "date": dt.datetime.now().isoformat(timespec="seconds"), "git": git + (" (+uncommitted engine changes)" if dirty else ""),
            "load_start": os.getloadavg()}


# ---------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f(x, fmt="{:.1f}", none="–"):
    return none if x is None else fmt.format(x)


def projected(m: dict, epochs: int, to: int = 10) -> float | None:
    """Whole-process time projected to `to` epochs: wall + (to - epochs) x steady s/epoch."""
    if m.get("rc") != 0 or "period" not in m:
        return None
    return m["wall"] + (to - epochs) * m["period"]


def augment_from_log(m: dict) -> str | None:
    """Effective augmentation from a saved child log (results written before it was parsed)."""
    try:
        return next((x[1] for l in Path(m["log"]).read_text().splitlines()
                     if "MODEL:" in l and (x := re.search(r"augment=(\w+)", l))), None)
    except (OSError, KeyError):
        return None


def row_stats(row: dict, name: str) -> dict:
    naive, proj = row["naive"], row["project"][name]
    pairs = [(n, p) for n, p in zip(naive, proj) if n["rc"] == 0 and p["rc"] == 0]
    en, ep = row["naive_epochs"], row["proj_epochs"]
    k = min(en, ep)  # accuracies compared at the same epoch
    s = {"n": len(pairs),
         "naive_wall": med([n["wall"] for n, _ in pairs]), "proj_wall": med([p["wall"] for _, p in pairs]),
         "ratio_measured": med([n["wall"] / p["wall"] for n, p in pairs]) if en == ep else None,
         "cpu_ratio": med([n["cpu"] / p["cpu"] for n, p in pairs]) if en == ep else None,
         "naive_cpu": med([n["cpu"] for n, _ in pairs]), "proj_cpu": med([p["cpu"] for _, p in pairs]),
         "ratio10": med([projected(n, en) / projected(p, ep) for n, p in pairs
                         if projected(n, en) and projected(p, ep)]),
         "naive_period": med([n.get("period") for n, _ in pairs]),
         "proj_period": med([p.get("period") for _, p in pairs]),
         "proj_setup": med([p.get("setup") for _, p in pairs]),
         "naive_setup": med([n.get("setup") for n, _ in pairs]),
         "acc_k": k,
         "naive_acc": med([n["val_acc"][k - 1] for n, _ in pairs if len(n["val_acc"]) >= k]),
         "proj_acc": med([p["val_acc"][k - 1] for _, p in pairs if len(p["val_acc"]) >= k]),
         "proj_final": med([p["val_acc"][-1] for _, p in pairs if p["val_acc"]]),
         "proj_best": med([max(p["val_acc"]) for _, p in pairs if p["val_acc"]]),
         "naive_best": med([max(n["val_acc"]) for n, _ in pairs if n["val_acc"]]),
         "naive_rss": max([n["maxrss_mb"] for n in naive] or [0]) or None,
         "proj_rss": max([p["maxrss_mb"] for p in proj] or [0]) or None,
         "n_val": next((p["n_val"] for p in proj if "n_val" in p), None),
         "load": med([x for m in naive + proj for x in m["load"]]),
         "augment": next((a for p in proj if (a := p.get("augment") or augment_from_log(p))), None),
         "failed": [m["log"] for m in naive + proj if m["rc"] != 0]}
    if s["naive_period"] and s["proj_period"]:
        s["period_ratio"] = s["naive_period"] / s["proj_period"]
    return s


def verdict(row: dict, name: str, s: dict) -> str:
    if name not in ("default", "amp 1"):
        return "(variant)"
    target = TARGETS.get((row["ds"], row["policy"]))
    if target is None or s["ratio10"] is None:
        return "no target"
    out = f"≥{target:g}×: " + ("met" if s["ratio10"] >= target else "**MISSED**")
    if row["weights"] != "none" and s["naive_acc"] is not None and s["proj_acc"] is not None and s["n_val"]:
        acc_ok = s["proj_acc"] >= s["naive_acc"] - 1 / s["n_val"] - 1e-3  # logs print 4 decimals
        out += "; acc " + ("ok" if acc_ok else "**worse**")
    return out


def render(results: dict) -> str:
    m = results.get("machine", {})
    rows = results.get("train_rows", [])
    loads = [row_stats(r, "default")["load"] for r in rows]
    L = ["# Benchmark results", "",
         f"Run {m.get('date', '?')} at commit {m.get('git', '?')} with `{results.get('argv', '')}`.", "",
         *[f"Training rows ({', '.join(x['rows']) or 'none'}) replaced by a later run, {x['date']} at commit "
           f"{x['git']} with `{x['argv']}` ({x['file']})." + "\n"
           for x in results.get("merged", []) if isinstance(x, dict)],
         f"- Machine: {m.get('cpu')} CPU, {m.get('cores')} cores visible ({m.get('affinity')} usable), {m.get('mem')} RAM. "
         f"**Shared** with other engineers' test runs: the 1-min load average at each run is in the *load* column "
         f"(≈2 = this benchmark alone, since torch uses both cores); under extra load absolute times inflate and "
         f"small-batch work suffers most, so compare ratios within a row (naive/project runs are interleaved).",
         f"- Python {m.get('python')}, torch {m.get('torch')}, torchvision {m.get('torchvision')}, "
         f"torch threads {m.get('torch_threads')}; `import torch, torchvision` alone: {f(m.get('import_torch_s'), '{:.1f}')} s.",
         "- Naive = `bench/naive_reference.py` (ImageFolder + DataLoader, RandomResizedCrop+flip, full forward every batch, "
         "`model.train()` every epoch, AdamW, latest/best checkpoints each epoch). Project = `train.py` with its defaults "
         "(batch 16, lr 1e-3, `--augment auto`, which resolves per policy as shown in the *project variant* column). "
         "Both are whole processes, timed from spawn to exit. Variant rows add the flag named in the *project variant* column "
         "(`amp 1` = `--amp 1`, bfloat16 autocast on this CPU, which has native bf16).",
         "- mobilenet_v2 rows use the shared ImageNet weights; resnet18 rows use random weights (timing only).",
         ""]
    versions = sorted({m.get("code") for r in rows for m in r["naive"] + [x for v in r["project"].values() for x in v]
                       if m.get("code")})
    if len(versions) > 1:
        L += [f"**Note:** the engine changed during this run; training rows ran code {', '.join(versions)} "
              f"(per-run versions in the JSON).", ""]
    if rows:
        L += ["## Training", "",
              "| dataset | arch | policy | project variant | epochs naive / project | runs | load | naive wall s | project wall s | "
              "**10-epoch ratio** | CPU-time ratio | naive s/ep | project s/ep | project setup s | val acc naive / project @ep | "
              "project final (best) | peak RSS MB naive / project | target |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            for name in row["project"]:
                s = row_stats(row, name)
                en, ep = row["naive_epochs"], row["proj_epochs"]
                mark = "" if en == ep == 10 else " †"
                real = row["weights"] != "none"
                acc = (f"{f(s['naive_acc'], '{:.3f}')} / {f(s['proj_acc'], '{:.3f}')} @{s['acc_k']}" if real else "n/a")
                fin = (f"{f(s['proj_final'], '{:.3f}')} ({f(s['proj_best'], '{:.3f}')})" if real else "n/a")
                variant = f"{name} (augment={s['augment']})" if name == "default" and s.get("augment") else name
                L.append(f"| {DS_LABEL[row['ds']]} | {row['arch']} | {row['policy']} | {variant} | {en} / {ep}{mark} | {s['n']} | "
                         f"{f(s['load'], '{:.1f}')} | "
                         f"{f(s['naive_wall'])} | {f(s['proj_wall'])} | **{f(s['ratio10'], '{:.2f}×')}** | {f(s['cpu_ratio'], '{:.2f}×')} | "
                         f"{f(s['naive_period'], '{:.2f}')} | {f(s['proj_period'], '{:.2f}')} | {f(s['proj_setup'])} | "
                         f"{acc} | {fin} | {f(s['naive_rss'], '{:.0f}')} / {f(s['proj_rss'], '{:.0f}')} | {verdict(row, name, s)} |")
                if s["failed"]:
                    L.append(f"| | | | failed runs: {', '.join(s['failed'])} | | | | | | | | | | | | | | |")
        L += ["", "**10-epoch ratio** = naive time / project time for 10 epochs, whole processes (imports, decoding, "
              "feature cache and checkpoint writes included), median over runs of the per-run ratio. "
              "† = a side ran fewer than 10 epochs because 10 would take far more than 10 minutes on these shared cores; "
              "its 10-epoch time is projected as wall + (10 − epochs) × s/ep, where s/ep is the steady per-epoch time "
              "(line-to-line time between EPOCH lines, checkpoint writes included; for a 1-epoch run, the in-process epoch time). "
              "Both loops do identical work every epoch after setup, so the projection is linear. "
              "Accuracies are compared at the same epoch (@ep); *project final* is after all its epochs. "
              "Accuracy rule: project ≥ naive − 1 image. *CPU-time ratio* = naive / project user+sys CPU seconds "
              "of the whole processes (rows where both ran the same epochs): less sensitive to other people's load "
              "than wall time, but it counts both torch threads, including their spin-waits.", ""]
    p = results.get("predict", {})
    if p:
        L += ["## Prediction (in-process, warm, medians of interleaved calls)", "",
              "| arch | image | predict_image(path) ms | bare forward, model as loaded ms | **ratio** (target ≤ 1.3) | "
              "bare forward, folded copy ms | path / folded (pre- and post-processing share) | folder images | "
              "batched img/s | reference loop img/s | **speedup vs reference loop** (target ≥ 1.5) | "
              "own predict_image loop img/s | speedup vs own loop | top-1 agree (own / reference) | "
              "predict.py whole process s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for arch, r in p.items():
            if "error" in r:
                L.append(f"| {arch} | error: {r['error']} |" + " |" * 13)
                continue
            sg, fo = r["single"], r["folder"]
            if "ratio_path_loaded" not in sg:  # results from before the loaded-model/reference columns
                L.append(f"| {arch} | older result format, see the JSON |" + " |" * 13)
                continue
            ok1 = "met" if sg["ratio_path_loaded"] <= 1.3 else "**MISSED**"
            ok2 = "met" if fo["speedup_reference"] >= 1.5 else "**MISSED**"
            L.append(f"| {arch} | {sg['size'][0]}×{sg['size'][1]} JPEG | {sg['predict_path_ms']:.1f} | "
                     f"{sg['bare_loaded_ms']:.1f} | **{sg['ratio_path_loaded']:.2f}** ({ok1}) | "
                     f"{sg['bare_forward_ms']:.1f} | {sg['ratio_path']:.2f} | "
                     f"{fo['images']} ({r.get('dataset')} val+test) | {fo['batched_img_per_s']:.1f} | "
                     f"{fo['reference_img_per_s']:.1f} | **{fo['speedup_reference']:.2f}×** ({ok2}) | "
                     f"{fo['loop_img_per_s']:.1f} | {fo['speedup']:.2f}× | "
                     f"{fo['top1_agree']} / {fo['top1_agree_reference']} of {fo['images']} | {f(r.get('cli_wall_s'))} |")
        L += ["", "*Model as loaded* = the trained model object, the module a user's own `model(x)` call runs. "
              "*Folded copy* = the BatchNorm-folded eval copy the Predictor runs internally (same function); the "
              "path / folded ratio is therefore decoding + resize + normalise + softmax/top-k over a pure forward. "
              "*Reference loop* = the reference predict script one image at a time: `PIL.Image.open(p).convert('RGB')`, "
              "`Compose(Resize(256), CenterCrop(224), ToTensor(), Normalize)`, `model(x)` under `no_grad`, model as "
              "loaded (contiguous). *Own loop* = `[predict_image(p) for p in paths]`, which already has every other "
              "speed-up. Batched = `predict_paths` (batches of 8 on CPU, next batch decoded by a worker thread).", ""]
    mem = [(r, row_stats(r, "default")) for r in rows if r["ds"] == "full"]
    a = results.get("app")
    L += ["## Memory and app start", ""]
    if mem:
        L.append("- Peak RSS (`ru_maxrss`) of `train.py` on catfish, target < 2048 MB (naive loop for comparison):")
        for pol in ("head", "last", "full"):
            pr = [(r, st) for r, st in mem if r["policy"] == pol and st["proj_rss"]]
            if pr:
                r, st = max(pr, key=lambda t: t[1]["proj_rss"])
                ok = "met" if st["proj_rss"] < 2048 else "**MISSED**"
                L.append(f"  - {pol}: {st['proj_rss']:.0f} MB ({r['arch']}; naive {f(st['naive_rss'], '{:.0f}')} MB) — {ok}")
            amp = [(r, row_stats(r, "amp 1")) for r, _ in pr if "amp 1" in r["project"]]
            amp = [(r, st) for r, st in amp if st["proj_rss"]]
            if amp:
                r, st = max(amp, key=lambda t: t[1]["proj_rss"])
                ok = "met" if st["proj_rss"] < 2048 else "**MISSED**"
                L.append(f"  - {pol} with `--amp 1` (bfloat16): {st['proj_rss']:.0f} MB ({r['arch']}) — {ok}")
        L.append("  - `import torch, torchvision` alone peaks near 800 MB with this CUDA build of torch.")
    if a:
        if a.get("first_page_s") is not None:
            L.append(f"- `python app.py --port N` → first HTTP 200 on `/`: {a['first_page_s']:.1f} s "
                     f"(median of {len(a['all'])}; peak RSS {f(a.get('maxrss_mb'), '{:.0f}')} MB).")
        else:
            L.append(f"- App launch: not measured ({a.get('error') or '; '.join(a.get('errors', []))}).")
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="catfish-mini, head+last, 3 epochs, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per catfish-mini row (default 3)")
    ap.add_argument("--repeats-full", type=int, default=1, help="repeats per catfish row (default 1)")
    ap.add_argument("--repeats-other", type=int, default=1,
                    help="cap on repeats of the resnet18 and full fine-tune rows (default 1)")
    ap.add_argument("--naive-epochs-full", type=int, default=10,
                    help="epochs the naive loop runs on catfish head/last rows; fewer are projected to 10 (default 10)")
    ap.add_argument("--datasets", default="mini,full", help="mini,full")
    ap.add_argument("--archs", default="mobilenet_v2,resnet18")
    ap.add_argument("--policies", default="head,last,full")
    ap.add_argument("--epochs", type=int, default=None, help="force this many epochs for every row")
    ap.add_argument("--no-variants", action="store_true",
                    help="skip the extra project runs ('augment light' on head rows, '--amp 1' on last/full rows)")
    ap.add_argument("--no-amp", action="store_true", help="skip only the '--amp 1' project runs")
    ap.add_argument("--sections", default="predict,app,train", help="any of predict,app,train, run in this order")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--md", default=None, help="markdown output (default bench/RESULTS.md; --quick: OUT/RESULTS-quick.md)")
    ap.add_argument("--notes", default=None, help="markdown file appended to the rendered results")
    ap.add_argument("--render", nargs="+", default=None,
                    help="only re-render markdown from results JSON file(s); later files override earlier sections")
    args = ap.parse_args()
    if args.render:
        results = {}
        for path in args.render:
            part = json.loads(Path(path).read_text())
            if results:
                machine = part.pop("machine", {})  # keep the first file's machine info and argv
                merged = {"file": Path(path).name, "argv": part.pop("argv", ""), "date": machine.get("date"),
                          "git": machine.get("git"), "rows": []}
                if "train_rows" in part and "train_rows" in results:  # rows of later files replace same rows
                    key = lambda r: (r["ds"], r["arch"], r["policy"])
                    new_rows = {key(r): r for r in part.pop("train_rows")}
                    merged["rows"] = sorted({f"{DS_LABEL[r['ds']]} {r['policy']}" for r in new_rows.values()})
                    rows = [new_rows.pop(key(r), r) for r in results["train_rows"]]
                    results["train_rows"] = rows + list(new_rows.values())
                results.setdefault("merged", []).append(merged)
            results.update(part)
        md = Path(args.md or ROOT / "bench" / "RESULTS.md")
        notes = "\n" + Path(args.notes).read_text() if args.notes else ""
        md.write_text(render(results) + notes)
        print(f"wrote {md}")
        return 0
    if args.quick:
        args.datasets, args.policies, args.repeats, args.repeats_full = "mini", "head,last", 1, 1
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.archs = [a for a in args.archs.split(",") if a]
    args.policies = [p for p in args.policies.split(",") if p]
    sections = args.sections.split(",")
    missing = [DS_LABEL[d] for d in args.datasets if not DATASETS[d].is_dir()]
    if missing or not MNV2_WEIGHTS.exists():
        print(f"skipping: {SHARED} lacks {missing or MNV2_WEIGHTS} (benchmarks need ../shared)", file=sys.stderr)
        return 0
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    json_path = out / f"results_{stamp}.json"
    md = Path(args.md) if args.md else (out / "RESULTS-quick.md" if args.quick else ROOT / "bench" / "RESULTS.md")
    results = {"argv": " ".join(["python bench/run_bench.py"] + sys.argv[1:]), "machine": machine_info()}
    shutil.rmtree(out / "ckpt", ignore_errors=True)

    def save():
        json_path.write_text(json.dumps(results, indent=1, default=str))

    save()
    print(f"results -> {json_path}", flush=True)
    for section in sections:  # in the order given; the short ones first by default
        {"train": run_training, "predict": run_predict, "app": run_app}[section](args, results, save)
    results["machine"]["load_end"] = os.getloadavg()
    save()
    shutil.rmtree(out / "tmp", ignore_errors=True)
    md.write_text(render(results))
    print(render(results))
    print(f"wrote {md} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
