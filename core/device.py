"""Device selection with clear errors for devices this machine does not have."""
from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("{choice:device=cuda} was requested but CUDA is not available on this machine "
                          "(no NVIDIA GPU or a CPU-only torch build); use {choice:device=cpu} or {choice:device=auto}",
                          field="device", value=name, allowed=("auto", "cpu"))
    if name == "mps" and not mps_available():
        raise ConfigError("{choice:device=mps} was requested but Apple MPS is not available here; use "
                          "{choice:device=cpu} or {choice:device=auto}", field="device", value=name, allowed=("auto", "cpu"))
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{{setting}} {name!r} is not valid; choose auto, cpu, cuda or mps", field="device", value=name,
                          allowed=("auto", "cpu", "cuda", "mps"))
    return torch.device(name)


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bfloat16 in hardware (AVX512-BF16 or AMX). Elsewhere
    bf16 is emulated and slower than float32, so --amp 1 stays float32 there."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype --amp 1 uses on this device, or None (float32):
    float16 on CUDA, bfloat16 on CPUs with native bf16, nothing elsewhere."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def amp_note(device: torch.device, amp: bool) -> str | None:
    """Say what --amp 1 does here, including when it does nothing."""
    if not amp:
        return None
    dtype = amp_dtype(device, amp)
    if dtype is torch.bfloat16:
        return "{choice:amp=1}: bfloat16 mixed precision on this CPU (weights and optimizer stay float32)"
    if dtype is torch.float16:
        return "{choice:amp=1}: float16 mixed precision with loss scaling on this GPU (weights and optimizer stay float32)"
    if dtype is None and device.type == "cpu":
        return "{choice:amp=1} has no effect on this CPU (no native bfloat16: AVX512-BF16 or AMX); training in float32"
    return f"{{choice:amp=1}} has no effect on {device.type}; training in float32"


def inference_batch_size(device: torch.device, train_batch: int = 16, cached_inputs: bool = False) -> int:
    """Batch for forward-only passes (feature cache, validation, folder predict).
    On CPU, batches of ~8 keep a whole network's activations in cache: measured
    10-20% faster per image than 32 on a 2-core machine (MobileNetV2 at 32 is 2x
    slower). Validation on cached activations is the other way round: on the
    14x14 maps of 'last', 32 is 7% (ResNet-18 layer4) to 18% (MobileNetV2's
    last stages) faster per image than 8."""
    if device.type == "cpu":
        return 32 if cached_inputs else 8
    return max(train_batch, 32)


def usable_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup
    CPU quota (docker --cpus, Kubernetes limits), which os.cpu_count() ignores."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(n, math.ceil(quota))) if quota else max(1, n)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time allowed by cgroup v2 cpu.max or v1 cfs quota; None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" else None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def configure_threads() -> int:
    """Lower torch's thread count to the usable CPUs. torch sizes its pool from
    the host's cores, so in a container limited to 2 of 64 CPUs it would run 64
    threads that mostly wait for each other. An explicit OMP_NUM_THREADS below
    the limit is kept. Returns the thread count in effect."""
    n = usable_cpus()
    if torch.get_num_threads() > n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with `n` intra-op threads, then put the count back. For many
    small calls beside other work (a webcam stream next to the browser drawing
    it): one thread never waits for a busy second core. torch's count is
    process-wide, so work running meanwhile may also get `n` (slower, never wrong)."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


@functools.cache
def machine_memory_bytes(root: Path = Path("/sys/fs/cgroup")) -> int:
    """Memory this process may use: physical RAM, capped by a cgroup memory
    limit (v2 memory.max, v1 memory.limit_in_bytes) where one is set."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small laptop
        total = 8 * 2**30
    for f in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            limit = int(f.read_text().split()[0])
        except (OSError, ValueError, IndexError):  # absent, or "max"
            continue
        if 0 < limit < total:
            total = limit
    return total


# ---------------------------------------------------------------- running a model on the device

def memory_formats(cfg: "TrainConfig", device: torch.device) -> tuple[torch.memory_format, torch.memory_format]:
    """(model and images, trainable suffix and its cached inputs). channels_last
    is the faster layout for convolutions on CPU and CUDA (not MPS). Exception:
    ResNet-18's layer4 trained alone on CPU (policy 'last'), whose 7x7 maps
    train ~12% faster per step in NCHW, in float32 and bfloat16 (oneDNN's
    blocked kernels; measured on 2-core Xeon, bench/NOTES.md); MobileNetV2's
    depthwise layers stay faster in channels_last."""
    image_fmt = torch.contiguous_format if device.type == "mps" else torch.channels_last
    if device.type == "cpu" and cfg.arch == "resnet18" and cfg.policy == "last":
        return image_fmt, torch.contiguous_format
    return image_fmt, image_fmt


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device, non_blocking=True)


def in_format(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """x in memory layout `fmt` if it is a batch of maps (4-D); pooled features as they are."""
    return x.contiguous(memory_format=fmt) if x.dim() == 4 else x


def autocast(cfg, device):
    dtype = amp_dtype(device, cfg.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
