"""Frames a second the live preview can answer on this machine (issue 20).

For ResNet-18 and MobileNetV2 (2 classes, random weights: the speed does not
depend on their values), one webcam frame is handled exactly as
demo_app/live_preview.py does: the browser's JPEG data URL is base64-decoded
(WebcamStream.preprocess) and Predictor.predict_image decodes, resizes, crops
and classifies it. Frames are 320x240 JPEGs of real photos from data/: the
size the live preview asks the camera for, at quality 0.92, as the browser's
canvas.toDataURL('image/jpeg') makes them.

Prints wall time and process CPU time per frame and the frames per second
they allow; the CPU-time figure is the one to trust on a machine that others
load (it is what one frame costs, whoever else runs). Usage:
    python bench/live_bench.py [--frames 60] [--threads N]"""
from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from core.device import configure_threads  # noqa: E402
from core.models import build_model  # noqa: E402
from core.predict import Predictor  # noqa: E402
from demo_app.live_preview import LIVE_THREADS, WebcamStream  # noqa: E402


class Payload:  # what Gradio hands WebcamStream.preprocess for a streamed frame
    def __init__(self, url):
        self.url, self.path = url, None


def frames(n: int) -> list[str]:
    photos = sorted((ROOT / "data" / "val").rglob("*.jpg"))
    out = []
    for p in (photos * (n // max(1, len(photos)) + 1))[:n]:
        img = Image.open(p).convert("RGB").resize((320, 240))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92)
        out.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def measure(arch: str, urls: list[str]) -> dict:
    pred = Predictor(build_model(arch, 2, weights="none"), ["a", "b"])
    cam = WebcamStream(sources=["webcam"], streaming=True)
    for u in urls[:5]:  # warm-up: the first batch-1 calls build oneDNN kernels
        pred.predict_image(io.BytesIO(cam.preprocess(Payload(u))), 5)
    wall, cpu = [], []
    for u in urls:
        w0, c0 = time.perf_counter(), time.process_time()
        pred.predict_image(io.BytesIO(cam.preprocess(Payload(u))), 5)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    w, c = statistics.median(wall), statistics.median(cpu)
    return {"arch": arch, "wall_ms": w * 1000, "cpu_ms": c * 1000, "fps_wall": 1 / w,
            "fps_cpu": torch.get_num_threads() / c}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--threads", type=int, default=LIVE_THREADS,
                    help=f"torch threads (default {LIVE_THREADS}, as the live preview runs; 0: as the rest of the app)")
    args = ap.parse_args()
    threads = configure_threads() if args.threads == 0 else args.threads
    torch.set_num_threads(threads)
    urls = frames(args.frames)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average {load:.1f}, "
          f"{len(urls)} frames of 320x240")
    print("| model | wall ms/frame | frames/s (wall) | CPU ms/frame | frames/s (CPU-bound) |")
    print("|---|---:|---:|---:|---:|")
    for arch in ("resnet18", "mobilenet_v2"):
        r = measure(arch, urls)
        print(f"| {arch} | {r['wall_ms']:.1f} | {r['fps_wall']:.1f} | {r['cpu_ms']:.1f} | {r['fps_cpu']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
