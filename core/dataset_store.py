"""Datasets made in the app: an ordinary ImageFolder under `<root>/<name>/`
(train/<class>/ and, when the user adds some, val/<class>/), so train.py
--data-dir <root>/<name> trains on it as on any folder.

Rules, each a UserError with its field:
- names (dataset and class) are kept as typed (outer spaces trimmed, stored
  NFC) and refused when empty, too long, hidden ('.x'), '.'/'..', holding a
  path separator, control or Windows-forbidden characters, a Windows device
  name, or ending in '.' or ' '; unique ignoring case and Unicode form (on a
  case-insensitive disk 'Cat' and 'cat' are one folder; macOS stores 'é'
  decomposed);
- images are stored with the bytes they came with, named
  <stem>_<sha256[:12]>.<ext of the real format>; exact duplicates (same
  SHA-256 anywhere in the dataset) are skipped and said; a file that is not a
  decodable image, is empty or over MAX_IMAGE_BYTES is refused with its name;
- every path written is resolved and checked to lie inside <root>/<name>/
  (a class folder linked elsewhere is refused); files appear atomically
  (temp + os.replace); a per-dataset file lock serialises changes, so two
  pages or processes adding to one class never lose an image."""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from .config import MAX_CLASSES
from .data import read_split_folder, walk_class_folder
from .dataset_files import check_name, file_digest, name_key, read_image_bytes, safe_stem, write_new
from .errors import UserError
from .images import is_image_name

SPLITS = ("train", "val")
LOCK_NAME = ".dataset.lock"
# Without val/ images a built dataset is split at Start: 20% of each class, at least one image
# (core.data.stratified_split), so 5 images per class train on 4 and check on 1.
DEFAULT_VAL_SPLIT = 0.2
LOCK_TIMEOUT_S = 30
# Names that are not datasets beside them: <root> may itself be a dataset (the demo set's train/ and val/).
_RESERVED_DATASETS = {"train", "val"}


@dataclass
class AddResult:
    added: list[str] = field(default_factory=list)  # stored file names
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (given name, where it already is)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (given name, reason)

    def summary(self) -> str:
        parts = [f"added {len(self.added)} image(s)"]
        if self.duplicates:
            parts.append(f"skipped {len(self.duplicates)} exact duplicate(s): "
                         + "; ".join(f"{n} (already {w})" for n, w in self.duplicates[:5]))
        if self.refused:
            parts.append(f"refused {len(self.refused)}: " + "; ".join(f"{n}: {r}" for n, r in self.refused[:5]))
        return ", ".join(parts)


@dataclass
class DatasetEntry:
    name: str
    path: Path
    editable: bool  # made here (<root>/<name>): images and classes can be added
    counts: dict[str, dict[str, int]]  # split -> class -> images

    def classes(self) -> list[str]:
        return sorted({c for per in self.counts.values() for c in per})

    def label(self) -> str:
        train, val = self.counts.get("train", {}), self.counts.get("val", {})
        per = ", ".join(f"{c} {train.get(c, 0)}" + (f"+{val[c]}" if val.get(c) else "") for c in self.classes())
        return f"{self.name} — {len(self.classes())} classes: {per or 'none yet'}"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"split {split!r} is not one of {', '.join(SPLITS)}", field="split", value=split)


def count_split(split_dir: Path) -> dict[str, int]:
    """Images per class folder of one split, as the training scan finds them."""
    if not split_dir.is_dir():
        return {}
    try:
        folder = read_split_folder(split_dir)
    except UserError:
        return {}
    return {c: sum(1 for p in walk_class_folder(split_dir / c)[0] if is_image_name(p)) for c in folder.classes}


def val_split_for(path) -> float | None:
    """The validation fraction a dataset needs at Start: none when it has val/ images, else DEFAULT_VAL_SPLIT."""
    return None if any(dataset_counts(Path(path)).get("val", {}).values()) else DEFAULT_VAL_SPLIT


def dataset_counts(path: Path) -> dict[str, dict[str, int]]:
    return {s: count_split(path / s) for s in SPLITS if (path / s).is_dir()}


