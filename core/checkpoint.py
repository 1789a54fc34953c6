"""Checkpoint I/O. Every file is written atomically (temp file + os.replace) and
read with weights_only=True; the full-model pickle is the one exception and
needs an explicit opt-in, because unpickling can run arbitrary code."""
from __future__ import annotations

import csv
import errno
import functools
import glob
import io
import json
import os
import pickle
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable

import torch
from torch import nn

from . import checkpoint_rules as rules
from .errors import CheckpointError, first_line
from .config import ARCHS, MAX_CLASSES, POLICIES
from .models import build_model, few_keys, trainable_names
from .safeload import check_torch_file

FORMAT_VERSION = 1
REFERENCE_KEYS = ("epoch", "model_state", "optimizer_state", "best_val_acc", "best_val_loss",
                  "class_names", "weights", "args", "history", "best_epoch")


# ---------------------------------------------------------------- atomic writes

def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() would give; mkstemp alone gives 0600
_ACTIVE_TEMPS: set[str] = set()  # temp files this process is writing right now
_ACTIVE_LOCK = threading.Lock()


def atomic_write(path, write: Callable[[BinaryIO], object]) -> Path:
    """Call write(f) on `.<name>.<pid>.<random>.tmp` in the same folder, fsync,
    then os.replace: readers see the old file or the new one, never a partial
    one. A writer killed mid-write leaves only its temp file, which the next
    write of the same name removes once that process is gone.
    A failed write (full disk, quota, file size limit, read-only folder) is an
    OSError naming `path`, also where the writer hid it (torch.save turns one
    into RuntimeError '[enforce fail at inline_container.cc] unexpected pos')."""
    path = Path(path)
    tmp = None
    try:
        with _ACTIVE_LOCK:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
            _ACTIVE_TEMPS.add(os.path.abspath(tmp))
        with os.fdopen(fd, "wb") as raw:
            f = _Recording(raw)
            try:
                write(f)
            except Exception:
                if f.error is not None:  # the writer's own error hides the real one
                    raise f.error from None
                raise
            raw.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(raw.fileno(), _FILE_MODE)
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            _unlink_quietly(tmp)
        raise _naming(e, path) from None
    except BaseException:
        if tmp is not None:
            _unlink_quietly(tmp)
        raise
    finally:
        if tmp is not None:
            with _ACTIVE_LOCK:
                _ACTIVE_TEMPS.discard(os.path.abspath(tmp))
    _sync_dir_now_or_later(path.parent)
    remove_stale_temps(path)
    return path


class _Recording:
    """A file whose write() remembers the OSError it raised."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        try:
            return self._f.flush()
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


_WHY = {errno.ENOSPC: "the disk is full", getattr(errno, "EDQUOT", -1): "your disk quota is used up",
        errno.EFBIG: "larger than this file system or a process limit allows",
        errno.EROFS: "the disk is mounted read-only", errno.EACCES: "the folder is not writable for you",
        errno.EPERM: "the folder is not writable for you"}


def _naming(e: OSError, path: Path) -> OSError:
    """The same error (type and errno, so callers can tell), its message saying
    what happened in words, its filename the file being written, not the temp file."""
    if e.errno is None:
        return e
    why = e.strerror or os.strerror(e.errno)
    plain = _WHY.get(e.errno)
    return type(e)(e.errno, f"{why} ({plain})" if plain else why, str(path))


_DEFERRED = threading.local()  # .dirs: folders whose fsync one_dir_sync() will do


@contextmanager
def one_dir_sync():
    """Inside, atomic writes skip their own folder fsync; on leaving, each folder
    written to is fsynced once, so all those renames are durable by then
    (save_epoch: latest.pt, best links and metrics.csv cost 1 folder fsync, not 4).
    Each file's own data is still fsynced before its rename."""
    outer = getattr(_DEFERRED, "dirs", None)
    _DEFERRED.dirs = set() if outer is None else outer
    try:
        yield
    finally:
        if outer is None:
            dirs, _DEFERRED.dirs = _DEFERRED.dirs, None
            for folder in sorted(dirs):
                _fsync_dir(folder)


