"""Small component tweaks."""
from __future__ import annotations

import html
from pathlib import Path

import gradio as gr
from PIL import UnidentifiedImageError

from gradio.events import Dependency

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
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component