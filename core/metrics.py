"""Per-class validation results: which classes a model gets right, and what it
takes the others for. Kept as sparse [true, predicted, count] triples (plain
ints, so checkpoints still load with weights_only=True): 10,000 classes cost no
more than the validation images they have, where a dense matrix would not fit.
Prediction on a folder laid out like val/<class>/ is checked the same way."""
from __future__ import annotations

import math
from pathlib import Path

import torch

SHOWN_CLASSES = 20  # past this the CLI lists the worst classes only


def confusion_pairs(labels: torch.Tensor, predicted: torch.Tensor) -> list[list[int]]:
    """[[true, predicted, count], ...] for the pairs that occur, sorted."""
    if labels.numel() == 0:
        return []
    pairs, counts = torch.unique(torch.stack([labels.cpu(), predicted.cpu()], 1), dim=0, return_counts=True)
    return [[t, p, c] for (t, p), c in zip(pairs.tolist(), counts.tolist())]


def clean_confusion(value, num_classes: int) -> list[list[int]] | None:
    """The triples of `value` that are whole, in range and counted (a checkpoint
    from elsewhere may hold anything under the key); None when none are."""
    if not isinstance(value, (list, tuple)):
        return None
    out = []
    for entry in value:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3 or not all(type(v) is int for v in entry):
            continue
        t, p, c = entry
        if 0 <= t < num_classes and 0 <= p < num_classes and 0 < c < 2**53:  # a count, not a 5000-digit int
            out.append([t, p, c])
    return out or None


def per_class(confusion, classes: list[str]) -> list[dict]:
    """One row per class that has validation images, in class order: images,
    correct, acc, and the label most often given instead (taken_for, taken_count;
    None and 0 when every image was right). Malformed entries are skipped."""
    images, correct, wrong = [0] * len(classes), [0] * len(classes), [dict() for _ in classes]
    for t, p, c in clean_confusion(confusion, len(classes)) or []:
        images[t] += c
        if t == p:
            correct[t] += c
        else:
            wrong[t][p] = wrong[t].get(p, 0) + c
    rows = []
    for i, name in enumerate(classes):
        if not images[i]:
            continue
        top = max(wrong[i].items(), key=lambda kv: (kv[1], -kv[0]), default=None)
        rows.append({"class": name, "images": images[i], "correct": correct[i], "acc": correct[i] / images[i],
                     "taken_for": classes[top[0]] if top else None, "taken_count": top[1] if top else 0})
    return rows


def per_class_lines(rows: list[dict], limit: int = SHOWN_CLASSES) -> list[str]:
    """`  cat: 15/16 = 0.9375 (1 taken for fish)`; over `limit` classes, the
    `limit` lowest accuracies and how many more there are."""
    shown, rest = worst_first(rows, limit)
    lines = [f"  {row_text(r, ': ')} = {r['acc']:.4f}{taken_text(r)}" for r in shown]
    if rest:
        lines.append(f"  ... {len(rest)} more classes, each at {rest[0]['acc']:.4f} or better")
    return lines


def row_text(r: dict, sep: str) -> str:
    return f"{r['class']}{sep}{r['correct']}/{r['images']}"


def taken_text(r: dict) -> str:
    return f" ({r['taken_count']} taken for {r['taken_for']})" if r["taken_for"] else ""


def worst_first(rows: list[dict], limit: int) -> tuple[list[dict], list[dict]]:
    """(rows to show, the rest): all in class order when they fit, else the
    `limit` lowest accuracies first and the rest, lowest first."""
    if len(rows) <= limit:
        return rows, []
    ranked = sorted(rows, key=lambda r: (r["acc"], r["class"]))
    return ranked[:limit], ranked[limit:]


def per_class_summary(rows: list[dict], limit: int = 10) -> str:
    """One line for the app: `cat 15/16 · fish 14/16 (2 taken for cat)`; over
    `limit` classes, the lowest accuracies first and how many more there are."""
    shown, rest = worst_first(rows, limit)
    text = " · ".join(f"{row_text(r, ' ')}{taken_text(r)}" for r in shown)
    floor = math.floor(rest[0]["acc"] * 100) if rest else 0  # rounded up, 99.6% would read "100% or better"
    return text + (f" · … {len(rest)} more classes, each at {floor}% or better" if rest else "")


def folder_labels(paths, classes: list[str]) -> list[str | None]:
    """The class each image's own folder is named after, else None (also for a
    path given as None: an upload): a folder laid out like val/<class>/ lets
    prediction check the model against it."""
    names = set(classes)
    return [None if p is None else parent if (parent := Path(p).parent.name) in names else None for p in paths]


def folder_check(predicted: list[str | None], labels: list[str | None]) -> tuple[int, int, list[int]]:
    """(right, checked, indices of the wrong ones) over the images that have a
    folder label and a prediction (unreadable files have none)."""
    checked = [i for i, (p, y) in enumerate(zip(predicted, labels)) if p is not None and y is not None]
    wrong = [i for i in checked if predicted[i] != labels[i]]
    return len(checked) - len(wrong), len(checked), wrong
