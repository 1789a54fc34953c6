"""Exports of a trained model for use outside this tool, each proven to compute
the same function as the PyTorch model:

- model.onnx        ONNX (torch.onnx.export with dynamo=True, torch's recommended
                    exporter), checked by onnx.checker; for ONNX Runtime, servers, phones
- model.pt2         a torch.export program (torch.export.load, no code of this project)
- model.safetensors the state_dict as safetensors: weights only, no code, safe to share
- model.json        everything a program needs to use them: classes, preprocessing,
                    input/output names, temperature, where the weights came from
- model.int8.onnx   optional: ONNX Runtime static int8 quantization, calibrated on
                    training images and scored against float32 on the val images

Input `image`: float32 [N, 3, crop, crop] (crop 224), RGB, normalised with the
ImageNet mean/std after Resize(256) + CenterCrop(224); output `logits`: [N, C].
Every file is written atomically (temp file + os.replace). This module chooses
what to export, writes model.json and runs the rest: core/export_onnx.py (ONNX,
int8), core/export_formats.py (.pt2, safetensors and their loaders)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import checkpoint as ck
from . import fileio
from .config import ARCHS
from .data import IMAGENET_MEAN, IMAGENET_STD
from .errors import CheckpointError, UserError, first_line
from .export_formats import (FILE_NAMES, FORMATS, INT8_NAME, INPUT_NAME, OUTPUT_NAME, SIDECAR_NAME, ExportError,
                             LoadedExport, load_pt2, read_json_quietly, read_safetensors_export, safetensors_meta,
                             write_pt2, write_safetensors)
from .export_onnx import Int8Report, onnx_session, quantize_int8, write_onnx
from .predict import Predictor
from .zipimport import file_sha256

# The public names of the exports, for export.py, the app and tests (one import place).
__all__ = ["FILE_NAMES", "FORMATS", "INT8_NAME", "SIDECAR_NAME", "ExportError", "ExportSource", "ExportedFile",
           "Int8Report", "LoadedExport", "default_out_dir", "export_checkpoint", "export_formats", "load_pt2",
           "load_source", "onnx_session", "parse_formats", "quantize_int8", "read_safetensors_export"]
EXPORT_VERSION = 1


@dataclass
class ExportSource:
    """A loaded model, ready to export: float32, eval mode, on the CPU."""
    model: nn.Module
    class_names: list[str]
    meta: dict  # the model.json content, less the per-file entries
    predictor: Predictor  # what it was loaded by (its preprocessing)
    data_dir: str | None = None  # the training run's dataset folder, when the checkpoint names one
    split: tuple = (None, 0)  # its (val_split, seed): the same val images when val/ was carved out of train/


@dataclass
class ExportedFile:
    format: str  # "onnx", "pt2", "safetensors" or "json"
    path: Path
    bytes: int
    seconds: float
    max_abs_diff: float | None = None  # against the PyTorch model, on the self-check batch
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- choosing what to export

def parse_formats(text: str | None) -> tuple[str, ...]:
    """'onnx,pt2' -> ('onnx', 'pt2'); None or '' or 'all' -> all three."""
    if text is None or not str(text).strip() or str(text).strip().lower() == "all":
        return FORMATS
    chosen = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    wrong = [t for t in chosen if t not in FORMATS]
    if wrong:
        raise UserError(f"{', '.join(map(repr, wrong))} is not an export format; the formats are "
                        f"{', '.join(FORMATS)} (several comma-separated, e.g. onnx,safetensors)")
    return tuple(f for f in FORMATS if f in chosen)


def default_out_dir(checkpoint) -> Path:
    """export/ beside the checkpoint (a run folder's export/); an exported
    model.safetensors exports into its own folder, beside its model.json."""
    p = Path(checkpoint).expanduser()
    return p.parent if p.suffix.lower() == ".safetensors" else p.parent / "export"


def load_source(path, trust_pickle: bool = False, arch: str | None = None,
                classes: list[str] | None = None) -> ExportSource:
    """Any file predict.py accepts (checkpoint dict, state_dict with arch/classes,
    full model with trust_pickle) or an earlier model.safetensors export (its
    model.json's record of the original checkpoint is carried over)."""
    p = Path(path).expanduser()
    pred = Predictor.load(p, "cpu", trust_pickle, arch, classes)  # a model.safetensors too (its model.json)
    model = pred.model.to(memory_format=torch.contiguous_format).float().eval()
    meta, data_dir, split = _source_meta(p, pred)
    if pred.info.get("format") == "safetensors export":
        earlier, _ = safetensors_meta(p)
        meta["exported_from"] = meta["source"]
        meta.update({k: earlier[k] for k in CARRIED_OVER if k in earlier})
    return ExportSource(model, list(pred.class_names), meta, pred, data_dir, split)


# What a re-export from model.safetensors keeps from its model.json: the original checkpoint and its scores.
CARRIED_OVER = ("source", "epoch", "best_epoch", "best_val_acc", "best_val_loss", "best_loss_epoch", "val_acc",
                "val_loss", "policy", "weights", "temperature", "probabilities")


def _source_meta(path: Path, pred) -> tuple[dict, str | None, tuple]:
    info = pred.info
    arch = info.get("arch")
    if arch is None:  # a state_dict or full model: the keys say which torchvision model it is, if any
        try:
            arch = ck.infer_arch(pred.model.state_dict())
        except CheckpointError:
            arch = None
    meta = {
        "export_version": EXPORT_VERSION,
        "arch": arch,
        "class_names": list(pred.class_names),
        "num_classes": len(pred.class_names),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": ["N", 3, pred.crop, pred.crop],
        "output_shape": ["N", len(pred.class_names)],
        "input_dtype": "float32",
        "layout": "NCHW, RGB",
        "resize": pred.resize,
        "crop": pred.crop,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "preprocess": (f"EXIF orientation, RGB (transparency on white), shorter side to {pred.resize} "
                       f"(bilinear, antialiased, as torchvision's Resize), center crop {pred.crop}x{pred.crop}, "
                       f"divide by 255, subtract mean, divide by std"),
        "probabilities": "softmax(logits / temperature)" if info.get("temperature") else "softmax(logits)",
        "source": {"file": path.name, "sha256": file_sha256(path), "format": info.get("format")},
        "torch_version": torch.__version__,
    }
    for key in ("temperature", "best_epoch", "best_val_acc"):
        if info.get(key) is not None:
            meta[key] = info[key]
    data_dir, split = None, (None, 0)
    if info.get("format") == "checkpoint dict":
        c = ck.normalise_checkpoint(fileio.load_file(path), path)  # as Predictor.load reads it (no optimizer checks)
        for key in ("epoch", "best_epoch", "best_val_acc", "best_val_loss", "best_loss_epoch", "policy", "weights",
                    "temperature"):
            value = c.get(key)
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                meta[key] = value
        row = next((h for h in c.get("history") or [] if h.get("epoch") == c.get("epoch")), None)
        for key in ("val_acc", "val_loss"):  # of the epoch whose weights these are
            if row and isinstance(row.get(key), (int, float)) and math.isfinite(row[key]):
                meta[key] = float(row[key])
        args = c.get("args") or {}
        data_dir = args.get("data_dir") if isinstance(args.get("data_dir"), str) else None
        val_split, seed = args.get("val_split"), args.get("seed")
        split = (val_split if isinstance(val_split, float) and 0 < val_split < 1 else None,
                 seed if type(seed) is int else 0)
    if "temperature" in meta:
        meta["probabilities"] = "softmax(logits / temperature)"
    return meta, data_dir, split


# ---------------------------------------------------------------- writing

def export_formats(source: ExportSource, out_dir, formats=FORMATS) -> Iterator[ExportedFile]:
    """Write each format into out_dir, then model.json; yield each file as it is
    written (the ONNX export takes seconds). The ONNX file and the .pt2 program
    are checked against the PyTorch model before they are written."""
    out = Path(out_dir).expanduser()
    _make_out_dir(out)
    formats = parse_formats(formats if isinstance(formats, str) else ",".join(formats))
    if "safetensors" in formats and source.meta.get("arch") not in ARCHS:
        raise ExportError(f"model.safetensors holds weights only, and this model's architecture is not one this tool "
                          f"can rebuild ({', '.join(ARCHS)}); export it as onnx or pt2 instead")
    check = _check_batch(source)
    program = None  # traced once for both the .pt2 file and the ONNX exporter
    written: dict[str, str] = {}
    for fmt in formats:
        t = time.perf_counter()
        path = out / FILE_NAMES[fmt]
        if fmt in ("onnx", "pt2") and program is None:
            program = _exported_program(source.model, check)
        if fmt == "onnx":
            diff = write_onnx(source.model, program, path, check)
        elif fmt == "pt2":
            diff = write_pt2(source.model, program, path, check)
        else:
            diff = write_safetensors(source.model, source.meta, path)
        written[path.name] = file_sha256(path)
        yield ExportedFile(fmt, path, path.stat().st_size, time.perf_counter() - t, diff)
    t = time.perf_counter()
    sidecar, notes = write_sidecar(source, out, written)
    yield ExportedFile("json", sidecar, sidecar.stat().st_size, time.perf_counter() - t, notes=notes)


def export_checkpoint(path, out_dir=None, formats=FORMATS, quantize: str | None = None, data_dir=None,
                      trust_pickle: bool = False, arch: str | None = None,
                      classes: list[str] | None = None) -> tuple[list[ExportedFile], Int8Report | None]:
    """Everything export.py does, in one call (for the app): the files written
    (model.json last) and the int8 report when quantize == "int8"."""
    if quantize not in (None, "int8"):
        raise UserError(f"quantize {quantize!r} is not supported; the choice is int8")
    formats = parse_formats(formats if isinstance(formats, str) else ",".join(formats))
    if quantize and "onnx" not in formats:
        formats = ("onnx", *formats)
    source = load_source(path, trust_pickle, arch, classes)
    files = list(export_formats(source, default_out_dir(path) if out_dir is None else out_dir, formats))
    report = quantize_int8(source, next(f.path for f in files if f.format == "onnx"), data_dir=data_dir) \
        if quantize else None
    return files, report


def _make_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"the export folder {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the output folder {out}: {e.strerror or e}") from None


def _check_batch(source: ExportSource) -> torch.Tensor:
    """Two pseudo-images (seeded; torch's global RNG untouched) at the model's input size."""
    gen = torch.Generator().manual_seed(0)
    crop = source.meta["crop"]
    return torch.randn(2, 3, crop, crop, generator=gen)


def _dynamic_batch():
    return ({0: torch.export.Dim("batch")},)


def _exported_program(model: nn.Module, x: torch.Tensor):
    try:
        return torch.export.export(model, (x,), dynamic_shapes=_dynamic_batch())
    except Exception as e:  # a foreign pickled model may do what torch.export cannot trace
        raise ExportError(f"torch.export could not trace this model: {type(e).__name__}: {first_line(e)}") from None


def write_sidecar(source: ExportSource, out_dir: Path, written: dict[str, str]) -> tuple[Path, list[str]]:
    """model.json: source.meta plus `files` (name -> SHA-256). Files of an earlier
    export of the same checkpoint stay listed; a model.* file left by an export of
    another checkpoint is named in the returned notes (it does not match the JSON)."""
    path = out_dir / SIDECAR_NAME
    files = dict(written)
    notes = []
    earlier = read_json_quietly(path)
    same_source = earlier.get("source", {}).get("sha256") == source.meta["source"]["sha256"]
    for name in [*FILE_NAMES.values(), INT8_NAME]:
        if name in files or not (out_dir / name).is_file():
            continue
        listed = earlier.get("files", {}).get(name) if same_source else None
        if listed:
            files[name] = listed
        else:
            notes.append(f"{out_dir / name} is left from an export of another checkpoint (not listed in "
                         f"{SIDECAR_NAME}); delete it or export that format again")
    # an int8 file kept from an earlier export of this checkpoint keeps its scores too
    kept_int8 = {"int8": earlier["int8"]} if same_source and INT8_NAME in files and INT8_NAME not in dict(written) \
        and isinstance(earlier.get("int8"), dict) else {}
    fileio.atomic_write_json(path, {**source.meta, **kept_int8, "files": dict(sorted(files.items()))})
    return path, notes
