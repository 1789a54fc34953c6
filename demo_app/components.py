"""Small component tweaks."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image, UnidentifiedImageError


class NotAnImage(str):
    """What SafeImage hands a handler for an upload that is no image: the
    message. The handler decides how to show it (raising here, before any
    handler ran, left the last answer on screen and toasted once per event)."""


class SafeImage(gr.Image):
    """gr.Image whose upload of a non-image (possible over the API, or a renamed
    file) gives a clear message instead of Pillow's bare exception."""

    is_template = True  # same frontend as gr.Image

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
            name = Path(getattr(payload, "orig_name", None) or getattr(payload, "path", None) or "the file").name
            reason = "not an image file" if isinstance(e, UnidentifiedImageError) else f"cannot decode image ({e})"
            return NotAnImage(f"{name}: {reason}. Upload a JPEG, PNG, GIF, BMP, TIFF or WebP image.")
