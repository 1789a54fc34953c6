"""The training engine: one generator that both the CLI and the app consume
(`for event in train(config, stop_event)`; the events are defined in core.events).

Speed: when a prefix of the network is frozen and the training input is
deterministic (augment none, or light = flip-only kept as two views), the
prefix runs once per image and view and the trainable suffix trains on the
cached activations. Frozen layers always run as an eval-only copy with
BatchNorm folded into the convolutions. Numerically the same as running the
whole model (in float32, up to rounding). With amp on (float16 autocast on
CUDA, bfloat16 on CPUs with native bf16) the prefix runs, and its cached
activations are kept, in that dtype too: autocast would cast them down before
the suffix's first convolution anyway."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from . import checkpoint as ck
from . import distributed
from .best import RunState, best_from_checkpoint, empty_best
from .calibration import calibrate
from .config import TrainConfig
from .data import scan_dataset, skipped_warning
from .device import amp_note, autocast, in_format, inference_batch_size, memory_formats, resolve_device
from .errors import CheckpointError, ConfigError, DatasetError
from .events import BatchProgress, Diverged, EpochEnded, Notice, RunEnded, RunStarted, Stopped
from .features import (FEATURES, InputSource, compute_features, decoded_images, feature_key, keep_decoded,
                       plan_feature_cache)
from .fileio import atomic_write_json
from .loader import raise_unreadable, sample_seed
from .metrics import clean_confusion, confusion_pairs
from .models import apply_policy, build_model, fold_batchnorm, param_counts, set_train_mode, split_model
from .resume import read_resume, restore_optimizer, resume_run_dir
from .run_folder import export_best, new_run_dir, remove_empty_run, save_epoch

# A mean batch cross-entropy this many times chance level (ln C, at least 1) is
# not training any more: lr 10 gives 1e2..1e4 after one step; healthy runs stay
# within a few times chance.
EXPLODED_LOSS = 50.0


@dataclass
class Trainer:
    """What one run trains with: built once by start_run, used by every epoch."""
    cfg: TrainConfig
    device: torch.device
    model: nn.Module
    prefix: nn.Sequential  # the frozen layers (maybe none)
    suffix: nn.Sequential  # the trained layers
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    stop: threading.Event
    frozen: nn.Sequential | None = None  # prefix with BatchNorm folded in; None when features are cached
    trained: nn.Module | None = None  # what the training forward calls: suffix, or suffix under DDP (torchrun)
    group: distributed.Group | None = None  # the torchrun process group (None: one process)


def train(cfg: TrainConfig, stop: threading.Event | None = None, resume_checkpoint: dict | None = None) -> Iterator:
    """Run (or resume) a training run, yielding events. Bad input raises
    UserError (before the first event, or later for data found unreadable or a
    failed write); stop and divergence end with a RunEnded. resume_checkpoint:
    cfg.resume as read_checkpoint gave it, when the caller has read it already."""
    t, state, started, new_folder = start_run(cfg, stop or threading.Event(), resume_checkpoint)
    status, message, sources = "completed", "", []
    try:
        sources = yield from prepare_inputs(t, started)
        for epoch in range(started.start_epoch, cfg.epochs + 1):
            yield from run_epoch(t, state, *sources, epoch)
            if agreed_stop(t, epoch) and epoch < cfg.epochs:  # a stop after the last epoch changes nothing
                raise Stopped("stopped by request after epoch %d" % epoch)
    except Stopped as e:
        status, message = "stopped", str(e)
    except Diverged as e:
        status, message = "diverged", str(e)
    finally:
        t.stop.clear()
        for src in sources:
            src.close()  # DataLoader worker processes end with the run
        if state.epochs_done == 0 and new_folder and distributed.is_main():
            remove_empty_run(state.run_dir)
    yield end_run(cfg, state, status, message)


def agreed_stop(t: Trainer, epoch: int) -> bool:
    """The stop flag, the same on every rank (a rank that got SIGTERM stops them all)."""
    if t.group is None:
        return t.stop.is_set()
    return distributed.any_rank([t.stop.is_set()], f"the end of epoch {epoch}")[0]


def start_run(cfg: TrainConfig, stop: threading.Event, resume_checkpoint: dict | None):
    """Everything before the first event: settings checked, dataset scanned,
    model and optimizer built (or restored), the run folder chosen.
    (Trainer, RunState, RunStarted, whether the run folder is new.)"""
    cfg.validate()
    device = resolve_device(cfg.device)
    notes = [n for n in [amp_note(device, cfg.amp), random_backbone_note(cfg)] if n]
    resume = None
    if cfg.resume:
        resume, resume_notes = read_resume(cfg, resume_checkpoint)
        notes += resume_notes
    info = scan_dataset(cfg.data_dir, cfg.val_split, cfg.seed)
    if resume and resume["class_names"] != info.classes:
        raise ConfigError(f"{{setting}} checkpoint classes {resume['class_names']} differ from the dataset's "
                          f"{info.classes}", field="resume", value=cfg.resume)

    torch.manual_seed(cfg.seed)
    model = ck.model_from_checkpoint(resume, cfg.resume) if resume else \
        build_model(cfg.arch, len(info.classes), cfg.dropout, cfg.weights)
    apply_policy(model, cfg.arch, cfg.policy)
    prefix, suffix = split_model(model, cfg.arch, cfg.policy)
    image_fmt, suffix_fmt = memory_formats(cfg, device)
    model.to(device, memory_format=image_fmt)
    suffix.to(memory_format=suffix_fmt)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, device)
    if resume and resume.get("optimizer_state"):
        restore_optimizer(optimizer, resume["optimizer_state"], cfg)
    scaler = make_grad_scaler(cfg, device, resume.get("scaler_state") if resume else None)
    group = distributed.current()
    t = Trainer(cfg, device, model, prefix, suffix, optimizer, scaler, stop,
                trained=distributed.wrap(suffix, device) if group else suffix, group=group)

    if resume:
        run_dir, new_folder, note = choose_on_main(lambda: resume_run_dir(cfg, resume), group)
        notes += [note] if note else []
        state = RunState(run_dir, list(info.classes), list(resume["history"]), best_from_checkpoint(resume),
                         clean_confusion(resume.get("best_val_confusion"), len(info.classes)), int(resume["epoch"]))
    else:
        run_dir, new_folder = choose_on_main(lambda: (new_run_dir(cfg.output_dir, cfg.run_name), True), group)
        state = RunState(run_dir, list(info.classes), [], empty_best())
    state.data_files = info.fingerprint()
    if new_folder and distributed.is_main():
        atomic_write_json(run_dir / "args.json", cfg.to_dict())
    trainable, total = param_counts(model)
    started = RunStarted(str(run_dir), info, cfg, str(device), trainable, total, state.epochs_done + 1, notes)
    return t, state, started, new_folder


def choose_on_main(choose, group):
    """The run folder: chosen (and made) by rank 0 only, the same on every rank."""
    if group is None:
        return choose()
    result, error = None, None
    if group.main:
        try:
            result = choose()
        except Exception as e:  # every rank reports it, instead of the others waiting
            error = e
    result, error = distributed.broadcast_from_main((result, error), "the choice of the run folder")
    if error is not None:
        raise error
    return result


def prepare_inputs(t: Trainer, started: RunStarted) -> Iterator:
    """Yields RunStarted, then decodes both splits once and, where the plan
    allows, runs the frozen layers once per image (each yielding progress).
    Returns the (train, val) InputSources; sets t.frozen."""
    cfg, info = t.cfg, started.dataset
    views = 2 if cfg.effective_augment == "light" else 1
    cache_ok, cache_note = plan_feature_cache(cfg, info, t.prefix, t.device, views)
    started.notes.append(cache_note)
    yield started
    keep = keep_decoded(cfg, info, cache_ok)
    known = set(info.skipped)  # skipped by name at scan time, already printed
    key = feature_key(t.prefix, cfg, info, views, t.device) + (keep,) if cache_ok else None
    hit = FEATURES.get(key) if cache_ok else None
    images = [None, None]
    if keep or not cache_ok:  # epochs read images, or they are kept for the next run: check them all now
        # (with the feature cache and nothing kept, the feature pass is the check: each image is decoded once)
        images[0] = yield from decoded_images(info.train, cfg, keep, t.device, t.stop)
        images[1] = yield from decoded_images(info.val, cfg, keep, t.device, t.stop)
    sources = [InputSource(info.train, images[0], cfg, t.device), InputSource(info.val, images[1], cfg, t.device)]
    # What the frozen layers compute, BatchNorm folded in: every frozen forward
    # runs it. Not built (None) when the features come from the in-process cache.
    t.frozen = fold_batchnorm(t.prefix) if hit is None else None
    if cache_ok:
        if hit is None:
            hit = yield from compute_features(t.frozen, [(sources[0], views), (sources[1], 1)], cfg, t.device, t.stop)
            FEATURES.put(key, hit)
        feats, unreadable = hit
        for src, f, bad in zip(sources, feats, unreadable):
            src.features = list(f)
            src.drop(bad)
    unreadable = [s for s in info.skipped if s not in known]
    if unreadable:  # the DATASET counts were taken before decoding: say what trains now
        info.warnings.append(skipped_warning(unreadable) + "\n" + "\n".join(
            f"  {s.name} now: {len(s.samples)} images | per_class={s.counts()}" for s in (info.train, info.val)))
        yield Notice("warning", info.warnings[-1])
    for split in (info.train, info.val):
        if not split.samples or len({y for _, y in split.samples}) < len(info.classes):
            raise DatasetError(f"after skipping unreadable files, {split.name} no longer has images for every class "
                               f"(see the warning above)")
    return sources


def run_epoch(t: Trainer, state: RunState, train_src: InputSource, val_src: InputSource, epoch: int) -> Iterator:
    """Train, validate, save; yields progress and then the EpochEnded."""
    t0 = time.perf_counter()
    train_loss, train_acc = yield from train_one_epoch(t, train_src, epoch)
    val_loss, val_acc, confusion, logits = yield from evaluate(t, val_src, epoch)
    # Temperature scaling on this epoch's val logits (ms): each checkpoint carries the T of its own weights,
    # so best_acc.pt holds the one fitted on the best epoch, and a stopped run keeps it.
    improved_acc, improved_loss = state.record(epoch, val_loss, val_acc, confusion, calibrate(logits, val_src.labels))
    ended = EpochEnded(epoch, t.cfg.epochs, train_loss, train_acc, val_loss, val_acc,
                       t.optimizer.param_groups[0]["lr"], time.perf_counter() - t0, improved_acc, improved_loss,
                       str(state.run_dir / "latest.pt"), confusion)
    state.history.append(ended.as_row())
    if distributed.is_main():  # one writer; every rank holds the same (all-reduced) results
        save_epoch(state, epoch, t.model, t.optimizer, t.scaler, t.cfg)
    else:
        state.epochs_done = epoch
    yield ended


def end_run(cfg: TrainConfig, state: RunState, status: str, message: str) -> RunEnded:
    """The RunEnded: what is on disk now, and the exports made from best_acc.pt whatever the status."""
    run_dir = state.run_dir
    if status != "completed":
        message += ("; checkpoints of completed epochs are kept" if state.epochs_done else
                    "; nothing was saved" + ("" if run_dir.exists() else f" and the run folder {run_dir} was removed"))
    try:
        exports = export_best(run_dir, cfg, state.classes) if distributed.is_main() else []
    except OSError as e:  # the run itself is saved; say so instead of losing the summary
        exports, message = [], f"{message}; export failed: {e.strerror or e}".lstrip("; ")
    if status == "completed":
        message = f"finished {state.epochs_done} epoch(s)" + (f"; {message}" if message else "")
    return RunEnded(status, message, str(run_dir), state.epochs_done, dict(state.best), state.file("best_acc.pt"),
                    state.file("best_loss.pt"), state.history, exports, state.best_confusion, list(state.classes),
                    state.best_calibration)


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with its fused kernel on CPU and CUDA (other devices keep torch's
    default): one vectorised pass per step instead of a loop over tensors, e.g.
    6 ms instead of 26 ms for ResNet-18's layer4 + fc on 2 CPU cores. Same update
    up to float rounding."""
    fused = True if device.type in ("cpu", "cuda") else None
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def make_grad_scaler(cfg: TrainConfig, device: torch.device, saved: dict | None, kind: str = "cuda"):
    """float16 autocast (CUDA with amp) needs loss scaling; bfloat16 and float32
    do not (None). A resumed run continues with the scale its checkpoint saved
    instead of relearning it over skipped steps. `kind`: the device type that
    gets a scaler (tests pass 'cpu' to run this on a machine without CUDA)."""
    if not (cfg.amp and device.type == kind):
        return None
    scaler = torch.amp.GradScaler(device.type)
    if saved:
        try:
            scaler.load_state_dict(saved)
        except (RuntimeError, KeyError, TypeError) as e:
            raise CheckpointError(f"loss-scaler state in {cfg.resume} is damaged: {e}") from None
    return scaler


