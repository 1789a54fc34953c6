"""Turn any image file a user might have into a proper RGB PIL image, or raise
ImageLoadError with a one-line reason. Used by training, prediction and the app."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageLoadError, first_line

# torchvision's ImageFolder extensions
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Pillow warns above this and errors above twice this; we make both an error.
MAX_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Pillow reports a damaged EXIF block as a UserWarning on stderr; the pixels are
# fine and the EXIF is then ignored (no rotation), so keep CLI output clean.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")


def is_image_name(path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(source, min_side: int | None = None) -> Image.Image:
    """Open a path, file object or PIL image and return a fully decoded RGB image.

    min_side: the caller will shrink the image to this shorter side anyway, so a
    JPEG at least twice that size may be decoded at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling, never below min_side): a 12 MP phone photo decodes
    ~10x faster, and every path that feeds the model uses the same rule.

    EXIF orientation is applied (phone photos), animated images give their first
    frame, transparency is composited on white, 16-bit and float images are
    scaled to 8 bits instead of being clipped. Anything else goes wrong ->
    ImageLoadError with a one-line reason; no other exception escapes."""
    name = _display_name(source)
    try:
        if isinstance(source, (str, Path)):
            p = Path(source)
            if p.is_dir():
                raise ImageLoadError(name, "is a folder, not an image file")
            if p.exists() and not p.is_file():
                raise ImageLoadError(name, "is not a regular file (device, pipe or socket)")
            if p.is_file() and p.stat().st_size == 0:
                raise ImageLoadError(name, "empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow warns between MAX_PIXELS and 2x; the explicit size check
            # below is the real guard (warning filters are not thread-safe).
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
            if isinstance(source, Image.Image):
                return to_rgb(_apply_exif_orientation(source))
            with Image.open(source) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise Image.DecompressionBombError(f"{w}x{h}")
                if w < 1 or h < 1:
                    raise ImageLoadError(name, f"image has no pixels ({w}x{h})")
                img.seek(0)
                if min_side and img.format == "JPEG" and min(w, h) >= 2 * min_side:
                    img.draft(img.mode, (min_side, min_side))
                img.load()
                return to_rgb(_apply_exif_orientation(img))
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError(name, f"image is too large (over {MAX_PIXELS:,} pixels; decompression-bomb limit)") from None
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


_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Like ImageOps.exif_transpose, but a malformed EXIF block means 'no
    rotation' instead of an exception (the pixels are still fine)."""
    try:
        exif = img.getexif()
        method = _ORIENTATION_TRANSPOSE.get(int(exif.get(0x0112, 1)))
    except Exception:
        return img
    if method is None:
        return img
    out = img.transpose(method)
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


