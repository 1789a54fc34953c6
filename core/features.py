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

from . import distributed
from .config import TrainConfig
from .data import DatasetInfo, Split, decode_split, estimate_decoded_bytes, normalize
from .device import amp_dtype, autocast, in_format, inference_batch_size, memory_formats, to_device, usable_cpus
from .events import BatchProgress, Stopped
from .loader import Stream, crop_of



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


def keep_decoded(cfg: TrainConfig, info: DatasetInfo, cache_ok: bool) -> bool:
    """Whether decoded images stay in memory: only when epochs read them (no
    feature cache) and they fit the budget. With the feature cache, epochs read
    features, and keeping the images for the next run on the same files (the
    app, another policy) measured no gain: catfish (866 photos), MobileNetV2
    head then last, in-process: 113 + 256 s kept vs 53 + 189 s not (a loaded
    2-core machine; the feature pass decodes while the model runs). Never under
    torchrun: each rank would hold a full copy."""
    if cache_ok or distributed.current():
        return False
    need = estimate_decoded_bytes(info.train, cfg.resize_size) + estimate_decoded_bytes(info.val, cfg.resize_size)
    return need <= cfg.cache_budget_mb * 2**20


def decoded_images(split: Split, cfg: TrainConfig, keep: bool, device: torch.device,
                   stop: threading.Event) -> Iterator:
    """Decode (and verify) every image once, yielding progress; reuse across runs
    while the files are unchanged. Returns the decoded tensors, or None when not
    kept. Kept images (and any with num_workers 0) are decoded by threads in this
    process; a check-only pass goes through the DataLoader's workers; under
    torchrun each rank checks its own shard and all ranks drop what any found
    unreadable."""
    resize = cfg.resize_size
    key = split_key(split, resize)
    hit = DECODED.get(key)
    if hit is not None:
        split.samples = hit[0][:]
        split.skipped.extend(s for s in hit[1] if s not in split.skipped)
        return hit[2]
    before = len(split.skipped)
    group = distributed.current()
    if group is None and (keep or cfg.num_workers == 0):
        # Filling this process's cache (or no workers): decoding threads here, nothing to copy between
        # processes, and the main thread has nothing else to do meanwhile.
        steps = decode_split(split, resize, keep, usable_cpus())
    else:
        steps = check_via_loader(split, cfg, device, group)
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


