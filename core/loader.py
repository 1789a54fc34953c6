"""Images that are not served from the in-memory caches, fed through
torch.utils.data.DataLoader: worker processes decode JPEGs while the main
process runs the model (a GPU would otherwise wait on one Python thread).

Every sample is a pure function of its key (index, flip, crop seed): the main
process decides the order, the flips and each random crop's seed from the run
seed, the epoch and the sample's index, the workers only execute. So results do
not depend on how many workers there are, or on which worker got which batch.
Batches come back as uint8 (4x less to copy between processes and to the GPU,
pinned on CUDA); normalising happens on the device."""
from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import os
import signal
import sys

import torch
from torch.utils.data import DataLoader, Dataset

from .data import center_crop, decode_resized, random_resized_crop
from .errors import ImageLoadError, UserError

# Modes: what an item is. "check": decode (the full verification), return
# nothing; "crop": the model's input (center crop, or a seeded random-resized
# crop), maybe flipped.
MODES = ("check", "crop")
# No batch from the workers in this long means a stuck worker, not a slow one (a
# batch takes seconds): an error beats waiting forever. TL_LOADER_TIMEOUT_S overrides.
BATCH_TIMEOUT_S = float(os.environ.get("TL_LOADER_TIMEOUT_S", "300"))
WORKER_FAILED = "exited unexpectedly", "DataLoader timed out"  # torch's words for the two


def default_num_workers(cpus: int | None = None) -> int:
    """Worker processes for the CLI: one core stays with the main process (it
    runs the model); at most 4 by default, since each worker holds its own
    prefetched batches and memory (a GPU machine may want more: the flag).
    Under torchrun the machine's cores are shared by its LOCAL_WORLD_SIZE ranks."""
    from .device import usable_cpus
    cpus = usable_cpus() if cpus is None else cpus
    cpus //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(4, cpus - 1))


def sample_seed(run_seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's random crop in one epoch (a 63-bit mix)."""
    x = (run_seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    return x % 2**63


def crop_of(img: torch.Tensor, size: int, flip: bool, seed: int | None) -> torch.Tensor:
    """The model's input for one decoded image: a seeded RandomResizedCrop
    (seed given) or the center crop, then the flip. The in-memory path and the
    workers both call this, so kept and streamed images train identically."""
    crop = random_resized_crop(img, size, torch.Generator().manual_seed(seed)) if seed is not None \
        else center_crop(img, size)
    return crop.flip(-1) if flip else crop


class ImageFiles(Dataset):
    """key -> (key's index, tensor or None, (path, reason) or None). A file that
    cannot be read comes back as its reason, not as an exception: the caller
    decides (skip it before training, or stop with the file's name)."""

    def __init__(self, paths: list[str], resize_size: int, image_size: int, mode: str):
        assert mode in MODES
        self.paths, self.resize_size, self.image_size, self.mode = paths, resize_size, image_size, mode

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        i, flip, seed = key if isinstance(key, tuple) else (key, False, None)
        try:
            img = decode_resized(self.paths[i], self.resize_size)
        except ImageLoadError as e:
            return i, None, (e.path, e.reason)
        if self.mode == "check":
            return i, None, None
        return i, crop_of(img, self.image_size, flip, seed).contiguous(), None


class Collate:
    """(indices, batch, errors): crops stacked into one uint8 batch (a zero image
    where a file failed); None for a check."""

    def __init__(self, mode: str, image_size: int):
        self.mode, self.image_size = mode, image_size

    def __call__(self, items):
        idx = [i for i, _, _ in items]
        errors = [(i, e) for i, _, e in items if e is not None]
        if self.mode != "crop":
            return idx, None, errors
        blank = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        return idx, torch.stack([t if t is not None else blank for _, t, _ in items]), errors


class KeyBatches:
    """The batch sampler: whatever list of key batches the main process set last.
    Persistent workers re-read it on every new pass over the loader."""

    def __init__(self):
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class Stream:
    """One DataLoader over a list of files, reused for every pass (workers
    started once: persistent_workers). `run(batches)` yields collated batches."""

    def __init__(self, paths: list[str], resize_size: int, image_size: int, mode: str, workers: int,
                 device: torch.device, prefetch: int = 4):
        self.sampler = KeyBatches()
        if workers and multiprocessing.current_process().daemon:
            workers = 0  # a daemonic process (someone's multiprocessing.Pool/Process) may not start workers;
            # decoding in-process gives the same batches (each sample is a function of its key), only slower
        self.workers = workers
        self.loader = DataLoader(
            ImageFiles(paths, resize_size, image_size, mode), batch_sampler=self.sampler, num_workers=workers,
            collate_fn=Collate(mode, image_size), pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=prefetch if workers > 0 else None, worker_init_fn=_worker_init if workers > 0 else None,
            timeout=BATCH_TIMEOUT_S if workers > 0 else 0)

    def run(self, batches: list[list]):
        self.sampler.batches = batches
        try:
            yield from self.loader
        except RuntimeError as e:
            if not any(w in str(e) for w in WORKER_FAILED):
                raise
            raise UserError(f"the image-decoding worker process(es) stopped delivering batches ({str(e).strip()}): "
                            f"a worker could not hand its batch over (often a full shared-memory folder, /dev/shm), "
                            f"ran out of memory or is stuck; rerun with {{setting}} 0 to decode in the main process",
                            field="num_workers", value=str(self.workers)) from None

    def close(self) -> None:
        """Stop the worker processes now (not when the garbage collector gets to it)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None


def _worker_init(_worker_id: int) -> None:
    """Ctrl-C (the terminal signals the whole process group) and torchrun's SIGTERM
    (sent to each rank's process group) are the main process's to handle: it stops
    between batches and then ends its workers. A worker killed by them would make
    the clean stop fail with 'DataLoader worker exited unexpectedly'. (A worker
    still exits when its main process dies: DataLoader's watchdog.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(_hand_over_failed)


def _hand_over_failed(e: BaseException, _obj) -> None:
    """A batch this worker could not send (torch's shared memory full, ...). The
    queue's feeder thread would print a traceback and go on, and the main process
    would wait for that batch forever; exiting lets it fail within seconds."""
    print(f"ERROR: an image-decoding worker could not hand its batch over: {type(e).__name__}: "
          f"{(str(e).strip().splitlines() or [''])[0]}", file=sys.stderr, flush=True)
    os._exit(3)


def raise_unreadable(errors) -> None:
    """A file that was readable before training and is not now (changed or removed mid-run)."""
    if errors:
        path, reason = errors[0][1]
        raise ImageLoadError(path, reason + " (it was readable when training started; was it changed or removed?)")