class DatasetStore:
    """The datasets under `root` (the app's data/ folder)."""

    def __init__(self, root):
        self.root = Path(root)

    # ------------------------------------------------------------ paths

    def _real_root(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root.resolve()

    def _inside(self, path: Path, base: Path, what: str) -> Path:
        real = path.resolve()
        if real != base and not real.is_relative_to(base):
            raise UserError(f"{what} leads outside {base} (a link?); refused", field="dataset", value=str(path))
        return real

    def dataset_path(self, name: str) -> Path:
        """The folder of an existing dataset made here; UserError if there is none or it leads out of root."""
        root = self._real_root()
        name = check_name(name, "dataset_name", "dataset name")
        for entry in self._entries(root):
            if name_key(entry.name) == name_key(name) and entry.is_dir():
                path = root / entry.name
                real = self._inside(path, root, f"dataset {name!r}")
                if not (real / "train").is_dir():
                    break
                return real
        raise UserError(f"there is no dataset {name!r} under {root}", field="dataset_name", value=name)

    @staticmethod
    def _entries(folder: Path) -> list[Path]:
        try:
            return sorted(folder.iterdir())
        except OSError:
            return []

    def _class_dir(self, ds: Path, split: str, cls: str, create: bool = False) -> Path:
        check_split(split)
        split_dir = ds / split
        if create:
            split_dir.mkdir(exist_ok=True)
        self._inside(split_dir, ds, f"{split}/")
        existing = self._find_class(ds, cls)
        path = split_dir / (existing or cls)
        if create:
            path.mkdir(exist_ok=True)
        if path.exists() or path.is_symlink():
            self._inside(path, ds, f"class folder {split}/{cls}")
        return path

    def _find_class(self, ds: Path, cls: str) -> str | None:
        """The stored spelling of class `cls` (same name_key) in any split, or None."""
        for split in SPLITS:
            for p in self._entries(ds / split):
                if p.is_dir() and name_key(p.name) == name_key(cls):
                    return p.name
        return None

    def _lock(self, ds: Path) -> FileLock:
        return FileLock(str(ds / LOCK_NAME), timeout=LOCK_TIMEOUT_S)

    def _locked(self, ds: Path):
        lock = self._lock(ds)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(f"dataset {ds.name!r} is busy (another page is changing it); try again",
                            field="dataset_name", value=ds.name) from None
        return lock

    # ------------------------------------------------------------ datasets

    def create(self, name) -> Path:
        """A new empty dataset <root>/<name>/train/."""
        root = self._real_root()
        name = check_name(name, "dataset_name", "dataset name")
        if name_key(name) in _RESERVED_DATASETS:
            raise UserError(f"dataset name {name!r} is reserved (train/ and val/ are a dataset's own folders)",
                            field="dataset_name", value=name)
        taken = [p.name for p in self._entries(root) if name_key(p.name) == name_key(name)]
        if taken:
            raise UserError(f"a dataset named {taken[0]!r} already exists in {root}; choose it to add to it, or "
                            f"pick another name", field="dataset_name", value=name)
        path = root / name
        try:
            path.mkdir()
        except FileExistsError:  # another page made it a moment ago
            raise UserError(f"a dataset named {name!r} already exists in {root}", field="dataset_name",
                            value=name) from None
        (path / "train").mkdir()
        return path

    def datasets(self, uploads=None) -> list[DatasetEntry]:
        """Datasets made here (editable), then <root> itself if it is one, then earlier zip uploads (these
        two are trained on as they are; nothing is written into them)."""
        root = self._real_root()
        out = [DatasetEntry(p.name, p, True, dataset_counts(p)) for p in self._entries(root)
               if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
               and name_key(p.name) not in _RESERVED_DATASETS and (p / "train").is_dir()]
        if (root / "train").is_dir():  # <root> itself is a dataset (the shipped demo set in data/)
            out.append(DatasetEntry(f"{root.name} (the folder itself)", root, False, dataset_counts(root)))
        for folder in self._entries(Path(uploads)) if uploads else []:
            if not folder.is_dir() or folder.is_symlink():
                continue
            inner = [folder] + [p for p in self._entries(folder) if p.is_dir() and not p.is_symlink()]
            ds = next((p for p in inner if (p / "train").is_dir()), None)
            if ds is not None:
                out.append(DatasetEntry(f"upload: {folder.name}", ds, False, dataset_counts(ds)))
        return out

    # ------------------------------------------------------------ classes

    def add_class(self, dataset, cls) -> str:
        ds = self.dataset_path(dataset)
        cls = check_name(cls, "class_name", "class name")
        with self._locked(ds):
            existing = self._find_class(ds, cls)
            if existing is not None:
                raise UserError(f"class {existing!r} already exists in {ds.name!r}"
                                + (" (names differing only in case or accents are one folder on many disks)"
                                   if existing != cls else ""), field="class_name", value=cls)
            if len(self.classes(dataset)) >= MAX_CLASSES:
                raise UserError(f"{ds.name!r} already has {MAX_CLASSES:,} classes, the most supported",
                                field="class_name", value=cls)
            self._class_dir(ds, "train", cls, create=True)
        return cls

    def classes(self, dataset) -> list[str]:
        ds = self.dataset_path(dataset)
        return sorted({p.name for s in SPLITS for p in self._entries(ds / s) if p.is_dir()
                       and not p.name.startswith(".")})

    def rename_class(self, dataset, old, new) -> str:
        ds = self.dataset_path(dataset)
        new = check_name(new, "class_name", "class name")
        with self._locked(ds):
            old_name = self._existing_class(ds, old)
            other = self._find_class(ds, new)
            if other is not None and other != old_name:
                raise UserError(f"class {other!r} already exists in {ds.name!r}", field="class_name", value=new)
            if new == old_name:
                return new
            done = []
            try:
                for split in SPLITS:
                    src = ds / split / old_name
                    if src.is_dir():
                        self._inside(src, ds, f"class folder {split}/{old_name}")
                        os.rename(src, ds / split / new)  # same folder: a rename, never a copy
                        done.append(split)
            except OSError as e:
                for split in done:  # put back what moved, so train/ and val/ keep one set of classes
                    os.rename(ds / split / new, ds / split / old_name)
                raise UserError(f"could not rename class {old_name!r}: {e.strerror or e}", field="class_name",
                                value=new) from None
        return new

    def delete_class(self, dataset, cls) -> int:
        """Remove the class and its images from every split; the number of images removed."""
        ds = self.dataset_path(dataset)
        with self._locked(ds):
            name = self._existing_class(ds, cls)
            removed = 0
            for split in SPLITS:
                folder = ds / split / name
                if folder.is_symlink():
                    raise UserError(f"class folder {split}/{name} is a link; remove it by hand", field="class_name",
                                    value=cls)
                if folder.is_dir():
                    self._inside(folder, ds, f"class folder {split}/{name}")
                    removed += sum(1 for p in walk_class_folder(folder)[0] if is_image_name(p))
                    shutil.rmtree(folder)
            self._prune_empty_val(ds)
        return removed

    def _existing_class(self, ds: Path, cls) -> str:
        name = self._find_class(ds, cls) if isinstance(cls, str) and cls else None
        if name is None:
            raise UserError(f"there is no class {cls!r} in dataset {ds.name!r}", field="class_name", value=cls)
        return name

    # ------------------------------------------------------------ images

    def images(self, dataset, cls, split="train") -> list[Path]:
        check_split(split)
        ds = self.dataset_path(dataset)
        name = self._find_class(ds, cls)
        folder = ds / split / name if name else None
        if folder is None or not folder.is_dir():
            return []
        return sorted(p for p in walk_class_folder(folder)[0] if is_image_name(p))

    def add_images(self, dataset, cls, files, split="train") -> AddResult:
        """`files`: paths, or (shown name, path or bytes) pairs (an upload's temp file and the name the user
        knows; a webcam frame's bytes).
        Each is checked (size, decodes as an image of a trainable format) before anything is written."""
        ds = self.dataset_path(dataset)
        result = AddResult()
        checked = []
        for item in files or []:
            shown, path = item if isinstance(item, tuple) else (Path(item).name, item)
            try:
                data, ext = read_image_bytes(path, shown)
            except UserError as e:
                result.refused.append((shown, getattr(e, "reason", e.message)))
                continue
            checked.append((shown, data, ext))
        if not checked:
            return result
        with self._locked(ds):
            name = self._existing_class(ds, cls)
            folder = self._class_dir(ds, split, name, create=True)
            known = self._hashes(ds)
            for shown, data, ext in checked:
                digest = hashlib.sha256(data).hexdigest()
                if digest in known:
                    result.duplicates.append((shown, f"in {known[digest]}"))
                    continue
                target = folder / f"{safe_stem(shown)}_{digest[:12]}{ext}"
                self._inside(target.parent, ds, f"class folder {split}/{name}")
                write_new(target, data)
                known[digest] = f"{split}/{name}"
                result.added.append(target.name)
        return result

    def remove_image(self, dataset, cls, filename, split="train") -> None:
        ds = self.dataset_path(dataset)
        if not isinstance(filename, str) or not filename or Path(filename).name != filename or filename in (".", ".."):
            raise UserError(f"{filename!r} is not an image file name", field="image", value=filename)
        with self._locked(ds):
            name = self._existing_class(ds, cls)
            path = ds / split / name / filename
            if not path.is_file() or path.is_symlink() or not is_image_name(path):
                raise UserError(f"there is no image {filename!r} in {split}/{name}", field="image", value=filename)
            self._inside(path, ds, f"image {filename}")
            path.unlink()
            self._prune_empty_val(ds)

    @staticmethod
    def _prune_empty_val(ds: Path) -> None:
        """A val/ left without images goes (empty folders only): with it, Start would refuse the
        dataset instead of holding out part of train/."""
        val = ds / "val"
        if val.is_dir() and not val.is_symlink() and not any(dataset_counts(ds).get("val", {}).values()):
            for d in sorted(val.iterdir(), reverse=True):
                try:
                    d.rmdir()
                except OSError:
                    return  # something that is no image is still there: left as is
            try:
                val.rmdir()
            except OSError:
                pass

    def _hashes(self, ds: Path) -> dict[str, str]:
        """SHA-256 of every image in the dataset -> 'split/class' (cached by file identity)."""
        out = {}
        for split in SPLITS:
            for cls in (read_split_folder(ds / split).classes if (ds / split).is_dir() else []):
                for p in walk_class_folder(ds / split / cls)[0]:
                    if is_image_name(p):
                        digest = file_digest(p)
                        if digest:
                            out.setdefault(digest, f"{split}/{cls}")
        return out
