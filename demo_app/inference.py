"""Prediction helpers of the Predict tab, around core.predict."""
from __future__ import annotations

import csv
import logging
import math
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from core.errors import CheckpointError, ImageLoadError, UserError, first_line
from core.images import load_rgb
from core.metrics import per_class, per_class_summary
from core.predict import Prediction, Predictor, cached_predictor, list_images

from .text import md_text

log = logging.getLogger("demo_app")

NO_CHECKPOINT = ("No checkpoint selected yet: train a model in the Train tab (its best_acc.pt then appears in the "
                 "list; press ↻ to refresh), or upload a checkpoint file (.pt / .pth).")
GALLERY_LIMIT = 60
NOT_FINITE = ("the model's output is not a number (NaN or infinite), so no result is shown: the checkpoint's "
              "weights are damaged; choose another checkpoint")


def choose_checkpoint(selected: str | None, uploaded: str | None) -> str:
    """An uploaded file wins over the dropdown. Raises CheckpointError when neither is set."""
    path = uploaded or (selected or "").strip()
    if not path:
        raise CheckpointError(NO_CHECKPOINT)
    return path


def load(selected: str | None, uploaded: str | None, trust_pickle: bool) -> Predictor:
    """Only UserError escapes: a malformed file that core's checks miss is still
    said (with the traceback in the server log), never a bare 'Error'."""
    path = choose_checkpoint(selected, uploaded)
    try:
        return cached_predictor(path, "auto", bool(trust_pickle))
    except UserError:
        raise
    except MemoryError:
        raise CheckpointError(f"checkpoint {path} is too large to load into memory") from None
    except Exception as e:
        log.error("loading checkpoint %s failed:\n%s", path, traceback.format_exc())
        raise CheckpointError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {first_line(e)}); "
                              f"it is damaged or not one this app can read") from None


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


@dataclass
class Single:
    confidences: dict[str, float]
    ms: float


def predict_one(pred: Predictor, image, k: int) -> Single:
    """`image`: a PIL image or a path. Raises ImageLoadError for non-images."""
    img = image if isinstance(image, Image.Image) else load_rgb(image)
    t0 = time.perf_counter()
    topk = pred.predict_image(img, int(k))
    if not all(math.isfinite(p) for _, p in topk):
        raise CheckpointError(NOT_FINITE)
    return Single({label: float(p) for label, p in topk}, (time.perf_counter() - t0) * 1000)


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


def predict_many(pred: Predictor, paths: list[str], k: int) -> list[Prediction]:
    """Raises CheckpointError when the model's output is not finite (no NaN is ever shown as a result)."""
    preds = list(pred.predict_paths(paths, int(k)))
    if not all(math.isfinite(p) for r in preds for _, p in r.topk):
        raise CheckpointError(NOT_FINITE)
    return preds


def table_rows(preds: list[Prediction], names: list[str], labels: list[str | None]) -> list[list]:
    """One row per image; `check` compares the prediction with the class its
    folder is named after (core.metrics.folder_labels), blank without one."""
    rows = []
    for p, name, y in zip(preds, names, labels):
        if p.error:
            rows.append([name, "—", None, "", p.error, ""])
        else:
            check = "" if y is None else "✓" if p.label == y else f"✗ folder: {y}"
            rows.append([name, p.label, p.p, ", ".join(f"{lab} {pr:.3f}" for lab, pr in p.topk), "", check])
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


def write_csv(preds: list[Prediction], names: list[str], labels: list[str | None]) -> str:
    """CSV in a fresh temp folder (Gradio serves files from the temp dir);
    folder_class: the class the image's folder is named after, if any."""
    out = Path(tempfile.mkdtemp(prefix="tl_predictions_")) / "predictions.csv"
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "path", "top1", "p", "topk", "error", "folder_class"])
        for p, name, y in zip(preds, names, labels):
            w.writerow([name, p.path, p.label or "", f"{p.p:.6f}" if p.p is not None else "",
                        "; ".join(f"{lab}:{pr:.6f}" for lab, pr in p.topk), p.error or "", y or ""])
    return str(out)


def thumbnail(path: str, size: int = 256) -> Image.Image | None:
    try:
        img = load_rgb(path)
    except ImageLoadError:
        return None
    img.thumbnail((size, size))
    return img


def gallery_items(preds: list[Prediction], names: list[str], labels: list[str | None],
                  wrong: list[int]) -> list[tuple[Image.Image, str]]:
    """(thumbnail, caption) for readable images; thumbnails, so any folder works.
    The `wrong` ones (core.metrics.folder_check) come first, marked ✗."""
    first = set(wrong)
    order = list(wrong) + [i for i in range(len(preds)) if i not in first]
    out = []
    for i in order:
        p, name = preds[i], names[i]
        if p.error or len(out) >= GALLERY_LIMIT:
            continue
        thumb = thumbnail(p.path)
        if thumb is not None:
            mark = f"✗ (folder: {labels[i]}) " if i in first else ""
            out.append((thumb, f"{mark}{p.label} {p.p:.0%} · {name}"))
    return out