def check_via_loader(split: Split, cfg: TrainConfig, device: torch.device, group, chunk: int = 64):
    """decode_split's contract without keeping (yields the count done; unreadable
    files move to split.skipped; returns None), decoded by DataLoader workers:
    under torchrun each rank checks its shard and every rank drops what any found."""
    n = len(split.samples)
    mine = distributed.shard(n, group) if group else list(range(n))
    stream = Stream([p for p, _ in split.samples], cfg.resize_size, cfg.image_size, "check", cfg.num_workers,
                    torch.device("cpu"))
    bad = {}
    try:
        done = 0
        for idx, _, errors in stream.run([mine[i:i + chunk] for i in range(0, len(mine), chunk)]):
            bad.update(errors)
            done += len(idx)
            yield min(n, done * (group.world if group else 1))
    finally:
        stream.close()
    if group:
        for part in distributed.gather_objects(bad, "the image check"):
            bad.update(part)
    split.skipped.extend(reason for _, reason in sorted(bad.items()))
    split.samples = [s for i, s in enumerate(split.samples) if i not in bad]
    return None


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
    """Yields model inputs (on the device, normalised) for batches of sample
    indices: cached activations, decoded images kept in memory, or images read
    from disk through the DataLoader (`Stream`, made on first use)."""

    def __init__(self, split: Split, images, cfg: TrainConfig, device: torch.device = torch.device("cpu")):
        self.split, self.images, self.cfg, self.device = split, images, cfg, device
        self.labels = torch.tensor([y for _, y in split.samples], dtype=torch.long)
        self.features = None  # list per view of tensors (N, ...)
        self.stream: Stream | None = None

    def __len__(self):
        return len(self.split.samples)

    def inputs(self, batches: list[list[int]], flips: torch.Tensor | None = None, seeds=None) -> Iterator:
        """(indices, x, unreadable) per batch. flips: per-sample booleans (by
        index); seeds: index -> random-crop seed (None: center crops).
        unreadable: [(index, (path, reason))] (a zero image stands in)."""
        if self.features is not None:
            for idx in batches:
                yield idx, to_device(self.cached(torch.tensor(idx), flips), self.device), []
            return
        keys = [[(i, bool(flips[i]) if flips is not None else False, seeds(i) if seeds else None) for i in b]
                for b in batches]
        if self.images is not None:  # decoded in memory: crop here (as the workers would)
            size = self.cfg.image_size
            for b, kb in zip(batches, keys):
                x = torch.stack([crop_of(self.images[i], size, f, s) for i, f, s in kb])
                yield b, normalize(to_device(x, self.device)), []
            return
        if self.stream is None:
            self.stream = Stream([p for p, _ in self.split.samples], self.cfg.resize_size, self.cfg.image_size, "crop",
                                 self.cfg.num_workers, self.device)
        for idx, x, errors in self.stream.run(keys):  # uint8 (pinned on CUDA) -> device, normalised there
            yield idx, normalize(to_device(x, self.device)), errors

    def cached(self, idx: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
        if flips is None:
            return self.features[0][idx]
        return torch.where(flips[idx].view(-1, *[1] * (self.features[0].dim() - 1)),
                           self.features[1][idx], self.features[0][idx])

    def drop(self, bad: list) -> None:
        """Remove samples found unreadable (index, (path, reason)): from the split, labels and features."""
        if not bad:
            return
        gone = {i for i, _ in bad}
        self.split.skipped.extend(e for _, e in bad)
        keep = [i for i in range(len(self)) if i not in gone]
        self.split.samples = [self.split.samples[i] for i in keep]
        self.labels = self.labels[keep]
        if self.features is not None:
            self.features = [v[keep] for v in self.features]
        self.close()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def compute_features(frozen, sources, cfg, device, stop) -> Iterator:
    """Run the frozen prefix once per image and view (the flipped view from the
    same decode). Returns ([train views, val views], [unreadable per source]).
    Under torchrun each rank computes its shard and the rows are gathered."""
    out, unreadable = [], []
    dtype = amp_dtype(device, cfg.amp) or torch.float32  # kept as computed: half the memory under amp
    image_fmt, suffix_fmt = memory_formats(cfg, device)
    group = distributed.current()
    mine = [distributed.shard(len(src), group) if group else list(range(len(src))) for src, _ in sources]
    total = sum(len(src) * views for src, views in sources)
    done = 0
    for (src, views), indices in zip(sources, mine):
        per_view, bad = [[] for _ in range(views)], []
        step = inference_batch_size(device, cfg.batch_size)
        for idx, x, errors in src.inputs([indices[i:i + step] for i in range(0, len(indices), step)]):
            if stop.is_set():
                raise Stopped("stopped by request before the first epoch")
            bad += errors
            with torch.inference_mode(), autocast(cfg, device):
                for view in range(views):
                    feats = frozen(in_format(x.flip(-1) if view else x, image_fmt))
                    per_view[view].append(in_format(feats.to(dtype).cpu(), suffix_fmt))
            done += len(idx) * views * (group.world if group else 1)
            yield BatchProgress("cache", 0, min(done, total), total)
        src.close()
        per_view = [torch.cat(chunks) for chunks in per_view]
        if group:
            per_view = [distributed.gather_rows(v, len(src), group, "the feature pass") for v in per_view]
            bad = sorted({i: e for part in distributed.gather_objects(bad, "the feature pass") for i, e in part}.items())
        out.append(per_view)
        unreadable.append(sorted(bad))
    return out, unreadable
