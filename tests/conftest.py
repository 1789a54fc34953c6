"""Shared fixtures. Tests never touch the network: TORCH_HOME points at a temp
dir and TL_OFFLINE=1 makes a missing ImageNet file fail at once."""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
import random
import sys
import time
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
# ../shared beside the checkout; TL_SHARED_DIR points elsewhere (e.g. a GPU machine's copy).
SHARED = Path(os.environ.get("TL_SHARED_DIR") or ROOT.parent / "shared")
sys.path.insert(0, str(ROOT))

# Engine tests run on the CPU; TL_TEST_DEVICE=cuda runs them on a GPU (tests/test_cuda.py).
TEST_DEVICE = os.environ.get("TL_TEST_DEVICE", "cpu")
cpu_only = pytest.mark.skipif(TEST_DEVICE != "cpu", reason=f"checks a choice made for the CPU, not {TEST_DEVICE}")
if TEST_DEVICE.startswith("cuda"):  # the tests compare results at float32 tolerance: no TF32 kernels
    import torch
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Gradio's upload and cache folder (default /tmp/gradio, never cleaned; GBs over a run) in one removed
# after the run; set before any test imports gradio, and inherited by the app processes tests start.
if "GRADIO_TEMP_DIR" not in os.environ:
    os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="tl-tests-gradio-")
    atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], True)
os.environ["NO_PROXY"] = "127.0.0.1,localhost"


@pytest.fixture(autouse=True)
def offline_torch_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("TL_OFFLINE", "1")
    return home


# ---------------------------------------------------------------- prerequisites outside the repo

# Under CI a missing prerequisite fails the test: a green CI run has run every test.
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright cannot download browsers offline


def absent(reason: str, remedy: str) -> NoReturn:
    """A prerequisite that lives outside the repo (Chromium, ../shared) is missing:
    skip with `reason`, or under CI (CI=true) fail with it and the `remedy`."""
    if IN_CI:
        pytest.fail(f"{reason}. CI={os.environ['CI']}: under CI a missing prerequisite is a failure, not a skip; "
                    f"{remedy}", pytrace=False)
    pytest.skip(f"{reason}; {remedy}")


def need_shared(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        absent(f"{p} is absent (real photos and weights live outside the repo, in ../shared)",
               "put them at ../shared beside the checkout or point TL_SHARED_DIR at a copy")
    return p


def free_port() -> int:
    """A port nothing listens on now, for an app a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_chromium():
    """playwright.sync_api, once Chromium and the playwright package are both there."""
    if not CHROMIUM.exists():
        absent(f"Chromium is not installed at {CHROMIUM}", "run scripts/setup.sh --dev (or apt-get install chromium)")
    try:
        from playwright import sync_api
    except ImportError:
        absent("the playwright Python package is not installed", "run scripts/setup.sh --dev")
    return sync_api


FAKE_CAMERA = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")  # launch_chromium's extra args


def launch_chromium(playwright, *extra_args: str):
    """Headless Chromium as the browser tests run it (no sandbox: CI runs as root)."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                      args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                            "--disable-background-networking", *extra_args])


# ---------------------------------------------------------------- waiting for events

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy and return that; fail
    after `timeout` seconds naming `what`. For waits on a condition another
    thread or process brings about; never a fixed sleep that guesses how long
    it takes. Timeouts are generous: a loaded 2-core CI machine is slow."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
        time.sleep(interval)


@pytest.fixture
def catfish_mini() -> Path:
    return need_shared("data/catfish-mini")


@pytest.fixture
def catfish() -> Path:
    return need_shared("data/catfish")


@pytest.fixture
def mobilenet_weights() -> Path:
    return need_shared("weights/mobilenet_v2_imagenet_features.pth")


@pytest.fixture
def demo_data() -> Path:
    return ROOT / "data"


def make_image_dataset(root: Path, classes=("cat", "fish"), n_train=4, n_val=2, size=(48, 40), seed=0, val=True) -> Path:
    """A tiny real ImageFolder of JPEGs whose classes differ in colour."""
    from PIL import Image
    rng = random.Random(seed)
    splits = [("train", n_train)] + ([("val", n_val)] if val else [])
    for split, n in splits:
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = (200, 60, 60) if ci == 0 else (60, 60, 200)
                color = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in base)
                Image.new("RGB", size, color).save(d / f"{cls}_{i}.jpg", quality=90)
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return make_image_dataset(tmp_path / "ds")


def train_config(data, out, **kw):
    """A small, fast TrainConfig for engine tests (random weights, seed 7), on the CPU
    unless TL_TEST_DEVICE names another device (TL_TEST_DEVICE=cuda on a GPU machine)."""
    from core.config import TrainConfig
    base = dict(data_dir=str(data), output_dir=str(out), weights="none", epochs=2, batch_size=4,
                device=TEST_DEVICE, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def train_run(cfg, stop=None):
    """Every event of one engine run: (events, the EpochEnded ones, the final RunEnded)."""
    from core.engine import train
    from core.events import EpochEnded
    events = list(train(cfg, stop))
    return events, [e for e in events if isinstance(e, EpochEnded)], events[-1]
