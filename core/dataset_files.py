"""The file-level rules of datasets made in the app (core.dataset_store): what
a dataset or class name may be, what an added image must be (decodable, not
too big, a format training reads), and how a new file appears (whole or not
at all). Kept apart from the store so the store reads as the operations."""
from __future__ import annotations

import hashlib
import io
import os
import re
import unicodedata
from pathlib import Path

from PIL import Image

from .errors import ImageLoadError, UserError
from .images import IMAGE_EXTENSIONS, load_rgb

MAX_NAME_CHARS = 64
# One image as large as the app accepts any upload (demo_app/ui.py MAX_FILE_SIZE, 200 MB).
MAX_IMAGE_BYTES = 200 * 2**20
# The saved file's extension comes from the decoded format, never from the upload's name.
FORMAT_EXT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp",
              "PPM": ".ppm"}
_WINDOWS_FORBIDDEN = set('<>:"/\\|?*')
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def name_key(name: str) -> str:
    """What makes two names the same folder somewhere: Unicode form and case."""
    return unicodedata.normalize("NFC", name).casefold()


def check_name(raw, field: str, what: str) -> str:
    """The name as it will be stored and shown (outer spaces trimmed, NFC), or a UserError saying the rule."""
    name = unicodedata.normalize("NFC", raw if isinstance(raw, str) else "").strip()
    allowed = (f"letters, digits, spaces and punctuation except / \\ < > : \" | ? *; at most {MAX_NAME_CHARS} "
               f"characters")

    def refuse(why: str):
        raise UserError(f"{what} {raw!r} {why} (allowed: {allowed})" if name else f"{{setting}} is empty: "
                        f"type a {what} ({allowed})", field=field, value=raw, allowed=allowed)

    if not name:
        refuse("is empty")
    if name in (".", ".."):
        refuse("is a folder reference, not a name")
    bad = sorted({c for c in name if c in _WINDOWS_FORBIDDEN or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")})
    if bad:
        refuse("contains " + ", ".join(repr(c) for c in bad))
    if name.startswith("."):
        refuse("starts with '.': such folders are hidden and never used as classes")
    if name.endswith("."):
        refuse("ends with '.', which Windows drops from folder names")
    if len(name) > MAX_NAME_CHARS or len(name.encode()) > 255:
        refuse(f"is {len(name)} characters long")
    if name.split(".")[0].strip().casefold() in _WINDOWS_DEVICES:
        refuse("is a reserved device name on Windows")
    return name


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str | None:
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in _DIGESTS:
            if len(_DIGESTS) > 200_000:
                _DIGESTS.clear()
            _DIGESTS[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        return _DIGESTS[key]
    except OSError:
        return None


def read_image_bytes(source, shown: str) -> tuple[bytes, str]:
    """(the image's bytes, the extension of its real format) from a path or bytes (a webcam frame);
    ImageLoadError naming `shown` otherwise."""
    if isinstance(source, (bytes, bytearray)):
        size = len(source)
    else:
        try:
            size = os.stat(source).st_size
        except OSError:
            raise ImageLoadError(shown, "file not found or unreadable") from None
    if size > MAX_IMAGE_BYTES:
        raise ImageLoadError(shown, f"is {size / 2**20:,.1f} MB; one image may be at most "
                                    f"{MAX_IMAGE_BYTES // 2**20} MB")
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        if not data:
            raise ImageLoadError(shown, "empty file (0 bytes)")
        opened = lambda: io.BytesIO(data)  # noqa: E731
    else:
        data, opened = None, lambda: str(source)  # noqa: E731
    try:
        load_rgb(opened(), min_side=256)  # the decode checks training applies (regular file, pixels, damage)
        with Image.open(opened()) as im:  # the format as decoded, not as named
            fmt = im.format or ""
    except ImageLoadError as e:
        raise ImageLoadError(shown, e.reason) from None
    except Exception as e:
        raise ImageLoadError(shown, f"cannot decode image ({e})") from None
    ext = FORMAT_EXT.get(fmt)
    if ext is None or not ext.endswith(IMAGE_EXTENSIONS):
        raise ImageLoadError(shown, f"{fmt or 'these'} images cannot be used for training "
                                    f"(use JPEG, PNG, GIF, BMP, TIFF or WebP)")
    if data is None:
        with open(source, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageLoadError(shown, f"is over {MAX_IMAGE_BYTES // 2**20} MB")
    return data, ext


def safe_stem(name: str) -> str:
    """A file-name stem made of ASCII letters, digits, '-' and '_' from the shown name (else 'image')."""
    stem = Path(unicodedata.normalize("NFKD", str(name))).stem
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem.encode("ascii", "ignore").decode()).strip("_-")[:40]
    return stem or "image"


def write_new(target: Path, data: bytes) -> None:
    """`data` as a new file at `target`, whole or not at all: a hidden temp file (the scan skips
    names starting with '.') renamed into place once its bytes are on disk."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