def random_backbone_note(cfg: TrainConfig) -> str | None:
    if cfg.weights != "none" or cfg.policy == "full" or cfg.resume:
        return None
    return (f"{{choice:weights=none}} with policy '{cfg.policy}': the frozen layers keep their random init, so "
            f"expect chance-level accuracy (fine for a timing or plumbing test); for real results use ImageNet "
            f"weights or {{choice:policy=full}}")


def forward(frozen, suffix, x, cached: bool, formats: tuple[torch.memory_format, torch.memory_format]):
    """suffix(frozen(x)), or suffix(x) on cached activations, each part fed in
    its memory layout (memory_formats)."""
    image_fmt, suffix_fmt = formats
    if cached or len(frozen) == 0:  # (no frozen layers: suffix_fmt is image_fmt)
        return suffix(in_format(x, suffix_fmt))
    with torch.no_grad():  # the frozen prefix needs no autograd graph
        feats = frozen(in_format(x, image_fmt))
    return suffix(in_format(feats, suffix_fmt))


def epoch_plan(t: Trainer, n: int, epoch: int):
    """(this process's sample order, flips by index, crop seeds) for one epoch.
    Seeded per epoch so a resumed run draws the same batches and flips as an
    uninterrupted one; each random crop's seed comes from (seed, epoch, index),
    so no DataLoader worker count or rank split changes what an image becomes.
    Under torchrun: DistributedSampler's share of the same permutation."""
    cfg, aug = t.cfg, t.cfg.effective_augment
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    perm = torch.randperm(n, generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5 if aug in ("light", "standard") else None
    if t.group is not None:
        perm = torch.tensor(distributed.epoch_order(n, t.group, cfg.seed * 100003, epoch))
    seeds = (lambda i: sample_seed(cfg.seed, epoch, i)) if aug == "standard" else None
    return perm, flips, seeds


def train_one_epoch(t: Trainer, src: InputSource, epoch: int) -> Iterator:
    """One pass over the training set (this rank's share under torchrun); returns
    (mean loss, accuracy), over all ranks."""
    cfg, device = t.cfg, t.device
    perm, flips, seeds = epoch_plan(t, len(src), epoch)
    torch.manual_seed(cfg.seed + epoch)  # dropout
    set_train_mode(t.model, t.prefix)
    cached = src.features is not None
    formats = memory_formats(cfg, device)
    batches = [b.tolist() for b in perm.split(cfg.batch_size)]
    loss_sum, correct, seen = 0.0, 0, 0
    for step, (idx, x, unreadable) in enumerate(src.inputs(batches, flips, seeds), 1):
        raise_unreadable(unreadable)
        y = src.labels[idx].to(device, non_blocking=True)
        with autocast(cfg, device):
            logits = forward(t.frozen, t.trained, x, cached, formats)
            loss = nn.functional.cross_entropy(logits.float(), y)
        value = loss.item()
        bad = not math.isfinite(value) or value > EXPLODED_LOSS * max(1.0, math.log(logits.shape[1]))
        stop = t.stop.is_set()
        if t.group is not None:  # every rank takes the same branch, or DDP's next all-reduce would hang
            stop, bad = distributed.any_rank([stop, bad], f"epoch {epoch}, batch {step}")
        if bad:
            what = f"became {value}" if not math.isfinite(value) else f"exploded to {value:.3g}"
            lower = min(cfg.lr / 10, 1e-3)  # a tenth, and no more than the default
            raise Diverged(f"training diverged: loss {what} at epoch {epoch}, batch {step} "
                           f"(lr={cfg.lr:g} is probably too high; try {lower:g})")
        if stop:
            raise Stopped(f"stopped by request during epoch {epoch}")
        t.optimizer.zero_grad(set_to_none=True)
        if t.scaler:
            t.scaler.scale(loss).backward()
            t.scaler.step(t.optimizer)
            t.scaler.update()
        else:
            loss.backward()
            t.optimizer.step()
        loss_sum += value * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(idx)
        yield BatchProgress("train", epoch, step, len(batches))
    if t.group is not None:
        loss_sum, correct, seen = distributed.all_sum([loss_sum, correct, seen], f"the metrics of epoch {epoch}")
    return loss_sum / seen, correct / seen


def evaluate(t: Trainer, src: InputSource, epoch: int) -> Iterator:
    """Validation (each rank its share under torchrun, gathered); returns (mean
    loss, accuracy, confusion pairs, logits on the CPU) over the whole val split."""
    cfg, device = t.cfg, t.device
    t.model.eval()
    cached = src.features is not None
    formats = memory_formats(cfg, device)
    mine = torch.arange(len(src))
    if t.group is not None:  # no padding: each image counted once
        mine = mine[t.group.rank::t.group.world]
    batches = [b.tolist() for b in mine.split(inference_batch_size(device, cfg.batch_size, cached))]
    loss_sum, predicted, all_logits = 0.0, [], []
    for step, (idx, x, unreadable) in enumerate(src.inputs(batches), 1):
        # (under torchrun ranks have different batch counts: a stop is agreed at the epoch's end)
        if t.stop.is_set() and t.group is None:
            raise Stopped(f"stopped by request during validation of epoch {epoch}")
        raise_unreadable(unreadable)
        y = src.labels[idx].to(device, non_blocking=True)
        with torch.inference_mode(), autocast(cfg, device):
            logits = forward(t.frozen, t.suffix, x, cached, formats).float()
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        predicted.append(logits.argmax(1).cpu())
        all_logits.append(logits.cpu())
        yield BatchProgress("val", epoch, step, len(batches))
    predicted = torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.long)
    logits = torch.cat(all_logits) if all_logits else torch.zeros(0, len(src.split.classes))
    if t.group is not None:
        parts = distributed.gather_objects((mine.tolist(), predicted.tolist(), loss_sum, logits.tolist()),
                                           f"validation of epoch {epoch}")
        full = torch.zeros(len(src), dtype=torch.long)
        full_logits = torch.zeros(len(src), len(src.split.classes))  # gathered too: every rank fits the same T
        for where, pred, _, part_logits in parts:
            full[where] = torch.tensor(pred, dtype=torch.long)
            if part_logits:
                full_logits[where] = torch.tensor(part_logits, dtype=torch.float32)
        predicted, loss_sum, logits = full, sum(part[2] for part in parts), full_logits
    n = len(src)
    return loss_sum / n, (predicted == src.labels).sum().item() / n, confusion_pairs(src.labels, predicted), logits
