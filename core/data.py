"""Dataset discovery (ImageFolder layout), validation, decoding and tensors.

Layout: DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg. Images are decoded
once, resized to the shorter side `resize_size` (the first step of the
reference's val transform) and kept as uint8 tensors, so epochs never decode
JPEGs again and a corrupt file is found before training starts, not mid-epoch."""
from __future__ import annotations

import errno
import hashlib
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from .config import MAX_CLASSES
from .errors import DatasetError, ImageLoadError
from .images import IMAGE_EXTENSIONS, is_image_name, load_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Split:
    name: str
    classes: list[str]
    samples: list[tuple[str, int]]  # (path, class index)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def counts(self) -> dict[str, int]:
        c = Counter(y for _, y in self.samples)
        return {name: c[i] for i, name in enumerate(self.classes)}

    def summary_line(self) -> str:
        """The reference's `dataset_counts.py` line."""
        return f"{self.name}: {len(self.samples)} images | classes={self.classes} | per_class={self.counts()}"


@dataclass
class DatasetInfo:
    root: str
    classes: list[str]
    train: Split
    val: Split
    val_from_split: float | None = None  # fraction, when val/ was carved out of train/
    warnings: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.train.skipped + self.val.skipped

    def fingerprint(self) -> dict:
        """Which image files train/ and val/ hold: how many, and a SHA-256 of their
        sorted paths relative to the root. Checkpoints record it, so a split rebuilt
        later from the same folder can be told apart from the one training used."""
        rel = sorted(Path(os.path.relpath(p, self.root)).as_posix() for p, _ in [*self.train.samples, *self.val.samples])
        return {"images": len(rel), "sha256": hashlib.sha256("\n".join(rel).encode()).hexdigest()}


@dataclass
class SplitFolder:
    """What lies directly in a split folder (train/ or val/)."""
    classes: list[str]  # sub-folders not starting with '.'
    hidden: list[str]  # sub-folders starting with '.': never classes
    loose: list[Path]  # image files beside the class folders (in no class)
    unreadable: list[tuple[str, str]]  # (path, reason): entries that could not even be told apart


def read_split_folder(split_dir: Path) -> SplitFolder:
    """One pass over `split_dir`. An entry that cannot be examined (a link into
    a folder this user may not read) is named, not fatal. (Not torchvision's
    find_classes: it would make hidden folders classes and stop at such an
    entry; tests/test_security_training.py.)"""
    try:
        with os.scandir(split_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
    except PermissionError:
        raise DatasetError(f"cannot read {split_dir}: permission denied") from None
    out = SplitFolder([], [], [], [])
    for e in entries:
        try:
            is_dir = e.is_dir()
            is_file = not is_dir and e.is_file()
        except OSError as err:
            if not e.name.startswith("."):
                out.unreadable.append((e.path, unreadable_reason(err)))
            continue
        if is_dir:
            (out.hidden if e.name.startswith(".") else out.classes).append(e.name)
        elif is_file and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS):
            out.loose.append(Path(e.path))
        elif not is_file and not e.name.startswith(".") and e.is_symlink() and not os.path.exists(e.path):
            out.unreadable.append((e.path, "a link to a folder or file that does not exist"))
    out.classes.sort()
    return out


def unreadable_reason(err: OSError, folder: bool = False) -> str:
    if isinstance(err, PermissionError):
        return f"permission denied (cannot read this {'folder' if folder else 'entry'})"
    if err.errno == errno.ELOOP:
        return "a link that loops (too many levels of links)"
    return f"cannot be read ({err.strerror or err})"