def _sync_dir_now_or_later(folder) -> None:
    dirs = getattr(_DEFERRED, "dirs", None)
    if dirs is None:
        _fsync_dir(folder)
    else:
        dirs.add(str(folder))


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def remove_stale_temps(path) -> list[Path]:
    """Delete `.<name>.<pid>.*.tmp` siblings left by writers that were killed
    (their process no longer exists). Returns what was removed."""
    path = Path(path)
    removed = []
    try:
        candidates = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        pid_part = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid_part.isdigit():
            continue
        with _ACTIVE_LOCK:
            if os.path.abspath(tmp) in _ACTIVE_TEMPS:  # another thread of ours is writing it
                continue
        # Our own pid but not ours: an earlier process that had the same pid (containers).
        if int(pid_part) != os.getpid() and _pid_alive(int(pid_part)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) is not a probe there; keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True
    return True


def _fsync_dir(folder) -> None:
    """Make the rename itself durable (power loss); not possible everywhere."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# torch's CRC switch is process-wide: our saves take turns flipping it off, and a
# torch.save elsewhere in the process during that window also skips its CRC.
_CRC_LOCK = threading.Lock()


def torch_save_without_crc(obj, f) -> None:
    """torch.save minus the per-record CRC32, which torch.load never checks
    (a corrupted tensor byte loads silently either way) and which costs ~50 ms
    of CPU per 100 MB: a third of a ResNet-18 `last` checkpoint write here.
    Zip tools (unzip -t, Python's zipfile) do check it and report such files as
    damaged, so files made for use elsewhere (exports) keep it."""
    with _CRC_LOCK:
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(obj, f)
        finally:
            torch.serialization.set_crc32_options(before)


def atomic_torch_save(obj, path, crc: bool = False) -> Path:
    """Straight into the temp file: no in-memory copies of a 45-135 MB checkpoint.
    Without CRC (per-epoch checkpoints) unless `crc` (exports)."""
    return atomic_write(path, lambda f: torch.save(obj, f) if crc else torch_save_without_crc(obj, f))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_csv(path, rows: list[dict]) -> Path:
    buf = io.StringIO()
    if rows:
        columns = list(dict.fromkeys(k for r in rows for k in r))  # a resumed reference run adds columns
        w = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def atomic_link_or_copy(src, dst) -> Path:
    """Make `dst` the same content as the just-written `src` without writing the
    bytes again: a hard link (atomic via os.replace), or a copy where links fail.
    Later os.replace of `src` gives src a new inode, so dst keeps its content."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    _unlink_quietly(tmp)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        _unlink_quietly(tmp)
        atomic_write_bytes(dst, src.read_bytes())
        return dst
    _sync_dir_now_or_later(dst.parent)
    remove_stale_temps(dst)
    return dst


RUN_FILES = ("args.json", "latest.pt", "best_acc.pt", "best_loss.pt", "metrics.csv")


def recover_run_folder(run_dir, latest: dict, source=None) -> list[str]:
    """Call when resuming a run, before training continues. Repairs what a
    crash (SIGKILL, power loss) can leave in a run folder:
    - save_epoch replaces latest.pt, then links best_acc.pt / best_loss.pt to
      it; killed in between, a best file is older than the epoch latest.pt
      calls best. When the resumed checkpoint is that best epoch, link again.
    - metrics.csv is written after latest.pt; killed in between, it lacks the
      last epoch. Two such kills in a row (resume, kill, resume, kill) would
      leave it two rows behind, so rewrite it from the checkpoint's history.
      A longer csv (resuming an older checkpoint) is kept until the next save.
    - temp files of killed writers (`.<name>.<pid>.*.tmp`, up to 45 MB each).
    Returns what was done, e.g. ['best_acc.pt', 'removed .latest.pt.123.x.tmp']."""
    run_dir = Path(run_dir)
    src = Path(source) if source is not None else run_dir / "latest.pt"
    epoch, done = latest.get("epoch"), []
    for name, key in (("best_acc.pt", "best_epoch"), ("best_loss.pt", "best_loss_epoch")):
        dst = run_dir / name
        if epoch is None or latest.get(key) != epoch or not src.is_file():
            continue
        try:
            if dst.exists() and os.path.samefile(src, dst):
                continue
        except OSError:
            pass
        # The same epoch (a copy, on file systems without hard links) or a later
        # one (from a run that went further) is not crash damage: keep it.
        if dst.is_file() and (saved_epoch(dst) or 0) >= epoch:
            continue
        atomic_link_or_copy(src, dst)
        done.append(name)
    history = latest.get("history") or []
    if history and _csv_rows(run_dir / "metrics.csv") < len(history):
        atomic_write_csv(run_dir / "metrics.csv", history)
        done.append("metrics.csv")
    for name in RUN_FILES:
        done += [f"removed {p.name}" for p in remove_stale_temps(run_dir / name)]
    return done


def _csv_rows(path) -> int:
    try:
        with open(path, newline="") as f:
            return max(sum(1 for _ in csv.reader(f)) - 1, 0)  # minus the header
    except OSError:
        return 0


def _peek(path) -> dict:
    """A checkpoint dict for reading a field or two; {} if unreadable or refused
    (safeload). Memory-mapped, so a 100 MB checkpoint is not read in full for one number."""
    try:
        with open(path, "rb") as f:
            check_torch_file(f, path, os.fstat(f.fileno()).st_size)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip-format file
            obj = torch.load(path, map_location="cpu", weights_only=True)
        return obj if isinstance(obj, dict) else {}
    except Exception:
        return {}


def saved_epoch(path) -> int | None:
    """The epoch a checkpoint file holds; None if unreadable or not an epoch number."""
    epoch = _peek(path).get("epoch")
    return epoch if type(epoch) is int and 0 <= epoch <= rules.MAX_EPOCH else None


def _unlink_quietly(p) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


# ---------------------------------------------------------------- reading

def check_model_file(path, what: str = "checkpoint") -> Path:
    """`path` as a Path if it may be a model file: a regular, non-empty file
    that is not obviously something else; else a CheckpointError saying what it is.
    `what` names it in messages ("{setting:weights} file", "checkpoint")."""
    p = Path(path).expanduser()
    if p.is_dir():
        inside = [n for n in ("latest.pt", "best_acc.pt") if (p / n).is_file()]
        raise CheckpointError(f"{what} {p} is a folder, not a .pt file"
                              + (f"; the file in it is e.g. {p / inside[0]}" if inside else ""))
    if not p.exists():
        raise CheckpointError(f"{what} {p} does not exist")
    if not p.is_file():
        raise CheckpointError(f"{what} {p} is not a regular file (device, pipe or socket)")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty (0 bytes); the file is damaged or was never written")
    kind = non_torch_content(p)
    if kind:  # else torch's own error would suggest weights_only=False, for a file that is no checkpoint at all
        raise CheckpointError(f"{p} is not a PyTorch checkpoint (.pt/.pth file); it looks like {kind}")
    return p


def load_file(path, trust_pickle: bool = False, what: str = "checkpoint"):
    """torch.load with weights_only=True; clear errors for missing, truncated,
    random or pickled-code files, and for files that would cost more memory
    than their size (zip bombs, see safeload), which torch.load never sees.
    With trust_pickle, a full-model pickle loads. Only CheckpointError escapes.
    `what` names the file in messages."""
    p = check_model_file(path, what)
    try:
        f = open(p, "rb")
    except OSError as e:
        raise CheckpointError(f"{what} {p} cannot be read: {e.strerror or e}") from None
    with f:  # one open file: what was checked is what torch reads
        check_torch_file(f, p, os.fstat(f.fileno()).st_size)
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if not looks_like_code_pickle(e):
                raise CheckpointError(f"{p} is not a valid PyTorch file ({first_line(e)})") from None
            if not trust_pickle:
                raise CheckpointError(  # field: front ends word the advice ({choice:trust_pickle=1}) their own way
                    f"{p} contains pickled Python objects (e.g. a full-model save), not just tensors; "
                    f"loading it could run arbitrary code, so it was refused. Only if you trust where it came from: "
                    f"{{choice:trust_pickle=1}}. Training ({{setting:resume}}, {{setting:weights}}) "
                    f"needs a checkpoint dict or a state_dict.", field="trust_pickle", value=str(p)) from None
        except MemoryError:
            raise CheckpointError(f"{p} is too large to load into memory") from None
        except Exception as e:  # truncated zip, random bytes, wrong format: torch raises many types
            raise CheckpointError(f"{p} is not a readable PyTorch checkpoint (truncated or not a .pt file: {first_line(e)})") from None
        try:
            f.seek(0)
            return torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"{p} could not be unpickled even with {{setting}}: {first_line(e)}",
                                  field="trust_pickle", value=str(p)) from None


