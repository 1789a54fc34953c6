"""How the app says what went wrong: core's errors in the app's own words
(its field labels, not the CLI's flags), as a pop-up (gr.Error) or in place
of the output they replace (Markdown)."""
from __future__ import annotations

import math
import re
import tempfile
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


def say(message, field: str | None = None) -> str:
    """A core error, warning or note in the app's words."""
    text = message.render(FIELD_LABELS, CHOICES) if isinstance(message, UserError) else \
        render(str(message), FIELD_LABELS, CHOICES, field)
    return for_the_app(text)


# Until every core message names its settings by placeholder (issue 16, CORE helper's
# part), those still naming a CLI flag are reworded here; to be deleted then.
FIELD_NAMES = {"--epochs": "Epochs", "--batch-size": "Batch size", "--lr": "Learning rate",
               "--weight-decay": "Weight decay", "--dropout": "Head dropout", "--run-name": "Run name",
               "--val-split": "Validation fraction (Advanced)", "--data-dir": "Dataset folder",
               "--arch": "Architecture", "--augment": "Augmentation", "--seed": "Seed",
               "--device": "Device (Advanced)", "--weights": "Pretrained weights", "--policy": "Freeze policy"}
# (not inside a word or right after a quote: a class folder named '--lr 3' stays as it is)
_FLAG_RE = re.compile(r"(?<![\w'/-])(?:" + "|".join(re.escape(f) for f in FIELD_NAMES) + r")(?![\w-])")
_UPLOAD_DIR_RE = re.compile(re.escape(str(Path(tempfile.gettempdir()) / "gradio")) + r"/[0-9a-f]+/")
_PASS_FLAG_RE = re.compile(r"\bpass (?:its parent, )?(--[\w-]+) (\S+?)(?=[,;.]?(?:\s|$))")  # "pass --val-split 0.2"
# "--val-split 0.5 ignored", "--weights none": a flag and its value -> "'Field' = value"
_KEYWORDS = r"none|imagenet|auto|cpu|cuda|mps|head|last|full|light|standard|resnet18|mobilenet_v2"
_FLAG_VALUE_RE = re.compile(r"(?<![\w'/-])(--[\w-]+) ((?:[\d./~]|(?:" + _KEYWORDS + r")\b|PATH)\S*?)(?=[,;:)]?(?:\s|$))")
_PASS_BARE_FLAG_RE = re.compile(r"\bpass (--[\w-]+)(?=[,;.)]|$)")  # "pass --arch" -> "set 'Architecture'"
_PICKLE_HINT = "predict.py --trust-pickle 1 (in the app: tick 'trust pickle')"
TRUST_HINT = "tick 'Trust pickle'"
_WEIGHTS_CHOICES = {"none": "None (random init)", "imagenet": "ImageNet (torchvision)", "PATH.pth": "Local file"}


def _value_for_the_app(flag: str, value: str) -> str:
    return _WEIGHTS_CHOICES.get(value, value) if flag == "--weights" else value


def for_the_app(message) -> str:
    """A core/CLI message worded for the app: field names (and the app's
    choices) for flags and their values, an uploaded file by its name rather
    than Gradio's temp path."""
    text = _PASS_FLAG_RE.sub(lambda m: f"set {m.group(1)} to {_value_for_the_app(m.group(1), m.group(2))}"
                             if m.group(1) in FIELD_NAMES else m.group(0), str(message))
    text = _FLAG_VALUE_RE.sub(lambda m: f"{m.group(1)} = {_value_for_the_app(m.group(1), m.group(2))}"
                              if m.group(1) in FIELD_NAMES else m.group(0), text)
    text = _PASS_BARE_FLAG_RE.sub(lambda m: f"set {m.group(1)}" if m.group(1) in FIELD_NAMES else m.group(0), text)
    text = text.replace(_PICKLE_HINT, TRUST_HINT)
    return _UPLOAD_DIR_RE.sub("", _FLAG_RE.sub(lambda m: f"'{FIELD_NAMES[m.group(0)]}'", text))


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
