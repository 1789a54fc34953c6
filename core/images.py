"""Turn any image file a user might have into a proper RGB PIL image, or raise
ImageLoadError with a one-line reason. Used by training, prediction and the app."""
from __future__ import annotations

import os
import re
import stat
import threading
import warnings
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from .device import machine_memory_bytes
from .errors import ImageLoadError, first_line

# torchvision's ImageFolder extensions
IMAGE_EXTENSIONS = IMG_EXTENSIONS + (".gif",)  # torchvision's ImageFolder list, and GIFs (Pillow reads them)
# Pillow warns above this and errors above twice this; we make both an error.
MAX_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Pillow reports a damaged EXIF block as a UserWarning on stderr; the pixels are
# fine and the EXIF is then ignored (no rotation), so keep CLI output clean.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")

# Bytes one decoded pixel can take while an image is in hand: Pillow keeps RGB
# as 4 bytes, a conversion or the caller's tensor copy and resize add about as
# much again twice (RGBA composited on white takes as much on its own).
BYTES_IN_FLIGHT = 12
# Past this many decoded pixels an image meant for a small input is first
# box-reduced by an integer factor (Image.reduce: fast, little memory), so a
# 9400x9400 PNG never reaches a full-size copy or resize. Below it (all usual
# photos and screenshots), images are decoded exactly as before.
REDUCE_ABOVE_PIXELS = 4096 * 4096


# Pillow allocates an image in 16 MB blocks. After the first free, glibc serves
# blocks that size from per-thread heaps that keep freed memory, so each decode
# thread would hold on to its largest image (4 threads x 88 MP: +1 GB). Blocks
# over glibc's 32 MB mmap limit go back to the system when freed.
if "PILLOW_BLOCK_SIZE" not in os.environ:
    Image.core.set_block_size(64 * 2**20)


