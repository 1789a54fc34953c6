"""Safe import of a dataset .zip (the app's upload). Everything is checked
before a byte is written, and files only ever land inside a new folder."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import zipfile
import zlib
from datetime import datetime
from pathlib import Path, PurePosixPath

from .errors import DatasetError, first_line
from .fileio import new_folder

MAX_TOTAL_BYTES = 2 * 2**30   # uncompressed size limit
MAX_FILES = 50_000
MAX_RATIO = 200               # compression ratio limit; JPEGs barely compress
MAX_TOTAL_RATIO_FLOOR = 64 * 2**20  # the overall ratio limit applies above this size
DISK_RESERVE = 512 * 2**20   # free disk an extraction must leave: training still has to save its checkpoints
SOURCE_SUFFIX = ".zip-sha256"  # beside each extraction <folder>: the zip's digest, for reuse_or_extract


def dataset_root_in(names: list[str]) -> str:
    """The folder inside the zip that holds train/: '' or 'mydata/' (a zipped folder)."""
    for n in sorted(names, key=lambda n: (n.count("/"), n)):
        parts = PurePosixPath(n).parts
        if "train" in parts[:-1]:
            i = parts.index("train")
            return "/".join(parts[:i]) + ("/" if i else "")
    raise DatasetError("the zip has no train/ folder: it must hold train/<class>/ (and val/<class>/) folders of images")


def member_name(info: zipfile.ZipInfo) -> str:
    """The entry's path with '/' separators (some Windows tools write '\\')."""
    return info.filename.replace("\\", "/")


def check_members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """Refuse the whole zip before anything is written: escaping or absolute
    paths, links, too many entries, too many bytes, suspicious compression."""
    infos = zf.infolist()
    if len(infos) > MAX_FILES:
        raise DatasetError(f"the zip holds {len(infos):,} entries; the limit is {MAX_FILES:,}")
    total = compressed = 0
    for info in infos:
        name = info.filename
        norm = member_name(info)
        p = PurePosixPath(norm)
        if norm.startswith("/") or p.is_absolute() or (len(norm) > 1 and norm[1] == ":"):
            raise DatasetError(f"the zip contains an absolute path ({name!r}); refused")
        if ".." in p.parts:
            raise DatasetError(f"the zip contains a path that escapes its folder ({name!r}); refused")
        if "\x00" in name:
            raise DatasetError(f"the zip contains an entry name with a NUL byte ({name!r}); refused")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise DatasetError(f"the zip contains a symbolic link ({name!r}); refused")
        if info.flag_bits & 0x1:
            raise DatasetError(f"the zip is password-protected ({name!r} is encrypted); zip it without a password")
        total += info.file_size
        compressed += info.compress_size
        if total > MAX_TOTAL_BYTES:
            raise DatasetError(f"the zip expands to more than {_size(MAX_TOTAL_BYTES)}; refused (zip bomb?)")
        if info.file_size > 2**20 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise DatasetError(f"entry {name!r} compresses {info.file_size // max(info.compress_size, 1)}:1 "
                               f"(limit {MAX_RATIO}:1); refused (zip bomb?)")
    if total > MAX_TOTAL_RATIO_FLOOR and total > MAX_RATIO * max(compressed, 1):
        raise DatasetError(f"the zip expands {total // max(compressed, 1)}:1 overall ({_size(total)}; "
                           f"limit {MAX_RATIO}:1); refused (zip bomb?)")
    return infos


def extract_dataset_zip(zip_path, dest_root, name: str | None = None) -> Path:
    """Validate and extract into a new folder under dest_root; return the
    dataset root (the folder holding train/). Raises DatasetError (and only
    that); on any failure the new folder is removed again."""
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise DatasetError(f"{zip_path.name} does not exist or is not a file")
    try:
        if not zipfile.is_zipfile(zip_path):
            raise DatasetError(f"{zip_path.name} is not a zip file")
        with zipfile.ZipFile(zip_path) as zf:
            infos = check_members(zf)
            if not any(not i.is_dir() for i in infos):
                raise DatasetError(f"{zip_path.name} is an empty zip (no files in it)")
            root = dataset_root_in([member_name(i) for i in infos if not i.is_dir()])
            check_disk_room(Path(dest_root), sum(i.file_size for i in infos))
            target = new_target_dir(Path(dest_root), name or zip_path.stem)
            try:
                extract_members(zf, infos, target)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
    except DatasetError:
        raise
    except zipfile.BadZipFile as e:
        raise DatasetError(f"{zip_path.name} is a damaged zip file ({first_line(e)})") from None
    except MemoryError:
        raise DatasetError(f"{zip_path.name} could not be read: out of memory") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DatasetError(f"not enough disk space to extract {zip_path.name}") from None
        raise DatasetError(f"could not extract {zip_path.name}: {e.strerror or first_line(e)}"
                           f"{' (' + os.path.basename(str(e.filename)) + ')' if e.filename else ''}") from None
    except Exception as e:  # zlib.error, EOFError, NotImplementedError (compression method), struct.error, ...
        raise DatasetError(f"{zip_path.name} is a damaged or unsupported zip file ({first_line(e)})") from None
    return target / root if root else target