def non_torch_content(p: Path) -> str | None:
    """What a file is, when it is neither torch.save's zip format nor its
    legacy pickle (which starts with a pickle protocol byte); None if it may be."""
    try:
        with open(p, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    for magic, kind in ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
                        (b"%PDF", "a PDF document")):
        if head.startswith(magic):
            return kind
    try:
        text = head.decode("utf-8").lstrip()
    except UnicodeDecodeError:  # (or text cut mid-character at byte 512: still not a checkpoint)
        return "some other binary data"
    if not all(c.isprintable() or c in "\t\r\n" for c in text):
        return "some other binary data"
    return "JSON text" if text[:1] in ("{", "[") else "a text file (e.g. CSV)"


def looks_like_code_pickle(e: Exception) -> bool:
    """weights_only refused a global (a class or function): a real pickle of
    Python objects, as opposed to random bytes or a truncated file."""
    msg = str(e)
    return "Unsupported global" in msg or "Weights only load failed" in msg and "GLOBAL" in msg


# ---------------------------------------------------------------- checkpoint dicts

def make_checkpoint(*, model: nn.Module, optimizer, epoch: int, best: dict, class_names: list[str],
                    weights: str, args: dict, history: list[dict], arch: str, dropout: float, policy: str,
                    resize_size: int, image_size: int, scaler=None, val_confusion=None,
                    best_val_confusion=None) -> dict:
    """A plain-type dict: the reference's keys plus what is needed to rebuild the
    model, the loss scale of a float16 (CUDA --amp 1) run so a resume keeps it,
    and per-class validation counts ([[true, predicted, count], ...], core.metrics)
    of this epoch and of the best-accuracy epoch."""
    return {
        "format_version": FORMAT_VERSION,
        "epoch": int(epoch),
        "model_state": on_cpu(model.state_dict()),
        "optimizer_state": on_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "scaler_state": scaler.state_dict() if scaler is not None else None,
        "val_confusion": val_confusion,
        "best_val_confusion": best_val_confusion,
        "best_val_acc": float(best["acc"]),
        "best_val_loss": float(best["loss"]),
        "best_epoch": int(best["acc_epoch"]),
        "best_loss_epoch": int(best["loss_epoch"]),
        "class_names": list(class_names),
        "weights": str(weights),
        "args": args,
        "history": [dict(h) for h in history],
        "arch": arch,
        "policy": policy,
        "head": {"dropout": float(dropout), "num_classes": len(class_names)},
        "preprocess": {"resize": int(resize_size), "crop": int(image_size),
                       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }


def on_cpu(obj):
    """obj with every tensor on the CPU (no copy for those already there): a GPU
    run's checkpoint must load with a plain torch.load on a machine without one."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def read_checkpoint(path, trust_pickle: bool = False) -> dict:
    """Load a checkpoint dict (ours or the reference's) to resume: its fields
    normalised and checked, the training state (optimizer, loss scaler) too."""
    obj = load_file(path, trust_pickle=trust_pickle)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is a bare state_dict (weights only: no epoch, optimizer or class names), not a "
                              f"checkpoint dict. Resume from a run's latest.pt; a state_dict can start a new run "
                              f"({{setting:weights}}) or predict (predict.py {{setting:classes}})", field="checkpoint")
    if not isinstance(obj, dict) or "model_state" not in obj:
        raise CheckpointError(f"{path} is not a checkpoint dict (no 'model_state' key)")
    ckpt = normalise_checkpoint(obj, path)
    rules.Rules(path).int_("epoch", ckpt.get("epoch"), 0, rules.MAX_EPOCH)  # a resume counts on from it
    rules.check_training_state(ckpt, path)
    check_optimizer_fits(ckpt, path)
    return ckpt


@functools.lru_cache(maxsize=16)
def trainable_shapes(arch: str, num_classes: int, dropout: float) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per policy, the shapes of the parameters an optimizer gets, in its order."""
    with torch.device("meta"):
        model = build_model(arch, num_classes, dropout, "none")
    return {policy: tuple(tuple(p.shape) for name, p in model.named_parameters()
                          if name.startswith(trainable_names(arch, policy))) for policy in POLICIES}


def check_optimizer_fits(ckpt: dict, path) -> None:
    """The saved optimizer state belongs to this model: as many parameters as
    one of the policies trains, each moment the shape of its parameter (torch's
    load_state_dict checks the count only; a wrong shape fails mid-training)."""
    opt = ckpt.get("optimizer_state")
    if not opt:
        return
    ids = [pid for g in opt["param_groups"] for pid in g["params"]]
    shapes = trainable_shapes(ckpt["arch"], ckpt["head"]["num_classes"], ckpt["head"]["dropout"])
    fitting = [s for s in shapes.values() if len(s) == len(ids)]
    r = rules.Rules(path)
    if len(set(ids)) != len(ids) or not fitting:
        counts = ", ".join(f"{len(s)} ({p})" for p, s in shapes.items())
        r.fail("optimizer_state.param_groups", opt["param_groups"],
               f"the parameters one policy of this model trains, each once: {counts}")
    for pid, shape in zip(ids, fitting[0]):
        for k, v in (opt["state"].get(pid) or {}).items():
            if not torch.is_tensor(v):
                continue
            if k == "step" and v.numel() != 1:
                r.fail(f"optimizer_state.state.{pid}.step", v, "a single number")
            if k != "step" and tuple(v.shape) != shape:
                r.fail(f"optimizer_state.state.{pid}.{k}", v, f"a tensor of its parameter's shape {shape}")


def normalise_checkpoint(ckpt: dict, path="<checkpoint>") -> dict:
    """Check every field (checkpoint_rules) and fill in those a reference
    checkpoint lacks (arch, head settings, preprocessing) from its keys and args.
    class_names None: none recorded (numbered names; `class_names_recorded` False)."""
    rules.check_fields(ckpt, path)
    version = ckpt.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version}; this tool reads up to {FORMAT_VERSION}. Update the tool.")
    state = ckpt["model_state"]
    args = ckpt.get("args") or {}
    ckpt = dict(ckpt)
    if ckpt.get("arch") is None:
        ckpt["arch"] = args.get("arch") or infer_arch(state)
    if ckpt["arch"] not in ARCHS:
        raise CheckpointError(f"{path} is a {rules.shown(ckpt['arch'])} model; this tool loads {', '.join(ARCHS)} "
                              f"(its 'arch')")
    outputs = head_out_features(state, path)
    head = dict(ckpt.get("head") or {"num_classes": outputs})
    if head["num_classes"] != outputs:
        rules.Rules(path).fail("head.num_classes", head["num_classes"],
                               f"the number of outputs of the head in model_state ({outputs})")
    if "dropout" not in head:
        has_dropout = any(k.startswith("fc.1.") for k in state)
        saved = args.get("dropout")  # 0.0 is a real value; only a missing one is guessed
        head["dropout"] = float(saved) if saved is not None else (0.5 if has_dropout else 0.0)
        if saved is None and has_dropout:  # the keys say a Dropout is there, not its rate
            head["dropout_guessed"] = True
    ckpt["head"] = head
    names = rules.check_class_names(ckpt.get("class_names"), outputs, path)
    ckpt["class_names_recorded"] = names is not None
    ckpt["class_names"] = names or [f"class_{i}" for i in range(outputs)]
    if ckpt.get("preprocess") is None:
        ckpt["preprocess"] = {"resize": 256, "crop": 224}
    ckpt["history"] = history_rows(ckpt.get("history"))
    return ckpt


def history_rows(history) -> list[dict]:
    """Per-epoch rows. The reference keeps history as a dict of lists
    ({'train_loss': [...], ...}); anything else unreadable becomes []."""
    if isinstance(history, dict):
        columns = {k: v for k, v in history.items() if isinstance(v, (list, tuple))}
        n = min((len(v) for v in columns.values()), default=0)
        return [{"epoch": i + 1, **{k: v[i] for k, v in columns.items() if k != "epoch"}} for i in range(n)]
    if isinstance(history, (list, tuple)):
        return [dict(h) for h in history if isinstance(h, dict)]
    return []


def infer_arch(state: dict) -> str:
    if "conv1.weight" in state and "layer4.0.conv1.weight" in state:
        return "resnet18"
    if "features.0.0.weight" in state:
        return "mobilenet_v2"
    raise CheckpointError("cannot tell the architecture from the state_dict keys; pass {setting}", field="arch")


def head_out_features(state: dict, path="the state_dict") -> int:
    for key in ("fc.weight", "fc.1.weight", "classifier.1.weight"):
        if key in state:
            shape = tuple(state[key].shape)
            if len(shape) != 2 or not 1 <= shape[0] <= MAX_CLASSES:
                rules.Rules(path).fail(f"model_state[{key!r}]", state[key],
                                       f"a 2-d head weight with 1 to {MAX_CLASSES:,} outputs")
            return shape[0]
    raise CheckpointError(f"{path}: no classification head (fc.weight / fc.1.weight / classifier.1.weight) in the "
                          f"state_dict")


def model_from_checkpoint(ckpt: dict, path="the checkpoint") -> nn.Module:
    # Built on the meta device and given the saved tensors: no random init that
    # the weights would overwrite, and torch's global RNG (a training run's
    # dropout in another thread of the app) is left alone.
    with torch.device("meta"):
        model = build_model(ckpt["arch"], ckpt["head"]["num_classes"], ckpt["head"]["dropout"], "none")
    # BatchNorm's num_batches_tracked may be absent (older or hand-made files); torch fills it in.
    wanted = model.state_dict()
    expected, given = ({k for k in keys if not k.endswith("num_batches_tracked")}
                       for keys in (wanted, ckpt["model_state"]))
    if expected != given:  # torch's own message is a list of hundreds of keys
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        try:
            looks = infer_arch(ckpt["model_state"])
        except CheckpointError:
            looks = None
        fix = (f"its keys are {looks}'s: pass {{choice:arch={looks}}}" if looks and looks != ckpt["arch"]
               else "is it a different architecture ({setting:arch})?")
        raise CheckpointError(f"{path} does not fit {ckpt['arch']}: {len(missing)} missing key(s) {few_keys(missing)}, "
                              f"{len(unexpected)} unexpected {few_keys(unexpected)}; {fix}")
    r = rules.Rules(path)
    for k, t in ckpt["model_state"].items():  # model.float() converts floating tensors only
        if t.layout != torch.strided or t.device.type != "cpu" or t.is_complex() or \
                t.is_floating_point() != wanted[k].is_floating_point() or t.dtype == torch.bool:
            r.fail(f"model_state[{k!r}]", t, f"a {'floating-point' if wanted[k].is_floating_point() else 'integer'} "
                                             f"tensor of shape {tuple(wanted[k].shape)}")
    try:
        model.load_state_dict(ckpt["model_state"], assign=True)
    except RuntimeError as e:  # its first line is only "Error(s) in loading state_dict for ResNet:"
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), first_line(e))
        raise CheckpointError(f"{path} does not fit {ckpt['arch']} ({detail[:240]}). "
                              f"Is it a different architecture ({{setting:arch}})?") from None
    return check_weights(model.float().eval(), path)  # float16 weights (someone's export) still run in float32