def max_image_pixels() -> int:
    """The largest image decoded here: Pillow's decompression-bomb limit, or less
    where memory is small (one image's decode must fit in a quarter of it)."""
    return min(MAX_PIXELS, machine_memory_bytes() // (4 * BYTES_IN_FLIGHT))


class DecodeBudget:
    """A weighted semaphore over the bytes of images being decoded, shared by
    every thread of the process (training's decode pool, prediction, the app's
    requests): threads x the largest image cannot add up past `capacity`. An
    image larger than the whole budget waits until it can run alone. First come,
    first served, so a large image is not overtaken forever by small ones."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._cond = threading.Condition()
        self._queue: deque = deque()

    @contextmanager
    def hold(self, nbytes: int):
        n = max(1, min(int(nbytes), self.capacity))
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            while self._queue[0] is not ticket or self.used + n > self.capacity:
                self._cond.wait()
            self._queue.popleft()
            self.used += n
            self._cond.notify_all()  # the next in line may fit beside this one
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


# One largest-possible image in flight at a time, at most an eighth of memory.
DECODE_BUDGET = DecodeBudget(min(max_image_pixels() * BYTES_IN_FLIGHT, machine_memory_bytes() // 8))


def is_image_name(path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(source, min_side: int | None = None, finish=None):
    """Open a path, file object or PIL image and return a fully decoded RGB image.

    min_side: the caller will shrink the image to this shorter side anyway, so a
    JPEG at least twice that size may be decoded at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling, never below min_side): a 12 MP phone photo decodes
    ~10x faster, and every path that feeds the model uses the same rule. An
    image of more than REDUCE_ABOVE_PIXELS is box-reduced to a short side of
    2-4x min_side right after decoding.

    finish: applied to the RGB image while its decode is still counted in
    DECODE_BUDGET (e.g. the tensor copy and resize); its result is returned.

    A path that is not a regular file (a named pipe would block the reader) is
    refused without being read. EXIF orientation is applied (phone photos),
    animated images give their first frame, transparency is composited on white,
    16-bit and float images are scaled to 8 bits instead of being clipped.
    Anything else goes wrong -> ImageLoadError with a one-line reason; no other
    exception escapes."""
    name = _display_name(source)
    finish = finish or (lambda img: img)
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and 2x it: the explicit size check in
            # _decode is the guard (and names the size); warning filters are
            # process-wide and not thread-safe, so nothing may depend on them.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
            if isinstance(source, Image.Image):
                return finish(to_rgb(_apply_exif_orientation(source)))
            if isinstance(source, (str, Path)):
                with _open_regular_file(Path(source), name) as f:
                    return _decode(f, name, min_side, finish)
            return _decode(source, name, min_side, finish)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(pixels.group(1)) / 1e6:,.1f} megapixels" if pixels else "too many pixels"
        raise ImageLoadError(name, too_large(size)) from None
    except UnidentifiedImageError:
        raise ImageLoadError(name, _unidentified_reason(source)) from None
    except FileNotFoundError:
        raise ImageLoadError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(name, "is a folder, not an image file") from None
    except PermissionError:
        raise ImageLoadError(name, "permission denied (cannot read the file)") from None
    except MemoryError:
        raise ImageLoadError(name, "not enough memory to decode this image") from None
    except Exception as e:
        # Decoders fed hostile bytes raise OSError, SyntaxError, ValueError,
        # EOFError, struct.error, IndexError, ...: all mean "cannot decode".
        raise ImageLoadError(name, f"cannot decode image ({first_line(e, 160)})") from None


def too_large(size: str) -> str:
    limit = max_image_pixels()
    why = "a decompression-bomb guard" + (", lowered to fit this machine's memory" if limit < MAX_PIXELS else "")
    return f"image is too large ({size}; the limit here is {limit / 1e6:,.1f} megapixels, {why})"


def _open_regular_file(p: Path, name: str):
    """The file opened for reading, after checking (on the open descriptor, so
    nothing can be swapped in between) that it is a non-empty regular file.
    O_NONBLOCK: opening a named pipe must not wait for a writer."""
    if p.is_dir():
        raise ImageLoadError(name, "is a folder, not an image file")
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageLoadError(name, "is a folder, not an image file")
        if not stat.S_ISREG(st.st_mode):
            raise ImageLoadError(name, "is not a regular file (device, pipe or socket)")
        if st.st_size == 0:
            raise ImageLoadError(name, "empty file (0 bytes)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _decode(source, name: str, min_side: int | None, finish):
    with Image.open(source) as img:
        w, h = img.size
        if w < 1 or h < 1:
            raise ImageLoadError(name, f"image has no pixels ({w}x{h})")
        if w * h > max_image_pixels():
            raise ImageLoadError(name, too_large(f"{w}x{h} = {w * h / 1e6:,.1f} megapixels"))
        img.seek(0)
        if min_side and img.format == "JPEG" and min(w, h) >= 2 * min_side:
            img.draft(img.mode, (min_side, min_side))
        dw, dh = img.size  # as decoded (after draft)
        with DECODE_BUDGET.hold(dw * dh * BYTES_IN_FLIGHT):
            img.load()
            rgb = _reduced_rgb(img, min_side)
            if rgb is not img:
                img.close()  # frees the full-size pixels before `finish` makes its copies
            return finish(rgb)


def _reduced_rgb(img: Image.Image, min_side: int | None) -> Image.Image:
    """to_rgb of the EXIF-upright image; one of more than REDUCE_ABOVE_PIXELS
    box-reduced first by the largest integer factor keeping its short side
    >= 2 x min_side (the resize that follows then still antialiases)."""
    w, h = img.size
    k = min(w, h) // (2 * min_side) if min_side and w * h > REDUCE_ABOVE_PIXELS else 1
    if k < 2:
        return to_rgb(_apply_exif_orientation(img))
    try:
        small = img.reduce(k)
    except ValueError:  # a mode Pillow cannot average (palette, 1-bit): convert first
        small = to_rgb(img).reduce(k)
    return to_rgb(_apply_exif_orientation(img, small))


_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _apply_exif_orientation(img: Image.Image, pixels: Image.Image | None = None) -> Image.Image:
    """Like ImageOps.exif_transpose, but a malformed EXIF block means 'no
    rotation' instead of an exception (the pixels are still fine). `pixels`:
    what to turn by img's EXIF (a reduced copy of img); img itself by default."""
    pixels = img if pixels is None else pixels
    try:
        exif = img.getexif()
        method = _ORIENTATION_TRANSPOSE.get(int(exif.get(0x0112, 1)))
    except Exception:
        return pixels
    if method is None:
        return pixels
    out = pixels.transpose(method)
    # Drop the tag, as ImageOps.exif_transpose does, so loading the result again
    # (prediction re-checks PIL inputs) does not rotate it a second time.
    del exif[0x0112]
    try:
        out.info["exif"] = exif.tobytes()
    except Exception:
        out.info.pop("exif", None)
    out.getexif().pop(0x0112, None)
    return out


def _display_name(source) -> str:
    if isinstance(source, Image.Image):
        return "<image>"
    if isinstance(source, (str, Path)):
        return str(source)
    name = getattr(source, "name", None)
    return str(name) if isinstance(name, (str, Path)) else "<uploaded image>"


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"RIFF", "WebP"))


def _unidentified_reason(source) -> str:
    head = b""
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as f:
                head = f.read(512)
        elif hasattr(source, "seek") and hasattr(source, "read"):
            source.seek(0)
            head = source.read(512)
    except Exception:
        pass
    if not isinstance(head, bytes):
        head = b""
    if not head and not isinstance(source, (str, Path)):
        return "empty file (0 bytes)"
    low = head.lstrip().lower()
    if low.startswith((b"<svg", b"<?xml")) and b"<svg" in low:
        return "SVG (vector) images are not supported; convert it to PNG or JPEG"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIC/AVIF images are not supported; convert it to JPEG or PNG"
    for magic, fmt in _MAGIC:
        if head.startswith(magic) and (fmt != "WebP" or head[8:12] == b"WEBP"):
            return f"damaged or truncated {fmt} file (its header cannot be read)"
    return "not a supported image (JPEG, PNG, GIF, BMP, TIFF, WebP)"


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _high_depth_to_rgb(img)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0  # full 16-bit range onto 0..255
    else:
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    gray = Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8), mode="L")
    return gray.convert("RGB")


