"""What the model is fed: each split's images decoded once, and, when a frozen
prefix and a deterministic input allow it, the prefix's activations computed
once per image and view (the feature cache). Both are kept in-process while
the files are unchanged (the app trains many runs on one dataset)."""
from __future__ import annotations

import hashlib
import os
import threading
from typing import Iterator

import torch
from torch import nn

from .config import TrainConfig
from .data import DatasetInfo, Split, center_crop, decode_resized, decode_split, normalize, random_resized_crop
from .device import amp_dtype, autocast, in_format, inference_batch_size, memory_formats, to_device
from .events import BatchProgress, Stopped


class BoundedCache:
    """A thread-safe store of the `capacity` newest entries (bounded memory).
    Not functools.lru_cache: the values come out of generators that yield
    progress, and the keys are computed by the caller."""

    def __init__(self, capacity: int):
        self.capacity, self._items, self._lock = capacity, {}, threading.Lock()

    def get(self, key):
        with self._lock:
            return self._items.get(key)

    def put(self, key, value) -> None:
        with self._lock:
            self._items.pop(key, None)
            while len(self._items) >= self.capacity:
                self._items.pop(next(iter(self._items)))
            self._items[key] = value


DECODED = BoundedCache(2)  # decoded images of one dataset (train and val splits)
FEATURES = BoundedCache(1)  # one set of frozen-prefix activations


def split_key(split: Split, resize: int):
    stats = tuple((p, os.stat(p).st_mtime_ns, os.stat(p).st_size) for p, _ in split.samples)
    return (split.name, resize, stats)


def decoded_images(split: Split, resize: int, keep: bool, threads: int, stop: threading.Event) -> Iterator:
    """Decode (and verify) every image once, yielding progress; reuse across runs
    while the files are unchanged. Returns the decoded tensors, or None when not kept."""
    key = split_key(split, resize)
    hit = DECODED.get(key)
    if hit is not None:
        split.samples = hit[0][:]
        split.skipped.extend(s for s in hit[1] if s not in split.skipped)
        return hit[2]
    before = len(split.skipped)
    steps = decode_split(split, resize, keep, threads)
    total = len(split.samples)
    while True:
        try:
            done = next(steps)
        except StopIteration as finished:
            images = finished.value
            break
        yield BatchProgress("decode", 0, done, total)
        if stop.is_set():
            steps.close()
            raise Stopped("stopped by request while reading images")
    if keep:
        DECODED.put(key, (split.samples[:], split.skipped[before:], images))
    return images


def feature_key(prefix: nn.Module, cfg: TrainConfig, info: DatasetInfo, views: int, device: torch.device):
    """What the cached activations depend on: the frozen weights, input size, files and views, the dtype."""
    return (module_fingerprint(prefix), cfg.image_size, split_key(info.train, cfg.resize_size),
            split_key(info.val, cfg.resize_size), views, str(amp_dtype(device, cfg.amp)))


def module_fingerprint(module: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def plan_feature_cache(cfg, info, prefix, device, views) -> tuple[bool, str]:
    if cfg.cache == "off":
        return False, "feature cache: off ({choice:cache=off})"
    if len(prefix) == 0:
        return False, "feature cache: not used (full fine-tune trains every layer)"
    if cfg.effective_augment == "standard":
        return False, "feature cache: not used (random-crop augmentation changes the input every epoch)"
    with torch.inference_mode():
        probe = prefix.eval()(torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device))
    itemsize = (amp_dtype(device, cfg.amp) or torch.float32).itemsize  # see compute_features
    need = (len(info.train.samples) * views + len(info.val.samples)) * probe.numel() * itemsize
    budget = cfg.cache_budget_mb * 2**20
    if need > budget:
        return False, (f"feature cache: would need {need / 2**20:.0f} MB > budget {cfg.cache_budget_mb} MB "
                       f"({{setting:cache_budget_mb}}); using the uncached path")
    return True, f"feature cache: frozen layers run once per image ({views} view(s)), {need / 2**20:.1f} MB"


class InputSource:
    """Yields model inputs for a list of sample indices: cached activations,
    or images (decoded cache or disk) with the configured transform."""

    def __init__(self, split: Split, images, cfg: TrainConfig):
        self.split, self.images, self.cfg = split, images, cfg
        self.labels = torch.tensor([y for _, y in split.samples], dtype=torch.long)
        self.features = None  # list per view of tensors (N, ...)

    def __len__(self):
        return len(self.split.samples)

    def image(self, i: int) -> torch.Tensor:
        if self.images is not None:
            return self.images[i]
        return decode_resized(self.split.samples[i][0], self.cfg.resize_size)

    def batch(self, idx: torch.Tensor, flips: torch.Tensor | None, aug: str, gen: torch.Generator | None):
        if self.features is not None:
            if flips is None:
                return self.features[0][idx]
            return torch.where(flips[idx].view(-1, *[1] * (self.features[0].dim() - 1)),
                               self.features[1][idx], self.features[0][idx])
        size = self.cfg.image_size
        crops = []
        for i in idx.tolist():
            img = self.image(i)
            crop = random_resized_crop(img, size, gen) if aug == "standard" else center_crop(img, size)
            if flips is not None and bool(flips[i]):
                crop = crop.flip(-1)
            crops.append(crop)
        return normalize(torch.stack(crops))


def compute_features(frozen, sources, cfg, device, stop) -> Iterator:
    """Run the frozen prefix once per image and view. Returns [train views, val views]."""
    out = []
    dtype = amp_dtype(device, cfg.amp) or torch.float32  # kept as computed: half the memory under amp
    image_fmt, suffix_fmt = memory_formats(cfg, device)
    total = sum(len(src) * views for src, views in sources)
    done = 0
    for src, views in sources:
        per_view = []
        for view in range(views):
            chunks = []
            for idx in torch.arange(len(src)).split(inference_batch_size(device, cfg.batch_size)):
                if stop.is_set():
                    raise Stopped("stopped by request before the first epoch")
                flips = torch.full((len(src),), bool(view))
                x = src.batch(idx, flips if view else None, "none", None)
                with torch.inference_mode(), autocast(cfg, device):
                    feats = frozen(in_format(to_device(x, device), image_fmt))
                    chunks.append(in_format(feats.to(dtype).cpu(), suffix_fmt))
                done += len(idx)
                yield BatchProgress("cache", 0, done, total)
            per_view.append(torch.cat(chunks))
        out.append(per_view)
    return out