def _chunks(path: Path):
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for chunk in _chunks(path):
        h.update(chunk)
    return h.hexdigest()


def reuse_or_extract(zip_path, dest_root, name: str | None = None) -> tuple[Path, bool]:
    """(dataset root, reused): the same zip uploaded again gets its earlier
    extraction while that still holds exactly the zip's files, else a new one
    (extract_dataset_zip, whose errors it raises)."""
    zip_path, base = Path(zip_path), Path(dest_root)
    digest = file_sha256(zip_path) if zip_path.is_file() else None
    earlier = earlier_extraction(zip_path, base, digest) if digest else None
    if earlier is not None:
        return earlier, True
    root = extract_dataset_zip(zip_path, base, name)
    folder = base / root.relative_to(base).parts[0]
    try:
        (base / (folder.name + SOURCE_SUFFIX)).write_text(digest + "\n")
    except OSError:  # only reuse is lost
        pass
    return root, False


def earlier_extraction(zip_path: Path, base: Path, digest: str) -> Path | None:
    """The dataset root of an earlier extraction of this zip (same SHA-256) whose
    files are still exactly the zip's: names, sizes and CRC-32s (a folder the
    user changed since is not passed off as the zip's contents)."""
    for marker in sorted(base.glob("*" + SOURCE_SUFFIX)) if base.is_dir() else []:
        try:
            if marker.read_text().strip() != digest:
                continue
            folder = base / marker.name[:-len(SOURCE_SUFFIX)]
            with zipfile.ZipFile(zip_path) as zf:
                infos = [i for i in zf.infolist() if not i.is_dir()]
            expected = {member_name(i): (i.file_size, i.CRC) for i in infos}
            files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
            if files.keys() != expected.keys() or any(p.stat().st_size != expected[n][0] for n, p in files.items()):
                continue
            if all(file_crc32(p) == expected[n][1] for n, p in files.items()):
                root = dataset_root_in(list(expected))
                return folder / root if root else folder
        except (OSError, ValueError, UnicodeDecodeError, zipfile.BadZipFile, DatasetError):
            continue
    return None


def file_crc32(path: Path) -> int:
    crc = 0
    for chunk in _chunks(path):
        crc = zlib.crc32(chunk, crc)
    return crc


def check_disk_room(base: Path, needed: int) -> None:
    """Refuse an extraction that would leave less than DISK_RESERVE free where it lands."""
    where = next(p for p in (base, *base.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if needed > free - DISK_RESERVE:
        raise DatasetError(f"the zip expands to {_size(needed)}, and the server's disk has {_size(free)} free, of "
                           f"which {_size(DISK_RESERVE)} stays for saving checkpoints; free some space first")


def new_target_dir(base: Path, name: str) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40] or "dataset"
    target = new_folder(base, f"{stem}_{datetime.now():%Y%m%d_%H%M%S_%f}")
    if target is None:
        raise DatasetError(f"could not create a new folder under {base}")
    return target


def extract_members(zf: zipfile.ZipFile, infos, target: Path) -> None:
    """Write each regular file with a hard byte cap, so a lying header cannot
    write more than it declared."""
    real_target = os.path.realpath(target)
    for info in infos:
        if info.is_dir():
            continue
        out = Path(os.path.realpath(target / member_name(info)))
        if os.path.commonpath([real_target, str(out)]) != real_target or str(out) == real_target:
            raise DatasetError(f"the zip entry {info.filename!r} would be written outside its folder; refused")
        out.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with zf.open(info) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > info.file_size:
                    raise DatasetError(f"entry {info.filename!r} is larger than its header says; refused")
                dst.write(chunk)


def _size(n: int) -> str:
    return f"{n / 2**30:.0f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n:,} bytes"


