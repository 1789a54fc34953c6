"""The training engine: one generator that both the CLI and the app consume.

    for event in train(config, stop_event):
        RunStarted   -> once, after setup (run folder, dataset, notes)
        BatchProgress-> per batch (or image chunk), phase "decode" | "cache" | "train" | "val"
        Notice       -> e.g. images found unreadable while decoding
        EpochEnded   -> per epoch, metrics and checkpoint paths
        RunEnded     -> once: "completed", "stopped" or "diverged"

Speed: when a prefix of the network is frozen and the training input is
deterministic (augment none, or light = flip-only kept as two views), the
prefix runs once per image and view and the trainable suffix trains on the
cached activations. Frozen layers always run as an eval-only copy with
BatchNorm folded into the convolutions. Numerically the same as running the
whole model (in float32, up to rounding). With --amp 1 (float16 autocast on
CUDA, bfloat16 on CPUs with native bf16) the prefix runs, and its cached
activations are kept, in that dtype too: autocast would cast them down before
the suffix's first convolution anyway."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import checkpoint as ck
from .config import TrainConfig, policy_from_flags
from .data import (DatasetInfo, Split, center_crop, decode_resized, decode_split, estimate_decoded_bytes,
                   normalize, random_resized_crop, scan_dataset, skipped_warning)
from .device import amp_dtype, amp_note, inference_batch_size, resolve_device, usable_cpus
from .errors import CheckpointError, ConfigError, DatasetError, UserError
from .metrics import clean_confusion, confusion_pairs, per_class, per_class_lines
from .models import apply_policy, build_model, fold_batchnorm, param_counts, set_train_mode, split_model


# ---------------------------------------------------------------- events

@dataclass
class RunStarted:
    run_dir: str
    dataset: DatasetInfo
    config: TrainConfig
    device: str
    trainable_params: int
    total_params: int
    start_epoch: int
    notes: list[str] = field(default_factory=list)

    def header_lines(self) -> list[str]:
        """RUN_DIR, the DATASET block, MODEL and PARAMS lines (the CLI's stdout)."""
        cfg, info = self.config, self.dataset
        held = (f" (held out of train/ by --val-split {info.val_from_split}: {len(info.val.samples)} of "
                f"{len(info.val.samples) + len(info.train.samples)} images, at least 1 per class)"
                if info.val_from_split else "")
        lines = [f"RUN_DIR: {self.run_dir}", "DATASET:", f"  root: {info.root}", f"  {info.train.summary_line()}",
                 f"  {info.val.summary_line()}{held}",
                 f"MODEL: arch={cfg.arch} weights={cfg.weights} policy={cfg.policy} dropout={cfg.dropout} "
                 f"augment={cfg.effective_augment} device={self.device}",
                 f"PARAMS: trainable={self.trainable_params:,} total={self.total_params:,}"]
        if self.start_epoch > 1:
            lines.append(f"RESUME: continuing at epoch {self.start_epoch}/{cfg.epochs}")
        return lines


@dataclass
class BatchProgress:
    phase: str  # "decode" | "cache" | "train" | "val"
    epoch: int
    step: int
    total: int


@dataclass
class Notice:
    """Something the user should know that was found after RunStarted (e.g. unreadable images)."""
    level: str  # "warning" | "info"
    text: str


@dataclass
class EpochEnded:
    epoch: int
    epochs: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float
    best_acc: bool
    best_loss: bool
    latest_path: str
    confusion: list = field(default_factory=list)  # [[true, predicted, count], ...] on val (core.metrics)

    def line(self) -> str:
        """The reference's EPOCH line, byte for byte."""
        return (f"EPOCH {self.epoch}/{self.epochs}  train_loss={self.train_loss:.4f} train_acc={self.train_acc:.4f}  "
                f"val_loss={self.val_loss:.4f} val_acc={self.val_acc:.4f}  lr={self.lr:g}")

    def as_row(self) -> dict:
        return {"epoch": self.epoch, "train_loss": self.train_loss, "train_acc": self.train_acc,
                "val_loss": self.val_loss, "val_acc": self.val_acc, "lr": self.lr, "seconds": round(self.seconds, 3)}


@dataclass
class RunEnded:
    status: str  # "completed" | "stopped" | "diverged"
    message: str
    run_dir: str
    epochs_done: int
    best: dict
    best_acc_path: str | None
    best_loss_path: str | None
    history: list[dict]
    exports: list[str] = field(default_factory=list)
    best_confusion: list | None = None  # validation of the best-accuracy epoch, when known
    classes: list[str] = field(default_factory=list)

    def end_lines(self) -> list[str]:
        """Status (unless completed), the BEST block, per-class results and exported files."""
        lines = [] if self.status == "completed" else [f"{self.status.upper()}: {self.message}"]
        return lines + self.best_lines() + self.per_class_lines() + [f"EXPORTED: {p}" for p in self.exports]

    def per_class_rows(self) -> list[dict]:
        return per_class(self.best_confusion, self.classes)

    def per_class_lines(self) -> list[str]:
        rows = self.per_class_rows()
        if not rows:
            return []
        return [f"PER_CLASS: val accuracy by class at the best_acc epoch ({self.best['acc_epoch']})",
                *per_class_lines(rows)]

    def best_lines(self) -> list[str]:
        if not self.best.get("acc_epoch") and not self.best.get("loss_epoch"):
            return ["BEST: none (no completed epoch with a finite validation loss)"]
        return [
            "BEST:",
            f"  best_acc={self.best['acc']:.4f} (epoch {self.best['acc_epoch']}) -> {self.best_acc_path or 'none'}",
            f"  best_loss={self.best['loss']:.4f} (epoch {self.best['loss_epoch']}) -> {self.best_loss_path or 'none'}",
        ]


# ---------------------------------------------------------------- run folders

def new_run_dir(output_dir, run_name: str) -> Path:
    """checkpoints/<run_name>_<YYYYmmdd_HHMMSS>, suffixed _2, _3 if taken."""
    root = Path(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output folder {root}: {e.strerror}; pass a writable --output-dir") from None
    if not os.access(root, os.W_OK):
        raise ConfigError(f"output folder {root} is not writable; pass a writable --output-dir")
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    for i in range(1, 1000):
        path = root / (f"{run_name}_{stamp}" + (f"_{i}" if i > 1 else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new run folder under {root}")


# ---------------------------------------------------------------- best-model rules

def is_better_acc(acc: float, loss: float, best: dict) -> bool:
    """Higher val_acc wins; equal acc with lower loss wins (accuracy saturates on
    small sets). NaN is never best."""
    if math.isnan(acc) or math.isnan(loss):
        return False
    if best["acc_epoch"] == 0:
        return True
    return acc > best["acc"] or (acc == best["acc"] and loss < best["acc_loss"])


def is_better_loss(loss: float, best: dict) -> bool:
    if math.isnan(loss):
        return False
    return best["loss_epoch"] == 0 or loss < best["loss"]


def empty_best() -> dict:
    """acc_loss: val_loss of the best-accuracy epoch (the tie-breaker)."""
    return {"acc": 0.0, "acc_epoch": 0, "acc_loss": float("inf"), "loss": float("inf"), "loss_epoch": 0}


def update_best(best: dict, epoch: int, val_loss: float, val_acc: float) -> tuple[bool, bool]:
    """Apply one epoch's validation to `best`; (new best accuracy, new best loss)."""
    improved_acc, improved_loss = is_better_acc(val_acc, val_loss, best), is_better_loss(val_loss, best)
    if improved_acc:
        best.update(acc=val_acc, acc_epoch=epoch, acc_loss=val_loss)
    if improved_loss:
        best.update(loss=val_loss, loss_epoch=epoch)
    return improved_acc, improved_loss


# ---------------------------------------------------------------- in-process caches (the app trains many runs)

_CACHE_LOCK = threading.Lock()
_DECODED: dict = {}   # decoded images of one dataset (train and val splits)
_FEATURES: dict = {}  # one set of frozen-prefix activations


def _remember(store: dict, key, value, capacity: int = 1):
    """Keep at most `capacity` entries (oldest dropped): bounded memory."""
    with _CACHE_LOCK:
        store.pop(key, None)
        while len(store) >= capacity:
            store.pop(next(iter(store)))
        store[key] = value


def split_key(split: Split, resize: int):
    stats = tuple((p, os.stat(p).st_mtime_ns, os.stat(p).st_size) for p, _ in split.samples)
    return (split.name, resize, stats)


def decoded_images(split: Split, resize: int, keep: bool, threads: int, stop: threading.Event) -> Iterator:
    """Decode (and verify) every image once, yielding progress; reuse across runs
    while the files are unchanged. Returns the decoded tensors, or None when not kept."""
    key = split_key(split, resize)
    with _CACHE_LOCK:
        hit = _DECODED.get(key)
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
            raise _Stopped("stopped by request while reading images")
    if keep:
        _remember(_DECODED, key, (split.samples[:], split.skipped[before:], images), capacity=2)
    return images


def module_fingerprint(module: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- the engine

# A mean batch cross-entropy this many times chance level (ln C, at least 1) is
# not training any more: lr 10 gives 1e2..1e4 after one step; healthy runs stay
# within a few times chance.
EXPLODED_LOSS = 50.0


class _Stopped(Exception):
    pass


class _Diverged(Exception):
    pass


def train(cfg: TrainConfig, stop: threading.Event | None = None, resume_checkpoint: dict | None = None) -> Iterator:
    """Run (or resume) a training run, yielding events. Bad input raises
    UserError (before the first event, or later for data found unreadable or a
    failed write); stop and divergence end with a RunEnded. resume_checkpoint:
    cfg.resume as read_checkpoint gave it, when the caller has read it already."""
    cfg.validate()
    stop = stop or threading.Event()
    device = resolve_device(cfg.device)
    notes = [n for n in [amp_note(device, cfg.amp), random_backbone_note(cfg)] if n]

    resume = None
    if cfg.resume:
        resume, resume_notes = read_resume(cfg, resume_checkpoint)
        notes += resume_notes
    info = scan_dataset(cfg.data_dir, cfg.val_split, cfg.seed)
    if resume and resume["class_names"] != info.classes:
        raise ConfigError(f"--resume checkpoint classes {resume['class_names']} differ from the dataset's {info.classes}")

    torch.manual_seed(cfg.seed)
    if resume:
        model = ck.model_from_checkpoint(resume, cfg.resume)
    else:
        model = build_model(cfg.arch, len(info.classes), cfg.dropout, cfg.weights)
    apply_policy(model, cfg.arch, cfg.policy)
    prefix, suffix = split_model(model, cfg.arch, cfg.policy)
    image_fmt, suffix_fmt = memory_formats(cfg, device)
    model.to(device, memory_format=image_fmt)
    suffix.to(memory_format=suffix_fmt)

    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, device)
    if resume and resume.get("optimizer_state"):
        restore_optimizer(optimizer, resume["optimizer_state"], cfg)

    if resume:
        run_dir, new_folder, note = resume_run_dir(cfg, resume)
        notes += [note] if note else []
    else:
        run_dir, new_folder = new_run_dir(cfg.output_dir, cfg.run_name), True
    history = list(resume["history"]) if resume else []
    best = resume_best(resume) if resume else empty_best()
    best_confusion = clean_confusion(resume.get("best_val_confusion"), len(info.classes)) if resume else None
    start_epoch = int(resume["epoch"]) + 1 if resume else 1
    if new_folder:
        ck.atomic_write_json(run_dir / "args.json", cfg.to_dict())
    trainable, total = param_counts(model)
    started = RunStarted(str(run_dir), info, cfg, str(device), trainable, total, start_epoch, notes)

    status, message, epochs_done = "completed", "", start_epoch - 1
    try:
        aug = cfg.effective_augment
        views = 2 if aug == "light" else 1
        cache_ok, cache_note = plan_feature_cache(cfg, info, prefix, device, views)
        started.notes.append(cache_note)
        yield started
        keep_decoded = estimate_decoded_bytes(info.train, cfg.resize_size) + estimate_decoded_bytes(info.val, cfg.resize_size) \
            <= cfg.cache_budget_mb * 2**20
        threads = cfg.num_workers or usable_cpus()  # decoding threads (--num-workers)
        known = set(info.skipped)  # skipped by name at scan time, already printed
        train_imgs = yield from decoded_images(info.train, cfg.resize_size, keep_decoded, threads, stop)
        val_imgs = yield from decoded_images(info.val, cfg.resize_size, keep_decoded, threads, stop)
        unreadable = [s for s in info.skipped if s not in known]
        if unreadable:  # the DATASET counts were taken before decoding: say what trains now
            info.warnings.append(skipped_warning(unreadable) + "\n" + "\n".join(
                f"  {s.name} now: {len(s.samples)} images | per_class={s.counts()}" for s in (info.train, info.val)))
            yield Notice("warning", info.warnings[-1])
        for split in (info.train, info.val):
            if not split.samples or len({y for _, y in split.samples}) < len(info.classes):
                raise DatasetError(f"after skipping unreadable files, {split.name} no longer has images for every class "
                                   f"(see the warning above)")
        train_src = InputSource(info.train, train_imgs, cfg)
        val_src = InputSource(info.val, val_imgs, cfg)
        feats = None
        if cache_ok:
            key = (module_fingerprint(prefix), cfg.image_size, split_key(info.train, cfg.resize_size),
                   split_key(info.val, cfg.resize_size), views, str(amp_dtype(device, cfg.amp)))
            with _CACHE_LOCK:
                feats = _FEATURES.get(key)
        # What the frozen layers compute, BatchNorm folded in: every frozen forward
        # runs it. Not built (None) when the features come from the in-process cache.
        frozen: nn.Sequential | None = fold_batchnorm(prefix) if feats is None else None
        if cache_ok and feats is None:
            feats = yield from compute_features(frozen, [(train_src, views), (val_src, 1)], cfg, device, stop)
            _remember(_FEATURES, key, feats)
        if feats is not None:
            train_src.features, val_src.features = feats
        del train_imgs, val_imgs

        loss_fn = nn.CrossEntropyLoss()
        scaler = make_grad_scaler(cfg, device, resume.get("scaler_state") if resume else None)
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            tr = yield from train_one_epoch(model, prefix, frozen, suffix, optimizer, loss_fn, train_src, cfg,
                                            device, epoch, aug, stop, scaler)
            val_loss, val_acc, confusion = yield from evaluate(model, frozen, suffix, val_src, cfg, device, epoch, stop)
            improved_acc, improved_loss = update_best(best, epoch, val_loss, val_acc)
            if improved_acc:
                best_confusion = confusion
            ended = EpochEnded(epoch, cfg.epochs, tr[0], tr[1], val_loss, val_acc, optimizer.param_groups[0]["lr"],
                               time.perf_counter() - t0, improved_acc, improved_loss, str(run_dir / "latest.pt"),
                               confusion)
            history.append(ended.as_row())
            save_epoch(run_dir, model, optimizer, scaler, epoch, best, info.classes, cfg, history, improved_acc,
                       improved_loss, confusion, best_confusion)
            epochs_done = epoch
            yield ended
            if stop.is_set() and epoch < cfg.epochs:  # a stop after the last epoch changes nothing
                raise _Stopped("stopped by request after epoch %d" % epoch)
    except _Stopped as e:
        status, message = "stopped", str(e)
    except _Diverged as e:
        status, message = "diverged", str(e)
    finally:
        stop.clear()
        if epochs_done == 0 and new_folder:
            remove_empty_run(run_dir)
    if status != "completed":  # what is on disk now
        message += ("; checkpoints of completed epochs are kept" if epochs_done else
                    "; nothing was saved" + ("" if run_dir.exists() else f" and the run folder {run_dir} was removed"))
    try:
        exports = export_formats(run_dir, cfg, info.classes)  # from best_acc.pt, whatever the status
    except OSError as e:  # the run itself is saved; say so instead of losing the summary
        exports, message = [], f"{message}; export failed: {e.strerror or e}".lstrip("; ")
    if status == "completed":
        message = f"finished {epochs_done} epoch(s)" + (f"; {message}" if message else "")
    yield RunEnded(status, message, str(run_dir), epochs_done, dict(best),
                   str(run_dir / "best_acc.pt") if (run_dir / "best_acc.pt").exists() else None,
                   str(run_dir / "best_loss.pt") if (run_dir / "best_loss.pt").exists() else None,
                   history, exports, best_confusion, list(info.classes))


def memory_formats(cfg: TrainConfig, device: torch.device) -> tuple[torch.memory_format, torch.memory_format]:
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


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with its fused kernel on CPU and CUDA (other devices keep torch's
    default): one vectorised pass per step instead of a loop over tensors, e.g.
    6 ms instead of 26 ms for ResNet-18's layer4 + fc on 2 CPU cores. Same update
    up to float rounding."""
    fused = True if device.type in ("cpu", "cuda") else None
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def make_grad_scaler(cfg: TrainConfig, device: torch.device, saved: dict | None, kind: str = "cuda"):
    """float16 autocast (CUDA --amp 1) needs loss scaling; bfloat16 and float32
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


def restore_optimizer(optimizer: torch.optim.AdamW, saved: dict, cfg: TrainConfig) -> None:
    """Load a checkpoint's optimizer state into this run's optimizer, keeping
    this run's lr, weight decay and kernel choice."""
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state in {cfg.resume} does not fit this model/policy: {e}") from None
    fused = optimizer.defaults["fused"]
    for g in optimizer.param_groups:  # loading copied the saved run's settings; this run's apply
        g.update(lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused, foreach=optimizer.defaults["foreach"])
    for p, st in optimizer.state.items():  # fused kernels want the step count beside the weights
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].to(p.device if fused else "cpu", torch.float32)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            # ...and the moments in the weights' memory layout, which differs when the run was saved on
            # another device or by an older version (see memory_formats): no per-step copies, and CUDA's
            # fused kernel requires equal strides.
            if torch.is_tensor(st.get(k)) and st[k].stride() != p.stride():
                st[k] = torch.empty_like(p).copy_(st[k])


def random_backbone_note(cfg: TrainConfig) -> str | None:
    if cfg.weights != "none" or cfg.policy == "full" or cfg.resume:
        return None
    return (f"--weights none with policy '{cfg.policy}': the frozen layers keep their random init, so expect "
            f"chance-level accuracy (fine for a timing or plumbing test); for real results use ImageNet weights "
            f"or --policy full")


def resume_run_dir(cfg: TrainConfig, resume: dict) -> tuple[Path, bool, str | None]:
    """(folder, is_new, note). A resumed run continues in its checkpoint's folder
    only when that folder provably holds this run and nothing past it (see
    folder_verdict): the next save replaces latest.pt, the best files and
    metrics.csv there. Otherwise it goes to a new folder under cfg.output_dir
    and `note` says why."""
    source = Path(cfg.resume).resolve()
    folder = source.parent
    verdict, detail = folder_verdict(folder, source, resume)
    if verdict == "same":
        ck.recover_run_folder(folder, resume, source=source)
        return folder, False, None
    new = new_run_dir(cfg.output_dir, cfg.run_name)
    carry_best_files(resume, source, new, from_folder=verdict == "later")
    epoch = int(resume["epoch"])
    if verdict == "later":
        return new, True, f"--resume: {folder / detail} is past epoch {epoch}; continuing in a new folder so its later " \
                          f"epochs are kept"
    if verdict == "no run":
        return new, True, f"--resume: {folder} is not a run folder ({detail}); continuing in a new folder so nothing " \
                          f"there is overwritten"
    return new, True, f"--resume: {folder} holds another run ({detail}); continuing in a new folder so its files are kept"


# A run, for telling whether a folder holds it: the settings no resume can
# change (fixed_run_settings), and its per-epoch validation history.
HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


def folder_verdict(folder: Path, source: Path, ckpt: dict) -> tuple[str, str]:
    """Whether `folder` (where checkpoint `source` = `ckpt` lies) is that run's:
    - ("same", ""): its args.json holds the checkpoint's fixed settings (arch,
      policy, dropout, seed, augment, val-split, input sizes); every row of its
      metrics.csv, and the history in each of its latest.pt / best_acc.pt /
      best_loss.pt (besides `source` itself), equals the checkpoint's history
      for that epoch (same losses, accuracies and lr); those files hold its
      class names; and none of them goes past the checkpoint's epoch.
    - ("later", file name): all that, except that a file goes further (resuming
      best_acc.pt or an older copy): the same run, whose later epochs the next
      save would overwrite.
    - ("no run", reason): no readable args.json (a downloads folder, say).
    - ("other", reason): anything else, e.g. another run's files."""
    try:
        args = json.loads((folder / "args.json").read_text())
    except FileNotFoundError:
        return "no run", "it has no args.json"
    except (OSError, ValueError):
        return "no run", "its args.json cannot be read"
    if not isinstance(args, dict):
        return "no run", "its args.json is not a run's settings"
    mine = fixed_run_settings(ckpt)
    theirs = fixed_run_settings({"args": args, "arch": args.get("arch"), "policy": args.get("policy"),
                                 "head": {"dropout": args.get("dropout")}})
    for name, value in mine.items():
        if value is not None and not same_value(theirs.get(name), value):
            return "other", f"its args.json has {name}={theirs.get(name)}, the checkpoint {name}={value}"
    epoch, rows = int(ckpt["epoch"]), {h.get("epoch"): h for h in ckpt.get("history") or []}
    later = []  # files of this run that go past the checkpoint
    try:
        with open(folder / "metrics.csv", newline="") as f:
            csv_rows = list(csv.DictReader(f))
    except FileNotFoundError:
        csv_rows = []
    except (OSError, ValueError, csv.Error):
        return "other", "its metrics.csv cannot be read"
    e = history_mismatch(csv_rows, rows, epoch)
    if e == "later":
        later.append("metrics.csv")
    elif e:
        return "other", f"its metrics.csv {e}"
    seen = {_inode(source)}
    for name in ("latest.pt", "best_acc.pt", "best_loss.pt"):
        path = folder / name
        if not path.is_file() or _inode(path) in seen:  # (is_file: a pipe named so is never opened)
            continue
        seen.add(_inode(path))
        saved = ck._peek(path)
        if type(saved.get("epoch")) is not int:
            return "other", f"its {name} is not a checkpoint this tool can read"
        names = saved.get("class_names")
        if names is not None and (not isinstance(names, (list, tuple)) or list(names) != list(ckpt["class_names"])):
            return "other", f"its {name} has other classes"
        e = history_mismatch(ck.history_rows(saved.get("history")), rows, epoch)
        if e and e != "later":
            return "other", f"its {name} {e}"
        if e == "later" or saved["epoch"] > epoch:
            later.append(name)
    if later:
        return "later", "latest.pt" if "latest.pt" in later else later[0]
    return "same", ""


def history_mismatch(their_rows: list[dict], mine: dict, epoch: int) -> str | None:
    """None when each of `their_rows` equals `mine` (epoch -> row, the checkpoint's
    history up to `epoch`) on HISTORY_KEYS; "later" for a row past `epoch`; else
    what differs."""
    for row in their_rows:
        try:
            e = int(float(row.get("epoch")))
        except (TypeError, ValueError, OverflowError):
            return "has a row without an epoch number"
        if e > epoch:
            return "later"
        if e not in mine:
            return f"has epoch {e}, which the checkpoint's history lacks"
        for key in HISTORY_KEYS:
            if key in row and key in mine[e] and not same_value(row[key], mine[e][key]):
                return f"differs from the checkpoint's history at epoch {e} ({key})"
    return None


def same_value(a, b) -> bool:
    """Equal as numbers where both read as numbers (a CSV cell '0.5' and 0.5;
    NaN equals NaN), else as they are."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    try:
        x, y = float(a), float(b)
    except (TypeError, ValueError):
        return a == b
    return x == y or (math.isnan(x) and math.isnan(y))


def _inode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def carry_best_files(resume: dict, source: Path, run_dir: Path, from_folder: bool = True) -> None:
    """A run continued in a new folder starts with its best files: later epochs
    only replace them when they do better. Each is the source checkpoint or
    (from_folder: the old folder is this run's) that folder's file of that name,
    whichever holds the epoch the checkpoint calls best (hard links, so nothing
    is written twice)."""
    for name, key in (("best_acc.pt", "best_epoch"), ("best_loss.pt", "best_loss_epoch")):
        want = int(resume.get(key) or 0)
        if want and want == int(resume["epoch"]):  # the resumed file is itself that best epoch
            ck.atomic_link_or_copy(source, run_dir / name)
        elif from_folder and want and (source.parent / name).is_file() and ck.saved_epoch(source.parent / name) == want:
            ck.atomic_link_or_copy(source.parent / name, run_dir / name)


def fixed_run_settings(ckpt: dict) -> dict:
    """What a resumed run keeps from its (normalised) checkpoint, whatever is
    asked: the model and policy the optimizer state belongs to, and the data
    pipeline (or a --val-split hold-out would change). None: not recorded."""
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    policy = ckpt.get("policy") or args.get("policy")
    flags = ("freeze_backbone", "unfreeze_last", "unfreeze_all")
    if not policy and any(f in args for f in flags):  # the reference records its three 0/1 flags
        policy = policy_from_flags(*(int(args.get(f, d)) for f, d in zip(flags, (1, 0, 0))))
    # A guessed dropout rate (a reference head with a Dropout but no recorded rate) is not held to.
    head = ckpt["head"]
    dropout = None if head.get("dropout_guessed") or head.get("dropout") is None else float(head["dropout"])
    saved = {"arch": ckpt.get("arch"), "policy": policy, "dropout": dropout}
    saved.update({k: args[k] for k in ("seed", "val_split", "augment", "image_size", "resize_size") if k in args})
    return saved


def read_resume(cfg: TrainConfig, ckpt: dict | None = None) -> tuple[dict, list[str]]:
    """The checkpoint to resume (read from cfg.resume unless given), with cfg's
    arch/policy/dropout set to the checkpoint's (they must match to restore the
    optimizer state)."""
    ckpt = ckpt if ckpt is not None else ck.read_checkpoint(cfg.resume)
    if int(ckpt["epoch"]) >= cfg.epochs:
        raise ConfigError(f"{cfg.resume} already finished epoch {ckpt['epoch']}; pass a larger --epochs "
                          f"(the new total, e.g. --epochs {int(ckpt['epoch']) + 10}) to train further")
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    notes = []
    for name, value in fixed_run_settings(ckpt).items():
        if value is not None and getattr(cfg, name) != value:
            notes.append(f"--resume: continuing with the checkpoint's {name}={value}")
            setattr(cfg, name, value)
    if ckpt["head"].get("dropout_guessed") and not cfg.dropout:  # the head has a Dropout layer: some rate is needed
        cfg.dropout = float(ckpt["head"]["dropout"])
        notes.append(f"--resume: the checkpoint's head has a Dropout of unrecorded rate; using {cfg.dropout} "
                     f"(give --dropout to choose)")
    # The weights were loaded when the run began; keep recording where they came from.
    cfg.weights = str(ckpt.get("weights") or args.get("weights") or cfg.weights)
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{cfg.resume} holds settings this tool cannot use: {e}") from None
    return ckpt, notes


def resume_best(ckpt: dict) -> dict:
    acc_epoch = int(ckpt.get("best_epoch", 0))
    rows = [h for h in ckpt.get("history") or [] if isinstance(h, dict) and h.get("epoch") == acc_epoch]
    return {"acc": float(ckpt.get("best_val_acc", 0.0)), "acc_epoch": acc_epoch,
            "acc_loss": float(rows[0].get("val_loss", float("inf"))) if rows else float("inf"),  # the reference kept no val_loss
            "loss": float(ckpt.get("best_val_loss", float("inf"))),
            "loss_epoch": int(ckpt.get("best_loss_epoch", acc_epoch))}


def remove_empty_run(run_dir: Path) -> None:
    """A run stopped before its first epoch leaves nothing behind."""
    try:
        if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {"args.json"}:
            shutil.rmtree(run_dir)
    except OSError:
        pass


def plan_feature_cache(cfg, info, prefix, device, views) -> tuple[bool, str]:
    if cfg.cache == "off":
        return False, "feature cache: off (--cache off)"
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
                       f"(--cache-budget-mb); using the uncached path")
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
    dtype = amp_dtype(device, cfg.amp) or torch.float32  # kept as computed: half the memory under --amp
    image_fmt, suffix_fmt = memory_formats(cfg, device)
    total = sum(len(src) * views for src, views in sources)
    done = 0
    for src, views in sources:
        per_view = []
        for view in range(views):
            chunks = []
            for idx in torch.arange(len(src)).split(inference_batch_size(device, cfg.batch_size)):
                if stop.is_set():
                    raise _Stopped("stopped by request before the first epoch")
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


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device, non_blocking=True)


def in_format(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """x in memory layout `fmt` if it is a batch of maps (4-D); pooled features as they are."""
    return x.contiguous(memory_format=fmt) if x.dim() == 4 else x


def autocast(cfg, device):
    dtype = amp_dtype(device, cfg.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def forward(frozen, suffix, x, cached: bool, formats: tuple[torch.memory_format, torch.memory_format]):
    """suffix(frozen(x)), or suffix(x) on cached activations, each part fed in
    its memory layout (memory_formats)."""
    image_fmt, suffix_fmt = formats
    if cached or len(frozen) == 0:  # (no frozen layers: suffix_fmt is image_fmt)
        return suffix(in_format(x, suffix_fmt))
    with torch.no_grad():  # the frozen prefix needs no autograd graph
        feats = frozen(in_format(x, image_fmt))
    return suffix(in_format(feats, suffix_fmt))


def train_one_epoch(model, prefix, frozen, suffix, optimizer, loss_fn, src: InputSource, cfg, device, epoch, aug, stop, scaler):
    # Seeded per epoch so a resumed run draws the same batches and flips as an uninterrupted one.
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    torch.manual_seed(cfg.seed + epoch)  # dropout
    perm = torch.randperm(len(src), generator=gen)
    flips = torch.rand(len(src), generator=gen) < 0.5 if aug in ("light", "standard") else None
    set_train_mode(model, prefix)
    cached = src.features is not None
    formats = memory_formats(cfg, device)
    batches = perm.split(cfg.batch_size)
    loss_sum, correct, seen = 0.0, 0, 0
    for step, idx in enumerate(batches, 1):
        if stop.is_set():
            raise _Stopped(f"stopped by request during epoch {epoch}")
        x = to_device(src.batch(idx, flips, aug, gen), device)
        y = src.labels[idx].to(device)
        with autocast(cfg, device):
            logits = forward(frozen, suffix, x, cached, formats)
            loss = loss_fn(logits.float(), y)
        if not torch.isfinite(loss) or loss.item() > EXPLODED_LOSS * max(1.0, math.log(logits.shape[1])):
            what = f"became {loss.item()}" if not torch.isfinite(loss) else f"exploded to {loss.item():.3g}"
            lower = min(cfg.lr / 10, 1e-3)  # a tenth, and no more than the default
            raise _Diverged(f"training diverged: loss {what} at epoch {epoch}, batch {step} "
                            f"(lr={cfg.lr:g} is probably too high; try {lower:g})")
        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += loss.item() * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(idx)
        yield BatchProgress("train", epoch, step, len(batches))
    return loss_sum / seen, correct / seen


def evaluate(model, frozen, suffix, src: InputSource, cfg, device, epoch, stop):
    model.eval()
    cached = src.features is not None
    formats = memory_formats(cfg, device)
    batches = torch.arange(len(src)).split(inference_batch_size(device, cfg.batch_size, cached))
    loss_sum, predicted = 0.0, []
    for step, idx in enumerate(batches, 1):
        if stop.is_set():
            raise _Stopped(f"stopped by request during validation of epoch {epoch}")
        x = to_device(src.batch(idx, None, "none", None), device)
        y = src.labels[idx].to(device)
        with torch.inference_mode(), autocast(cfg, device):
            logits = forward(frozen, suffix, x, cached, formats).float()
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        predicted.append(logits.argmax(1).cpu())
        yield BatchProgress("val", epoch, step, len(batches))
    predicted = torch.cat(predicted)
    n = len(src)
    return loss_sum / n, (predicted == src.labels).sum().item() / n, confusion_pairs(src.labels, predicted)


def save_epoch(run_dir: Path, model, optimizer, scaler, epoch, best, classes, cfg, history, improved_acc,
               improved_loss, val_confusion=None, best_val_confusion=None):
    """latest.pt every epoch; best files are hard links to it (no second 45 MB write)."""
    ckpt = ck.make_checkpoint(model=model, optimizer=optimizer, epoch=epoch, best=best, class_names=classes,
                              weights=cfg.weights, args=cfg.to_dict(), history=history, arch=cfg.arch,
                              dropout=cfg.dropout, policy=cfg.policy, resize_size=cfg.resize_size,
                              image_size=cfg.image_size, scaler=scaler, val_confusion=val_confusion,
                              best_val_confusion=best_val_confusion)
    try:
        with ck.one_dir_sync():
            latest = ck.atomic_torch_save(ckpt, run_dir / "latest.pt")
            if improved_acc:
                ck.atomic_link_or_copy(latest, run_dir / "best_acc.pt")
            if improved_loss:
                ck.atomic_link_or_copy(latest, run_dir / "best_loss.pt")
            ck.atomic_write_csv(run_dir / "metrics.csv", history)
    except OSError as e:
        if not run_dir.is_dir():
            raise UserError(f"could not write checkpoints to {run_dir}: the run folder no longer exists (deleted or "
                            f"moved while training?), so no checkpoint of this run is left there") from None
        raise UserError(f"could not write checkpoints to {run_dir}: {e.strerror or e} "
                        f"(disk full or not writable?). {saved_state(run_dir, epoch - 1)}") from None


def saved_state(run_dir: Path, previous: int) -> str:
    """What a failed save left in the run folder, as found on disk (files can
    be deleted or replaced under a running run)."""
    epochs = {name: ck.saved_epoch(run_dir / name) for name in ("latest.pt", "best_acc.pt", "best_loss.pt")
              if (run_dir / name).is_file()}
    epochs = {name: e for name, e in epochs.items() if e is not None}
    if not epochs:
        return "No checkpoint of this run is left there" + (" (none had been saved yet)." if previous == 0 else
                                                             " (latest.pt is missing or unreadable).")
    if epochs.get("latest.pt") == previous:
        return f"Files from earlier epochs are intact (latest.pt holds epoch {previous})."
    return "Left there: " + ", ".join(f"{name} (epoch {e})" for name, e in epochs.items()) + "."


def export_formats(run_dir: Path, cfg: TrainConfig, classes) -> list[str]:
    """The reference's other save formats, made from the best-accuracy checkpoint."""
    if not (cfg.export_state_dict or cfg.export_full_model) or not (run_dir / "best_acc.pt").exists():
        return []
    model = ck.model_from_checkpoint(ck.read_checkpoint(run_dir / "best_acc.pt"), run_dir / "best_acc.pt")
    out = []
    if cfg.export_state_dict:
        out.append(str(ck.export_state_dict(model, run_dir / "state_dict.pt")))
    if cfg.export_full_model:
        out.append(str(ck.export_full_model(model, classes, run_dir / "full_model.pt")))
    return out