def check_weights(model: nn.Module, path) -> nn.Module:
    """Refuse NaN/inf weights (they predict p=nan for everything and cannot be
    trained further) and negative BatchNorm variances (the same, through a square root)."""
    for name, t in model.state_dict().items():
        if rules.value_problem(t):
            raise CheckpointError(f"{path} holds NaN or infinite weights in {name} (its run diverged); "
                                  f"use the run's best_acc.pt or best_loss.pt, or an earlier checkpoint")
    for name, m in model.named_modules():
        var = getattr(m, "running_var", None)
        if isinstance(m, nn.modules.batchnorm._NormBase) and torch.is_tensor(var) and \
                rules.value_problem(var, non_negative=True):
            raise CheckpointError(f"{path} holds a negative BatchNorm variance in {name}.running_var; a variance "
                                  f"is >= 0, so the file is damaged")
    return model


def model_from_state_dict(state: dict, arch: str | None, class_names: list[str] | None, path="<file>"):
    """A bare state_dict: the arch comes from `arch` (or the keys), class names from `class_names`."""
    n = head_out_features(state, path)
    if class_names and len(class_names) != n:
        raise CheckpointError(f"{{setting}} lists {len(class_names)} names but {path} has {n} outputs", field="classes")
    ckpt = normalise_checkpoint({"model_state": state, "arch": arch or infer_arch(state), "class_names": class_names}, path)
    return model_from_checkpoint(ckpt, path), ckpt["class_names"]


# ---------------------------------------------------------------- exports (the other formats the reference teaches)

def export_state_dict(model: nn.Module, path) -> Path:
    """Weights only. To load you must rebuild the same architecture yourself."""
    return atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path, crc=True)


def export_full_model(model: nn.Module, class_names: list[str], path) -> Path:
    """The whole pickled module: brittle (tied to this code and torch version) and
    unsafe to load from strangers. Kept because the reference teaches it."""
    model = model.cpu().eval()
    model.class_names = list(class_names)
    return atomic_torch_save(model, path, crc=True)