def walk_class_folder(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(files, skipped) under `folder`. Links to files are followed; links to
    folders are not (no loops, and what a class holds stays inside it) and are
    named, as are folders that cannot be read, special files (a named pipe would
    block whoever opened it: never opened) and links to nothing. Hidden files
    (.DS_Store) are left out without a word."""
    files, skipped, stack = [], [], [folder]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError as err:
            skipped.append((Path(d), unreadable_reason(err, folder=True)))
            continue
        for e in entries:
            p = Path(e.path)
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(p)
                    continue
                if e.name.startswith("."):
                    continue
                if e.is_file():  # (follows a link)
                    files.append(p)
                elif not e.is_symlink():
                    skipped.append((p, "not a regular file (a named pipe, device or socket); not opened"))
                elif os.path.isdir(p):
                    skipped.append((p, "a link to a folder; links to folders are not followed (move or copy "
                                       "the images into the class folder)"))
                elif os.path.lexists(p) and not os.path.exists(p):
                    skipped.append((p, "a link to a file that does not exist"))
                else:
                    skipped.append((p, "a link to something that is not a regular file; not opened"))
            except OSError as err:
                skipped.append((p, unreadable_reason(err)))
    return files, skipped


def scan_split(split_dir: Path, name: str, classes: list[str] | None = None,
               folder: SplitFolder | None = None) -> Split:
    """List image files per class folder (sorted by path). Files that are not
    images by name, and entries that cannot be used (see walk_class_folder,
    read_split_folder), are reported as skipped. `folder`: split_dir as read."""
    folder = folder or read_split_folder(split_dir)
    classes = classes if classes is not None else folder.classes
    samples, skipped = [], [(Path(p), r) for p, r in folder.unreadable]
    for idx, cls in enumerate(classes):
        files, bad = walk_class_folder(split_dir / cls)
        skipped += bad
        for p in sorted(files):
            if is_image_name(p):
                samples.append((str(p), idx))
            else:
                skipped.append((p, "not an image file type"))
    return Split(name, classes, samples, [(str(p), r) for p, r in sorted(skipped)])


def scan_dataset(data_dir, val_split: float | None = None, seed: int = 0) -> DatasetInfo:
    """Find and check the dataset layout; raise DatasetError naming the folder at fault."""
    try:
        return _scan_dataset(data_dir, val_split, seed)
    except PermissionError as e:  # the folder itself or its train/ or val/ (entries inside are named, not fatal)
        raise DatasetError(f"cannot read {e.filename or data_dir}: permission denied") from None


def _scan_dataset(data_dir, val_split: float | None, seed: int) -> DatasetInfo:
    root = Path(data_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root} is a file, not a folder; give the folder that holds train/<class>/ and val/<class>/")
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; expected {root}/train/<class>/ and {root}/val/<class>/")
    train_dir, val_dir = root / "train", root / "val"
    notes: list[str] = []
    if not train_dir.is_dir():
        hint = (f"; {root} looks like a split itself: pass its parent, {{setting}} {root.parent}"
                if root.name in ("train", "val") and (root.parent / "train").is_dir() else "")
        raise DatasetError(f"{train_dir} is missing: the dataset needs {root}/train/<class>/ folders with images{hint}",
                           field="data_dir", value=str(root))
    train_folder = read_split_folder(train_dir)
    train = scan_split(train_dir, "train", folder=train_folder)
    loose, hidden = train_folder.loose, [train_dir / h for h in train_folder.hidden]
    if len(train.classes) < 2:
        hint = (f"; {len(loose)} image(s) lie directly in {train_dir}: move them into those class folders"
                if loose else "")
        raise DatasetError(f"{train_dir} has {len(train.classes)} class folder(s) {train.classes}; at least 2 are needed "
                           f"(one sub-folder per class, e.g. train/cat and train/fish){hint}")
    if len(train.classes) > MAX_CLASSES:
        raise DatasetError(f"{train_dir} has {len(train.classes):,} class folders; at most {MAX_CLASSES:,} are supported "
                           f"(is {{setting}} pointing at the right folder?)", field="data_dir", value=str(root))
    if val_dir.is_dir():
        val_folder = read_split_folder(val_dir)
        val_classes = val_folder.classes
        if val_classes != train.classes:
            only_train = sorted(set(train.classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(train.classes))
            raise DatasetError(f"class folders differ between {train_dir} and {val_dir}: "
                               f"only in train: {only_train or 'none'}; only in val: {only_val or 'none'}")
        val = scan_split(val_dir, "val", train.classes, val_folder)
        fraction = None
        loose += val_folder.loose
        hidden += [val_dir / h for h in val_folder.hidden]
        if val_split:
            notes.append(f"{{setting:val_split}} {val_split} ignored: {val_dir} exists and is used for validation")
    elif val_split:
        train, val = stratified_split(train, val_split, seed)
        fraction = val_split
    else:
        raise DatasetError(f"{val_dir} is missing: add {root}/val/<class>/ folders, "
                           f"or pass {{choice:val_split=0.2}} to hold out 20% of train/ for validation",
                           field="val_split")
    for folder in sorted({p.parent for p in loose}):  # beside the class folders, images are in no class: unused
        here = [p for p in loose if p.parent == folder]
        notes.append(f"{len(here)} image(s) lie directly in {folder} (not in a class folder) and are not used, "
                     f"e.g. {here[0].name}")
    if hidden:  # a folder named '.cats' is easily meant as a class
        notes.append(f"hidden folder(s) not used as classes (their names start with '.'; rename one to use it): "
                     + ", ".join(str(h) for h in hidden))
    info = DatasetInfo(str(root), train.classes, train, val, fraction)
    check_not_empty(info)
    info.warnings = notes + dataset_warnings(info)
    return info


def check_not_empty(info: DatasetInfo) -> None:
    for split in (info.train, info.val):
        empty = [c for c, n in split.counts().items() if n == 0]
        if empty:
            where = Path(info.root) / ("train" if split.name == "train" or info.val_from_split else split.name)
            locked = [c for c in empty if (str(where / c), unreadable_reason(PermissionError(), folder=True))
                      in split.skipped]
            if locked:
                raise DatasetError(f"class folder(s) {locked} in {where} cannot be read (permission denied)")
            raise DatasetError(f"class folder(s) {empty} in {where} contain no usable images "
                               f"(allowed: {', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})")


def stratified_split(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Seeded per-class hold-out, so both splits keep every class."""
    rng = random.Random(seed)
    keep, held = [], []
    for idx in range(len(train.classes)):
        items = [s for s in train.samples if s[1] == idx]
        rng.shuffle(items)
        if len(items) < 2:
            raise DatasetError(f"class '{train.classes[idx]}' has {len(items)} image(s) in train/; {{setting}} needs at "
                               f"least 2 per class (one to train, one to validate), or add a val/ folder",
                               field="val_split", value=fraction)
        n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
        held += items[:n_val]
        keep += items[n_val:]
    return (Split("train", train.classes, sorted(keep), train.skipped),
            Split("val", train.classes, sorted(held), []))


def dataset_warnings(info: DatasetInfo) -> list[str]:
    out = []
    counts = info.train.counts()
    lo, hi = min(counts.values()), max(counts.values())
    if lo and hi / lo >= 1.5:
        out.append(f"class imbalance in train: {counts} (largest/smallest = {hi / lo:.1f}x); accuracy can hide a weak class")
    tiny = [c for c, n in counts.items() if n < 10]
    if tiny:
        out.append(f"very few training images for {tiny} (< 10 each); expect noisy results")
    if info.skipped:
        out.append(skipped_warning(info.skipped))
    return out


def skipped_warning(skipped: list[tuple[str, str]], limit: int = 20) -> str:
    lines = [f"  {p}: {r}" for p, r in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return f"skipped {len(skipped)} unreadable or non-image file(s):\n" + "\n".join(lines)


def decode_resized(path: str, resize_size: int) -> torch.Tensor:
    """File -> uint8 CHW tensor with the shorter side = resize_size (Resize(256)).
    The tensor copy and resize run inside the image's decode budget (load_rgb)."""
    return load_rgb(path, min_side=resize_size,
                    finish=lambda img: resize_short_side(TF.pil_to_tensor(img), resize_size))


def resize_short_side(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 CHW -> shorter side = size, bilinear with antialias (Resize(256)).
    On uint8 tensors torchvision uses a vectorised kernel: ~6x faster than
    resizing the PIL image, and within a grey level or two of it."""
    return TF.resize(img, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def decode_split(split: Split, resize_size: int, keep: bool, threads: int = 2, chunk: int = 64):
    """Generator: decode every image once (a full check), yielding the count done
    after each chunk. Unreadable files move to `split.skipped`. Returns the
    decoded tensors when `keep`, else None."""
    def work(path):
        try:
            t = decode_resized(path, resize_size)
            return t if keep else True
        except ImageLoadError as e:
            return e
    paths = [p for p, _ in split.samples]
    results = []
    with ThreadPoolExecutor(max(1, threads)) as pool:  # Pillow decodes without the GIL
        for start in range(0, len(paths), chunk):
            results += pool.map(work, paths[start:start + chunk])
            yield len(results)
    good, images = [], []
    for (path, y), r in zip(split.samples, results):
        if isinstance(r, ImageLoadError):
            split.skipped.append((path, r.reason))
        else:
            good.append((path, y))
            images.append(r)
    split.samples = good
    return images if keep else None


def estimate_decoded_bytes(split: Split, resize_size: int) -> int:
    """Rough size of the decoded cache (short side resize_size, 4:3 photos)."""
    return len(split.samples) * 3 * resize_size * int(resize_size * 4 / 3)


def normalize(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float normalised with ImageNet statistics (ToTensor + Normalize)."""
    return TF.normalize(batch_uint8.float().div_(255), IMAGENET_MEAN, IMAGENET_STD, inplace=True)


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    return TF.center_crop(img, [size, size])


def random_resized_crop(img: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(size) with torchvision's defaults, drawn from `gen` so
    runs are reproducible: torchvision draws from the global RNG, so it runs on
    a fork of that RNG holding gen's state, and gen takes the state back after.
    Crops come from the decoded (short side 256) image."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(gen.get_state())
        top, left, ch, cw = RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
        gen.set_state(torch.get_rng_state())
    return TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
