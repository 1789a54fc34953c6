"""Dataset helpers of the Train and Predict tabs (formatting around core.data)."""
from __future__ import annotations

from pathlib import Path

from core.data import DatasetInfo
from core.predict import list_images

from .text import md_code, md_text


def summary_markdown(info: DatasetInfo, say=str) -> str:
    """Counts per class and split, then the warnings, each worded by `say`;
    class names and the file names in warnings are shown as text."""
    train, val = info.train.counts(), info.val.counts()
    lines = [f"**{len(info.classes)} classes**, {len(info.train.samples)} train / {len(info.val.samples)} val images"
             + (f" (val = {info.val_from_split:.0%} held out of train)" if info.val_from_split else ""),
             "", "| class | train | val |", "|---|---:|---:|"]
    lines += [f"| {md_text(c)} | {train[c]} | {val[c]} |" for c in info.classes]
    if info.warnings:
        lines.append("")
        for w in info.warnings:
            first, *rest = say(w).split("\n")
            lines.append(f"⚠ {md_text(first)}")
            lines += [f"<br>&nbsp;&nbsp;{md_code(r.strip())}" for r in rest[:5]]
    else:
        lines += ["", "✔ No problems found."]
    return "\n".join(lines)


def example_images(data_dir: str, per_class: int = 4) -> list[tuple[str, str]]:
    """(path, caption) of a few validation images per class, for click-to-predict."""
    root = Path(str(data_dir).strip()).expanduser()  # as the dataset scan does
    split = root / "val" if (root / "val").is_dir() else root / "train"
    if not split.is_dir():
        return []
    out = []
    for cls in sorted(p for p in split.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in list_images(cls)[:per_class]:
            out.append((path, f"{split.name}/{cls.name}"))
    return out
