"""GPU throughput (issue 19, item 5). PREPARED, NOT YET RUN: no GPU was lent to this work.

One call on a GPU machine (about 5-8 minutes on one H100):

    .venv/bin/python bench/gpu_bench.py --data ../shared/data/catfish --repeat 13 --workers 8

1. Builds catfish with train/ repeated `--repeat` times (hard links, in /tmp; 758 x 13 = 9,854 train images).
2. Reference: a torchvision-reference-style loop (ImageFolder + DataLoader with the same workers, pinned memory,
   RandomResizedCrop + flip, ResNet-18 full fine-tune, float16 autocast + GradScaler), 1 epoch.
3. Project: train.py --policy full --amp 1 --weights none --num-workers W --epochs 1 --device cuda.
4. A 1-GPU torchrun run of train.py (the nccl + DDP path) on the plain dataset.
Images/s are (train + val images) / the epoch's seconds (metrics.csv for the project, the same span for the
reference); GPU utilisation is nvidia-smi's, sampled every 200 ms during each run (mean and median).
`--device cpu` with a small --data runs the same steps without a GPU (a smoke test of this script)."""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def repeated(src: Path, dst: Path, repeat: int) -> Path:
    """src with train/ repeated (hard links named r<k>_<name>); val/ as is."""
    if (dst / ".complete").exists():
        return dst
    for split in ("train", "val"):
        for cls_dir in sorted((src / split).iterdir()):
            if not cls_dir.is_dir():
                continue
            out = dst / split / cls_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls_dir.iterdir()):
                for k in range(repeat if split == "train" else 1):
                    target = out / f"r{k}_{f.name}"
                    if not target.exists():
                        try:
                            os.link(f, target)
                        except OSError:
                            target.write_bytes(f.read_bytes())
    (dst / ".complete").touch()
    return dst


class GpuSampler:
    """nvidia-smi utilisation.gpu every 200 ms while running (empty without nvidia-smi)."""

    def __init__(self):
        self.samples: list[float] = []
        self.proc = None

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=subprocess.PIPE, text=True)
        except OSError:
            return self
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)

    def summary(self) -> dict:
        s = self.samples
        return {"gpu_util_mean": statistics.mean(s), "gpu_util_median": statistics.median(s), "samples": len(s)} \
            if s else {"gpu_util_mean": None, "gpu_util_median": None, "samples": 0}


def reference(data: Path, workers: int, batch: int, device: str) -> dict:
    """The plain loop, in this process: 1 epoch train + val; returns images/s over that span."""
    import torch
    import torchvision
    from torch import nn
    from torchvision import datasets, transforms
    torch.manual_seed(0)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    val_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                 transforms.Normalize(MEAN, STD)])
    tr, va = datasets.ImageFolder(data / "train", train_tf), datasets.ImageFolder(data / "val", val_tf)
    kw = dict(num_workers=workers, pin_memory=device == "cuda", persistent_workers=workers > 0)
    tl = torch.utils.data.DataLoader(tr, batch_size=batch, shuffle=True, **kw)
    vl = torch.utils.data.DataLoader(va, batch_size=batch, **kw)
    model = torchvision.models.resnet18(num_classes=len(tr.classes)).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    use_amp = device == "cuda"
    scaler = torch.amp.GradScaler(device, enabled=use_amp)
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        model.train()
        for x, y in tl:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device, dtype=torch.float16, enabled=use_amp):
                loss = nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        model.eval()
        with torch.inference_mode(), torch.autocast(device, dtype=torch.float16, enabled=use_amp):
            for x, y in vl:
                model(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)).argmax(1).cpu()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images_per_s": (len(tr) + len(va)) / seconds, **gpu.summary()}


def project(data: Path, out: Path, workers: int, batch: int, device: str, runner: list[str] | None = None) -> dict:
    cmd = [*(runner or [sys.executable]), "train.py", "--data-dir", str(data), "--policy", "full", "--amp", "1",
           "--weights", "none", "--epochs", "1", "--batch-size", str(batch), "--num-workers", str(workers),
           "--device", device, "--output-dir", str(out)]
    with GpuSampler() as gpu:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stdout + p.stderr)[-3000:]}
    run_dir = Path(re.search(r"^RUN_DIR: (.+)$", p.stdout, re.M).group(1))
    with open(run_dir / "metrics.csv", newline="") as f:
        seconds = float(next(csv.DictReader(f))["seconds"])
    n = sum(1 for split in ("train", "val") for _ in (data / split).rglob("*.jpg"))
    return {"seconds": seconds, "images_per_s": n / seconds, "epoch_line": next(
        (line for line in p.stdout.splitlines() if line.startswith("EPOCH")), ""), **gpu.summary()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "catfish"))
    ap.add_argument("--repeat", type=int, default=13)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--root", default="/tmp/tl_gpu_bench")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = Path(args.root)
    big = repeated(Path(args.data), root / f"x{args.repeat}", args.repeat)
    results = {"workers": args.workers, "batch_size": args.batch_size, "data": str(big)}
    results["reference"] = reference(big, args.workers, args.batch_size, args.device)
    print("reference:", json.dumps(results["reference"]), flush=True)
    results["project"] = project(big, root / "runs", args.workers, args.batch_size, args.device)
    print("project:  ", json.dumps(results["project"]), flush=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    results["torchrun_1gpu"] = project(Path(args.data), root / "runs_ddp", args.workers, args.batch_size,
                                       args.device, torchrun)
    print("torchrun: ", json.dumps(results["torchrun_1gpu"]), flush=True)
    ref, proj = results["reference"], results["project"]
    if "images_per_s" in proj:
        print(f"\nproject / reference images/s: {proj['images_per_s'] / ref['images_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
