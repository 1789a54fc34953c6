"""What the Predict tab shows of core.predict's results: the checkpoint's
description, the batch table, gallery and CSV."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from PIL import Image

from core.errors import CheckpointError, ImageLoadError, UserError
from core.evaluate import is_unsure
from core.images import load_rgb
from core.metrics import per_class, per_class_summary
from core.predict import Prediction, Predictor, list_images

from .context import served_folder
from .text import md_text

NO_CHECKPOINT = ("No checkpoint selected yet: train a model in the Train tab (its best_acc.pt then appears in the "
                 "list; press ↻ to refresh), or upload a checkpoint file (.pt / .pth).")
GALLERY_LIMIT = 60


def choose_checkpoint(selected: str | None, uploaded: str | None) -> str:
    """An uploaded file wins over the dropdown. Raises CheckpointError when neither is set,
    or when the upload's copy is gone (the app removes them after a day: ui.CACHE_CLEANUP)."""
    path = uploaded or (selected or "").strip()
    if not path:
        raise CheckpointError(NO_CHECKPOINT)
    if uploaded and not Path(uploaded).is_file():
        raise CheckpointError(f"the uploaded checkpoint {Path(uploaded).name} is no longer on the server (uploads "
                              f"are kept for a day): upload it again")
    return path


def describe(pred: Predictor, path: str) -> str:
    i = pred.info
    bits = [f"**{md_text(Path(path).name)}** · {md_text(i.get('format', '?'))}"]
    if i.get("arch"):
        bits.append(md_text(i["arch"]))
    if i.get("epoch"):
        bits.append(f"epoch {md_text(i['epoch'])}")
    if isinstance(i.get("best_val_acc"), (int, float)) and math.isfinite(i["best_val_acc"]) and i.get("best_epoch"):
        bits.append(f"best val_acc {float(i['best_val_acc']):.3f} (epoch {md_text(i['best_epoch'])})")
    unnamed = i.get("format") != "checkpoint dict" and all(c == f"class_{n}" for n, c in enumerate(pred.class_names))
    note = " (this file stores no class names: they are numbered)" if unnamed else ""
    rows = per_class(i.get("val_confusion"), pred.class_names)
    by_class = f"<br>val by class at epoch {md_text(i['epoch'])}: {md_text(per_class_summary(rows))}" if rows else ""
    return " · ".join(bits) + f"<br>classes: {md_text(', '.join(map(str, pred.class_names)))}{note}{by_class}"


def batch_paths(files: list[str] | None, folder: str | None) -> list[str]:
    paths = [str(f) for f in (files or [])]
    folder = (folder or "").strip()
    if folder:
        p = Path(folder).expanduser()
        if p.is_file():
            raise UserError(f"{p} is a file; give the folder that holds the images (or upload the file above)")
        if not p.is_dir():
            raise UserError(f"folder {p} does not exist (give a folder of images on the machine running the app)")
        found = list_images(p)
        if not found:
            raise UserError(f"no images (jpg, png, gif, bmp, tif, webp) found under {p}")
        paths += found
    if not paths:
        raise UserError("add some images first: upload files, or type the path of a folder of images")
    return paths


def display_name(path: str, folder: str | None, uploads: dict[str, str]) -> str:
    if path in uploads:
        return uploads[path]
    if folder:
        try:
            return str(Path(path).relative_to(Path(folder).expanduser()))
        except ValueError:
            pass
    return Path(path).name


def answer(p: Prediction, min_conf: float | None) -> str:
    """The top-1 label, or 'unsure (best guess: X)' below the minimum confidence (core.evaluate.is_unsure)."""
    return f"unsure (best guess: {p.label})" if is_unsure(p.p, min_conf) else p.label


def table_rows(preds: list[Prediction], names: list[str], labels: list[str | None],
               min_conf: float | None = None) -> list[list]:
    """One row per image; `check` compares the prediction with the class its
    folder is named after (core.metrics.folder_labels), blank without one."""
    rows = []
    for p, name, y in zip(preds, names, labels):
        if p.error:
            rows.append([name, "—", None, "", p.error, ""])
        else:
            check = "" if y is None else "✓" if p.label == y else f"✗ folder: {y}"
            rows.append([name, answer(p, min_conf), p.p, ", ".join(f"{lab} {pr:.3f}" for lab, pr in p.topk), "",
                         check])
    return rows


def folder_check_summary(check: tuple[int, int, list[int]], preds: list[Prediction], names: list[str],
                         shown: int = 5) -> str:
    """' · against the folder names: **30/32** right; wrong: a.jpg → fish, ...'
    or '', from core.metrics.folder_check's result."""
    right, checked, wrong = check
    if not checked:
        return ""
    text = f" · against the folder names: **{right}/{checked}** right"
    if wrong:
        text += "; wrong: " + ", ".join(f"{md_text(names[i])} → {md_text(preds[i].label)}" for i in wrong[:shown])
        text += f" and {len(wrong) - shown} more (see the check column)" if len(wrong) > shown else ""
    return text


def write_csv(preds: list[Prediction], names: list[str], labels: list[str | None],
              min_conf: float | None = None) -> str:
    """CSV in a new folder of Gradio's cache;
    folder_class: the class the image's folder is named after, if any; with a
    minimum confidence an `unsure` column (1 below it), as predict.py writes."""
    out = served_folder("tl_predictions_") / "predictions.csv"
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "path", "top1", "p", "topk", "error", "folder_class"] + (["unsure"] if min_conf else []))
        for p, name, y in zip(preds, names, labels):
            unsure = [int(is_unsure(p.p, min_conf)) if not p.error else ""] if min_conf else []
            w.writerow([name, p.path, p.label or "", f"{p.p:.6f}" if p.p is not None else "",
                        "; ".join(f"{lab}:{pr:.6f}" for lab, pr in p.topk), p.error or "", y or ""] + unsure)
    return str(out)


def thumbnail(path: str, size: int = 256) -> Image.Image | None:
    try:
        img = load_rgb(path)
    except ImageLoadError:
        return None
    img.thumbnail((size, size))
    return img


def gallery_entries(preds: list[Prediction], names: list[str], labels: list[str | None],
                    wrong: list[int], min_conf: float | None = None) -> tuple[list[tuple[Image.Image, str]], list[str]]:
    """(thumbnail, caption) for readable images; thumbnails, so any folder works.
    The `wrong` ones (core.metrics.folder_check) come first, marked ✗. Also the
    images' paths in the gallery's order (a click on the gallery names an index)."""
    first = set(wrong)
    order = list(wrong) + [i for i in range(len(preds)) if i not in first]
    out, paths = [], []
    for i in order:
        p, name = preds[i], names[i]
        if p.error or len(out) >= GALLERY_LIMIT:
            continue
        thumb = thumbnail(p.path)
        if thumb is not None:
            mark = f"✗ (folder: {labels[i]}) " if i in first else ""
            out.append((thumb, f"{mark}{answer(p, min_conf)} {p.p:.0%} · {name}"))
            paths.append(p.path)
    return out, paths
