"""PyTorch (the project's Predictor) against ONNX Runtime float32 and int8 on this CPU.

    python bench/export_bench.py                      # ResNet-18 and (with ../shared) MobileNetV2
    python bench/export_bench.py --checkpoint checkpoints/RUN/best_acc.pt --repeats 40

Without --checkpoint it makes its own: a 1-epoch train.py run per architecture
(ResNet-18 random init on data/; MobileNetV2 with ../shared's ImageNet features on
catfish-mini), exported with export.py --quantize int8. Speed does not depend on
the weights' values. Measured, warm, medians of interleaved repeats (each repeat
runs every variant once, so machine load hits all alike):
- single image: file path -> top-k, preprocessing included (Predictor.predict_image;
  deploy/predict_onnx.py's OnnxClassifier, whose preprocessing is numpy), and the
  model alone on one preprocessed image;
- batch of 32: the model alone on 32 preprocessed images, in images per second.
Both runtimes get the same thread count (the CPUs this process may use), each
in its own process; the parent interleaves their runs.
Prints a markdown table and writes bench/results/export_<stamp>.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "deploy"))
SHARED = ROOT.parent / "shared"


def make_checkpoints(tmp: Path) -> dict[str, Path]:
    jobs = {"resnet18": ["--data-dir", ROOT / "data", "--weights", "none"]}
    weights = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"
    if weights.is_file() and (SHARED / "data" / "catfish-mini").is_dir():
        jobs["mobilenet_v2"] = ["--data-dir", SHARED / "data" / "catfish-mini", "--weights", weights,
                                "--arch", "mobilenet_v2"]
    out = {}
    for arch, flags in jobs.items():
        earlier = sorted(tmp.glob(f"{arch}_*/best_acc.pt"))
        if earlier:  # --work DIR from an earlier run
            out[arch] = earlier[-1]
            continue
        run(["train.py", *flags, "--epochs", "1", "--device", "cpu", "--output-dir", tmp, "--run-name", arch])
        out[arch] = next(tmp.glob(f"{arch}_*/best_acc.pt"))
    return out


def run(args) -> str:
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       env={"TL_OFFLINE": "1", **os.environ})
    if r.returncode:
        sys.exit(f"{args[0]} failed:\n{r.stderr}")
    return r.stdout


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


MEASURES = ("image_ms", "model1_ms", "batch32_s")
VARIANTS = ("predictor", "onnx_fp32", "onnx_int8")


def worker(variant: str, ckpt: Path, image: str, threads: int) -> None:
    """One runtime in its own process (ONNX Runtime's and torch's thread pools
    spin-wait after each call and would slow each other down in one process; the
    ONNX Runtime workers never import torch, as in deployment). Reads a measure
    name per line from stdin, answers the seconds it took, plus the top-1 index."""
    import numpy as np

    export = ckpt.parent / "export"
    if variant == "predictor":
        from core.device import configure_threads
        from core.predict import Predictor
        import torch
        configure_threads()
        torch.set_num_threads(threads)
        pred = Predictor.load(ckpt, "cpu")
        crop = pred.preprocess(image)
        batch = crop[None].repeat(32, 1, 1, 1)
        fns = {"image_ms": lambda: pred.predict_image(image, 2), "model1_ms": lambda: pred._forward(crop[None]),
               "batch32_s": lambda: pred._forward(batch)}
        top1 = int(pred._forward(crop[None]).argmax())
    else:
        from predict_onnx import OnnxClassifier, model_input
        clf = OnnxClassifier(export / ("model.onnx" if variant == "onnx_fp32" else "model.int8.onnx"), threads)
        one = model_input(image, clf.meta)[None]
        batch = np.repeat(one, 32, axis=0)
        fns = {"image_ms": lambda: list(clf.predict_paths([image], 2, 1)), "model1_ms": lambda: clf.probabilities(one),
               "batch32_s": lambda: clf.probabilities(batch)}
        top1 = int(clf.probabilities(one).argmax())
    for _ in range(3):  # warm-up: oneDNN and ONNX Runtime prepare their kernels on first use
        for fn in fns.values():
            fn()
    print(f"ready {top1}", flush=True)
    for line in sys.stdin:
        print(timed(fns[line.strip()]), flush=True)


def bench_one(ckpt: Path, image: str, repeats: int, threads: int) -> dict:
    export = ckpt.parent / "export"
    if not (export / "model.int8.onnx").is_file():
        run(["export.py", "--checkpoint", ckpt, "--format", "onnx", "--quantize", "int8"])
    procs = {v: subprocess.Popen([sys.executable, __file__, "--worker", v, "--checkpoint", str(ckpt), "--image", image,
                                  "--threads", str(threads)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True) for v in VARIANTS}
    top1 = {v: int(p.stdout.readline().split()[1]) for v, p in procs.items()}
    times = {v: {m: [] for m in MEASURES} for v in VARIANTS}
    try:
        for _ in range(repeats):  # interleaved: every variant and measure once per repeat
            for v, p in procs.items():
                for m in MEASURES:
                    time.sleep(0.02)  # the previous worker's pool stops spinning
                    p.stdin.write(m + "\n")
                    p.stdin.flush()
                    times[v][m].append(float(p.stdout.readline()))
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()
    out = {}
    for v, ms in times.items():
        med = {m: statistics.median(t) for m, t in ms.items()}
        out[v] = {"image_ms": med["image_ms"] * 1e3, "model1_ms": med["model1_ms"] * 1e3,
                  "batch32_img_per_s": 32 / med["batch32_s"],
                  "range_image_ms": [min(ms["image_ms"]) * 1e3, max(ms["image_ms"]) * 1e3]}
    base = out["predictor"]
    for v in VARIANTS:
        out[v]["image_speedup"] = base["image_ms"] / out[v]["image_ms"]
        out[v]["model1_speedup"] = base["model1_ms"] / out[v]["model1_ms"]
        out[v]["batch32_speedup"] = out[v]["batch32_img_per_s"] / base["batch32_img_per_s"]
    out["top1_same_as_predictor"] = {v: top1[v] == top1["predictor"] for v in VARIANTS[1:]}
    return out


def table(results: dict) -> str:
    rows = ["| model | runtime | 1 image, file to top-k (ms) | × | 1 image, model only (ms) | × | "
            "batch 32 (images/s) | × |", "|---|---|---|---|---|---|---|---|"]
    names = {"predictor": "PyTorch (Predictor)", "onnx_fp32": "ONNX Runtime float32", "onnx_int8": "ONNX Runtime int8"}
    for arch, r in results.items():
        for v, label in names.items():
            m = r[v]
            rows.append(f"| {arch} | {label} | {m['image_ms']:.1f} | {m['image_speedup']:.2f} | {m['model1_ms']:.1f} | "
                        f"{m['model1_speedup']:.2f} | {m['batch32_img_per_s']:.1f} | {m['batch32_speedup']:.2f} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", default=None, help="a checkpoint to measure (repeatable)")
    p.add_argument("--image", default=None, help="the image (default: a catfish-mini photo, else a data/ drawing)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--work", default=None, help="keep the made checkpoints here and reuse them next time")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help="threads for both runtimes (default: the usable CPUs)")
    a = p.parse_args()
    if a.worker:
        worker(a.worker, Path(a.checkpoint[0]), a.image, a.threads)
        return 0

    import onnxruntime
    import torch

    from core.device import usable_cpus

    threads = a.threads or usable_cpus()  # usable_cpus: what configure_threads gives torch
    photos = sorted((SHARED / "data" / "catfish-mini" / "val").rglob("*.jpg"))
    image = a.image or str(photos[0] if photos else sorted((ROOT / "data" / "val").rglob("*.jpg"))[0])
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpts = ({Path(c).parent.name: Path(c) for c in a.checkpoint} if a.checkpoint else make_checkpoints(work))
        results = {name: bench_one(c, image, a.repeats, threads) for name, c in ckpts.items()}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    machine = {"cpu": cpu, "threads": threads, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
               "image": image, "repeats": a.repeats, "load_avg_after": list(os.getloadavg())}
    print(f"machine: {cpu}, {threads} threads; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"{a.repeats} interleaved repeats, medians; × = speed relative to the Predictor")
    print(table(results))
    print("top-1 same as the Predictor:", {k: v["top1_same_as_predictor"] for k, v in results.items()})
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"export_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    print(f"saved {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
