"""Safe import of a dataset .zip (the app's upload). Everything is checked
before a byte is written, and files only ever land inside a new folder."""
from __future__ import annotations

import os
import shutil
import stat
import zipfile
from datetime import datetime
from pathlib import Path, PurePosixPath

from .errors import DatasetError

MAX_TOTAL_BYTES = 2 * 2**30   # uncompressed size limit
MAX_FILES = 50_000
MAX_RATIO = 200               # per-entry compression ratio; JPEGs barely compress


def dataset_root_in(names: list[str]) -> str:
    """The folder inside the zip that holds train/: '' or 'mydata/' (a zipped folder)."""
    for n in sorted(names, key=lambda n: (n.count("/"), n)):
        parts = PurePosixPath(n).parts
        if "train" in parts[:-1]:
            i = parts.index("train")
            return "/".join(parts[:i]) + ("/" if i else "")
    raise DatasetError("the zip has no train/ folder: it must hold train/<class>/ (and val/<class>/) folders of images")


def check_members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > MAX_FILES:
        raise DatasetError(f"the zip holds {len(infos):,} entries; the limit is {MAX_FILES:,}")
    total = 0
    for info in infos:
        name = info.filename
        p = PurePosixPath(name.replace("\\", "/"))
        if name.startswith(("/", "\\")) or p.is_absolute() or (len(name) > 1 and name[1] == ":"):
            raise DatasetError(f"the zip contains an absolute path ({name!r}); refused")
        if ".." in p.parts:
            raise DatasetError(f"the zip contains a path that escapes its folder ({name!r}); refused")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise DatasetError(f"the zip contains a symbolic link ({name!r}); refused")
        total += info.file_size
        if total > MAX_TOTAL_BYTES:
            raise DatasetError(f"the zip expands to more than {MAX_TOTAL_BYTES // 2**30} GB; refused (zip bomb?)")
        if info.compress_size and info.file_size / info.compress_size > MAX_RATIO and info.file_size > 2**20:
            raise DatasetError(f"entry {name!r} compresses {info.file_size // info.compress_size}:1; refused (zip bomb?)")
    return infos


def extract_dataset_zip(zip_path, dest_root, name: str | None = None) -> Path:
    """Validate and extract into a new folder under dest_root; return the
    dataset root (the folder holding train/). Raises DatasetError."""
    zip_path = Path(zip_path)
    if not zipfile.is_zipfile(zip_path):
        raise DatasetError(f"{zip_path.name} is not a zip file")
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = check_members(zf)
            root = dataset_root_in([i.filename for i in infos if not i.is_dir()])
            base = Path(dest_root)
            base.mkdir(parents=True, exist_ok=True)
            stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in (name or zip_path.stem))[:40] or "dataset"
            target = base / f"{stem}_{datetime.now():%Y%m%d_%H%M%S_%f}"
            target.mkdir()
            try:
                extract_members(zf, infos, target)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
    except zipfile.BadZipFile as e:
        raise DatasetError(f"{zip_path.name} is a damaged zip file ({e})") from None
    return target / root if root else target


def extract_members(zf: zipfile.ZipFile, infos, target: Path) -> None:
    """Write each regular file with a hard byte cap, so a lying header cannot
    write more than it declared."""
    real_target = os.path.realpath(target)
    for info in infos:
        if info.is_dir():
            continue
        out = Path(os.path.realpath(target / info.filename))
        if os.path.commonpath([real_target, str(out)]) != real_target:
            raise DatasetError(f"the zip entry {info.filename!r} would be written outside its folder; refused")
        out.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with zf.open(info) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > info.file_size:
                    raise DatasetError(f"entry {info.filename!r} is larger than its header says; refused")
                dst.write(chunk)
