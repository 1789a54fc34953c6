"""Frames a second the live preview answers end to end, in the app (issue 20).

bench/live_bench.py times the server's work on one frame; this one times what
a user sees: the app running, Chromium's fake camera (its test pattern, at
the 320x240 the live preview asks for) streaming through Gradio's webcam to
the Train tab's live preview, for each model in turn. The count is the app's own (LivePreview.answered)
over a fixed window after a warm-up, with the rate line the page shows.

Checkpoints: a 1-epoch head-only run of each model on the shipped drawings
(data/) with --weights none; the speed does not depend on the weights' values.
Needs Chromium and playwright (scripts/setup.sh --dev). Usage:
    python bench/live_app_bench.py [--seconds 20] [--cam 0|1]"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import FAKE_CAMERA, free_port, launch_chromium  # noqa: E402

ARCHES = ("resnet18", "mobilenet_v2")


def train_checkpoints(out: Path) -> dict[str, Path]:
    """One tiny run per model; returns arch -> its best_acc.pt."""
    found = {}
    for arch in ARCHES:
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--data-dir", str(ROOT / "data"), "--arch", arch,
                        "--weights", "none", "--epochs", "1", "--policy", "head", "--output-dir", str(out)],
                       check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TORCH_HOME": str(out / "torch")})
        found[arch] = next(p for p in out.glob(f"{arch}*/best_acc.pt"))
    return found


def measure(page, live, ckpt: Path, seconds: float, with_cam: bool) -> tuple[float, str]:
    page.locator("#live-refresh").click()
    page.locator("#live-ckpt input").click()
    page.get_by_role("option", name=f"{ckpt.parent.name} / best_acc.pt").click()
    cam_box = page.locator("#live-cam-toggle input")
    cam_box.check() if with_cam else cam_box.uncheck()
    page.locator("#live-cam button[aria-label='capture photo']").get_by_text("Record").click()
    page.locator("#live-cam button[aria-label='capture photo']").get_by_text("Stop").wait_for()
    deadline = time.monotonic() + 120
    while live.answered < 5 and time.monotonic() < deadline:  # warm-up: model loaded, kernels built
        time.sleep(0.1)
    n0, t0 = live.answered, time.monotonic()
    time.sleep(seconds)
    rate = (live.answered - n0) / (time.monotonic() - t0)
    shown = page.locator("#live-rate").inner_text().strip().splitlines()[-1]  # (not a progress timer)
    page.locator("#live-cam button[aria-label='capture photo']").get_by_text("Stop").click()
    page.locator("#live-cam button[aria-label='capture photo']").get_by_text("Record").wait_for()
    time.sleep(1)
    return rate, shown


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--cam", type=int, default=0, help="1: with the Grad-CAM overlay")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from demo_app.ui import build_app, launch_options
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        ckpts = train_checkpoints(base / "checkpoints")
        uploads, data = base / "uploads", ROOT / "data"
        demo = build_app(base / "checkpoints", data, uploads)
        _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                        quiet=True, **launch_options(base / "checkpoints", data, uploads))
        live = demo.handlers.train.live
        load = os.getloadavg()[0]
        print(f"{os.cpu_count()} CPUs, load average {load:.1f}, Chromium fake camera, "
              f"{args.seconds:.0f} s per model{' with Grad-CAM' if args.cam else ''}")
        print("| model | frames answered per second (counted) | the page's rate line |")
        print("|---|---:|---|")
        try:
            with sync_playwright() as p:
                browser = launch_chromium(p, *FAKE_CAMERA)
                page = browser.new_page(viewport={"width": 1440, "height": 1000})
                page.set_default_timeout(60_000)
                page.goto(url)
                page.wait_for_selector("#live-cam")
                page.locator("#live-preview").scroll_into_view_if_needed()
                page.locator("#live-cam [title='grant webcam access'] button").click()
                for arch in ARCHES:
                    rate, shown = measure(page, live, ckpts[arch], args.seconds, bool(args.cam))
                    print(f"| {arch} | {rate:.1f} | {shown} |")
                browser.close()
        finally:
            demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
