"""Memory and time as the dataset grows (issue 19, item 2).

Generates synthetic small JPEGs OUTSIDE the repository (default /tmp/tl_scale_bench),
then for each size trains head-only for 1 epoch in a fresh process (the project's
engine, as train.py runs it) and reports wall time per image and the process's
peak RSS (os.wait4 on that child: its own rusage, DataLoader workers included
as waited-for descendants, so each size is measured alone).

    .venv/bin/python bench/scale_bench.py --sizes 2500 5000 10000 20000 --max-minutes 15

Sizes are run in order; a size whose projected time (the last size's time per
image x its images) would pass --max-minutes is not started, and the report
says so. Model: MobileNetV2 with --weights none (no download needed; the cost of
a forward pass does not depend on the weights' values) on 32-px crops of 37-px
images, so a 2-core machine finishes in minutes: the point is how memory and
time scale with the number of images, not the absolute speed. (Head-only uses
the feature cache, so no decoded image is kept, whatever their size.)"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_pool(root: Path, n_train: int, n_val: int, side: tuple[int, int] = (64, 48)) -> Path:
    """n_train + n_val JPEGs in two classes (reddish / bluish gradients with noise); reused when present."""
    import numpy as np
    from PIL import Image
    pool = root / "pool"
    done = pool / f".complete_{n_train}_{n_val}"
    if done.exists():
        return pool
    rng = np.random.default_rng(0)
    w, h = side
    ramp = np.linspace(0, 1, w)[None, :, None]
    for split, n in (("train", n_train), ("val", n_val)):
        for c, cls in enumerate(("red", "blue")):
            (pool / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            c = i % 2
            base = np.zeros((h, w, 3))
            base[..., 0 if c == 0 else 2] = 0.4 + 0.5 * ramp[..., 0]
            img = np.clip(base * 255 + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(pool / split / ("red", "blue")[c] / f"{i:06d}.jpg", quality=85)
    done.touch()
    return pool


def subset(root: Path, pool: Path, n_train: int) -> Path:
    """A dataset of the first n_train train images and n_train/10 val images (hard links)."""
    out = root / f"n{n_train}"
    if (out / ".complete").exists():
        return out
    for split, n in (("train", n_train), ("val", max(2, n_train // 10))):
        for cls in ("red", "blue"):
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            files = sorted((pool / split / cls).iterdir())[: n // 2]
            for f in files:
                dst = out / split / cls / f.name
                if not dst.exists():
                    os.link(f, dst)
    (out / ".complete").touch()
    return out


def child(data: str, out: str, workers: int) -> int:
    """One training run in this process, printed as train.py prints it."""
    sys.path.insert(0, str(ROOT))
    from cli.train_output import print_training
    from core.config import TrainConfig
    from core.device import configure_threads
    configure_threads()
    t0 = time.perf_counter()
    cfg = TrainConfig(data_dir=data, arch="mobilenet_v2", weights="none", policy="head", epochs=1, batch_size=64,
                      device="cpu", num_workers=workers, output_dir=out, run_name="scale", image_size=32,
                      resize_size=37).validate()
    code = print_training(cfg)
    print(f"RUN_SECONDS {time.perf_counter() - t0:.3f}")  # the run itself, after the imports
    return code


def measure(data: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(data), "--out", str(out), "--workers", str(workers)]
    t0 = time.perf_counter()
    # One math thread: on a shared, oversubscribed machine two OpenMP threads spin-wait on each other
    # (measured here under load ~10: MobileNetV2's prefix 160 ms/image with 2 threads, 2.7 ms with 1).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"training failed ({p.returncode}):\n{output[-3000:]}")
    epoch = next((line for line in output.splitlines() if line.startswith("EPOCH")), "")
    run_s = float(re.search(r"^RUN_SECONDS (\S+)", output, re.M).group(1))
    return {"wall_s": wall, "run_s": run_s, "peak_rss_mb": usage.ru_maxrss / 1024, "epoch_line": epoch}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10000, 20000])
    ap.add_argument("--root", default="/tmp/tl_scale_bench", help="where the synthetic data goes (not the repo)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: train.py's default)")
    ap.add_argument("--max-minutes", type=float, default=15.0, help="skip sizes projected past this total")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.out, args.workers)
    sys.path.insert(0, str(ROOT))
    from core.loader import default_num_workers
    workers = default_num_workers() if args.workers is None else args.workers
    root = Path(args.root)
    if ROOT in root.resolve().parents:
        raise SystemExit("--root must be outside the repository")
    t0 = time.perf_counter()
    pool = make_pool(root, max(args.sizes), max(2, max(args.sizes) // 10))
    print(f"data: {root} ({time.perf_counter() - t0:.0f} s to make); workers={workers}; cpus={os.cpu_count()}",
          flush=True)
    results, started, skipped = [], time.perf_counter(), []
    for n in sorted(args.sizes):
        images = n + max(2, n // 10)
        if results:
            per = results[-1]["wall_s"] / results[-1]["images"]
            projected = (time.perf_counter() - started + per * images) / 60
            if projected > args.max_minutes:
                skipped.append(n)
                print(f"skipped {n}: projected total {projected:.1f} min > --max-minutes {args.max_minutes}", flush=True)
                continue
        r = measure(subset(root, pool, n), root / "runs", workers)
        r.update(train_images=n, images=images, ms_per_image=1000 * r["wall_s"] / images,
                 run_ms_per_image=1000 * r["run_s"] / images)
        results.append(r)
        r["load_avg_1min"] = os.getloadavg()[0]  # other processes on a shared machine slow every size
        print(f"{n:>6} train + {images - n:>5} val: {r['wall_s']:7.1f} s  {r['ms_per_image']:6.2f} ms/image  "
              f"(run without imports {r['run_ms_per_image']:6.2f})  "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB  load {r['load_avg_1min']:.1f}  {r['epoch_line']}", flush=True)
    base = results[0]
    print("\n| train images | wall s | ms per image (train+val) | run only, ms per image | vs first | peak RSS MB "
          "| vs first | load avg |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['train_images']:,} | {r['wall_s']:.1f} | {r['ms_per_image']:.2f} | {r['run_ms_per_image']:.2f} | "
              f"{r['run_ms_per_image'] / base['run_ms_per_image']:.2f}x | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] - base['peak_rss_mb']:+.0f} | {r['load_avg_1min']:.1f} |")
    if skipped:
        print(f"\nnot run (time budget): {', '.join(map(str, skipped))}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "skipped": skipped, "workers": workers}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
