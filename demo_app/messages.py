"""How the app says what went wrong: core's errors in the app's own words
(its field labels, not the CLI's flags), as a pop-up (gr.Error) or in place
of the output they replace (Markdown)."""
from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Mapping
from pathlib import Path

import gradio as gr

from core.errors import UserError, render

from .text import html_text, md_block, md_text

# Each setting in the app's words: core's texts name settings by placeholder
# ({setting}, {setting:FIELD}, {choice:FIELD=VALUE}; core/errors.py).
FIELD_LABELS = {
    "data_dir": "'Dataset folder'", "arch": "'Architecture'", "weights": "'Pretrained weights'",
    "policy": "'Freeze policy'", "epochs": "'Epochs'", "batch_size": "'Batch size'", "lr": "'Learning rate'",
    "weight_decay": "'Weight decay'", "dropout": "'Head dropout'", "augment": "'Augmentation'", "seed": "'Seed'",
    "device": "'Device (Advanced)'", "amp": "'Mixed precision (Advanced)'",
    "val_split": "'Validation fraction (Advanced)'", "run_name": "'Run name'",
    "output_dir": "the checkpoints folder (app.py --checkpoints-dir)", "checkpoint": "'Checkpoint'",
    "trust_pickle": "'Trust pickle'", "classes": "'Classes'", "image": "the image", "resume": "resuming",
    "data": "'Labelled folder'", "min_confidence": "'Min confidence'",
    "cam": "Grad-CAM", "cam_class": "'CAM for class'", "dataset": "the dataset", "dataset_name": "the dataset name",
    "class_name": "the class name", "split": "the split (train or val)",
}
# A choice whose widget shows it under its own label; any other reads "'Label' = value".
CHOICE_LABELS = {("weights", "none"): "None (random init)", ("weights", "imagenet"): "ImageNet (torchvision)",
                 ("weights", "PATH.pth"): "Local file", ("amp", "1"): "ticked", ("trust_pickle", "1"): "ticked"}


class _Choices(Mapping):
    """Every (field, value) worded for the app (core.errors.render's `choices`)."""

    def __getitem__(self, key: tuple[str, str]) -> str:
        field, value = key
        return f"{FIELD_LABELS.get(field, field)} = {CHOICE_LABELS.get(key, value)}"

    def __iter__(self):
        return iter(CHOICE_LABELS)

    def __len__(self) -> int:
        return len(CHOICE_LABELS)


CHOICES = _Choices()


def say(message, field: str | None = None, choices: Mapping[tuple[str, str], str] | None = None) -> str:
    """A core error, warning or note in the app's words; `choices` overrides some of CHOICES."""
    choices = ChainMap(choices, CHOICES) if choices else CHOICES
    return message.render(FIELD_LABELS, choices) if isinstance(message, UserError) else \
        render(str(message), FIELD_LABELS, choices, field)


def upload_named(e: UserError, path: str) -> UserError:
    """`e` with an uploaded file's Gradio temp path (/tmp/gradio/<hash>/name) shown as its
    file name: only that one path, which the app handed to core, is replaced."""
    if str(path) in e.message:
        e.message = e.message.replace(str(path), Path(path).name)
        e.args = (e.message,)
    return e


def user_error(e: Exception | str, title: str = "Error") -> gr.Error:
    """gr.Error renders HTML: escaped (the message can quote file names). The
    plain text rides along for pages that show it as Markdown (shown_error)."""
    text = say(e)
    err = gr.Error(html_text(text), title=title, print_exception=False)
    err.text = text
    return err


def error_markdown(title: str, message, mark: str = "✗") -> str:
    first, *rest = say(message).split("\n")
    out = f"{mark} **{title}:** {md_text(first)}"
    if rest:
        out += "\n" + md_block([r.rstrip() for r in rest])
    return out


def shown_error(e: gr.Error) -> str:
    """A raised gr.Error as the page shows it, in place of the output it replaces."""
    return error_markdown(e.title, getattr(e, "text", e.message), "⚠")


def os_error_text(e: OSError) -> str:
    """An environment problem (full disk, unreadable file) in the words the CLI uses: reason and file."""
    return f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"


def whole_number(value, field: str) -> int:
    """A number box's value as a whole number; `field`: the setting it is."""
    f = number(value, field, "a whole number")
    if not math.isfinite(f) or f != int(f):
        raise UserError(f"{{setting}} must be a whole number (got {value})", field=field, value=value)
    return int(f)


def number(value, field: str, kind: str = "a number") -> float:
    if value is None or str(value).strip() == "":
        raise UserError(f"{{setting}} is empty: enter {kind}", field=field, value=value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{{setting}} must be {kind} (got {value!r})", field=field, value=value) from None
