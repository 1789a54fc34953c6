"""Files on disk, safely. Writing: every file is written atomically (temp file +
os.replace, fsync), a failed write names the file and why. Reading: a model file
is checked before torch.load sees it (what it is, what it may cost: safeload)
and loaded with weights_only=True; a full-model pickle needs an explicit
opt-in, because unpickling can run arbitrary code."""
from __future__ import annotations

import csv
import errno
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

from .errors import CheckpointError, first_line
from .safeload import check_torch_file

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


def new_folder(parent: Path, name: str) -> Path | None:
    """Create parent/name, or name_2, name_3, ... where taken: mkdir is atomic, so
    two callers at the same moment each get their own. None if 999 are taken."""
    for i in range(1, 1000):
        path = parent / (name + (f"_{i}" if i > 1 else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    return None


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


def peek(path) -> dict:
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
