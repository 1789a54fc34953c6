"""Turn any image file a user might have into a proper RGB PIL image, or raise
ImageLoadError with a one-line reason. Used by training, prediction and the app."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError

# torchvision's ImageFolder extensions
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Pillow warns above this and errors above twice this; we make both an error.
MAX_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def is_image_name(path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(source) -> Image.Image:
    """Open a path, file object or PIL image and return a fully decoded RGB image.

    EXIF orientation is applied (phone photos), animated images give their first
    frame, transparency is composited on white, 16-bit and float images are
    scaled to 8 bits instead of being clipped."""
    name = getattr(source, "name", source) if not isinstance(source, Image.Image) else "<image>"
    try:
        if isinstance(source, Image.Image):
            img = source
        else:
            if isinstance(source, (str, Path)) and Path(source).is_file() and Path(source).stat().st_size == 0:
                raise ImageLoadError(name, "empty file (0 bytes)")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(source)
                img.seek(0)
                img.load()
        img = ImageOps.exif_transpose(img) or img
        return to_rgb(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError(name, f"image is too large (over {MAX_PIXELS:,} pixels; decompression-bomb limit)") from None
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not a supported image (JPEG, PNG, GIF, BMP, TIFF, WebP)") from None
    except FileNotFoundError:
        raise ImageLoadError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(name, "is a folder, not an image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated/corrupt data as OSError or SyntaxError.
        raise ImageLoadError(name, f"cannot decode image ({_short(e)})") from None


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


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:160]
