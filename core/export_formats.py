"""The export files' names and shared checks, the torch.export program (model.pt2)
and safetensors (model.safetensors + model.json): writing each, and reading each
back with a clear error for a damaged file. core/export.py orchestrates;
core/export_onnx.py does ONNX and int8."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from . import checkpoint as ck
from . import fileio
from . import checkpoint_rules as rules
from .config import ARCHS
from .errors import CheckpointError, UserError, first_line
from .zipimport import file_sha256

FORMATS = ("onnx", "pt2", "safetensors")
FILE_NAMES = {"onnx": "model.onnx", "pt2": "model.pt2", "safetensors": "model.safetensors"}
SIDECAR_NAME = "model.json"
INT8_NAME = "model.int8.onnx"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
# An export is refused when ONNX Runtime or the .pt2 program differs from the
# PyTorch model by more than this on the check batch (float32 rounding is ~1e-6).
SELF_CHECK_TOLERANCE = 1e-3
MAX_SIDECAR_BYTES = 16 * 2**20  # 10,000 class names are ~0.2 MB of JSON
# model.safetensors carries its model.json in its own metadata under this key, so
# that the file alone (an upload to the app) still says what it is.
EMBEDDED_SIDECAR_KEY = "model_json"


class ExportError(UserError):
    """An export could not be written or checked; the message says why."""


class LoadedExport(NamedTuple):
    """What core.predict.Predictor needs: Predictor(model, class_names, device, info, resize, crop)."""
    model: nn.Module
    class_names: list[str]
    info: dict
    resize: int
    crop: int


def reference_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x).float()


def compare(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    """Max |logit difference| of an export against the PyTorch model; ExportError
    when the shapes, the top-1 or the values (SELF_CHECK_TOLERANCE) differ."""
    if tuple(got.shape) != tuple(want.shape):
        raise ExportError(f"{what} gives shape {tuple(got.shape)}, the PyTorch model {tuple(want.shape)}")
    diff = float((got - want).abs().max())
    if not diff <= SELF_CHECK_TOLERANCE or not torch.equal(got.argmax(1), want.argmax(1)):
        raise ExportError(f"{what} differs from the PyTorch model (max |logit difference| {diff:.3g}, allowed "
                          f"{SELF_CHECK_TOLERANCE:g}); the export was not written")
    return diff


def read_json_quietly(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- model.pt2

def write_pt2(model: nn.Module, program, path: Path, x: torch.Tensor) -> float:
    buf = io.BytesIO()  # torch.export.save wants a path or a plain buffer
    torch.export.save(program, buf)
    buf.seek(0)
    with torch.inference_mode():  # checked as it will be used: loaded back from the saved bytes
        got = torch.export.load(buf).module()(x).float()
    diff = compare(got, reference_logits(model, x), "the torch.export program")
    fileio.atomic_write_bytes(path, buf.getvalue())
    return diff


def load_pt2(path):
    """torch.export.load with a clear error for a damaged or foreign file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p} does not exist" if not p.exists() else f"{p} is not a file")
    try:
        return torch.export.load(str(p))
    except Exception as e:
        raise CheckpointError(f"{p} is not a loadable torch.export program (truncated or damaged?): "
                              f"{first_line(e)}") from None


# ---------------------------------------------------------------- model.safetensors

def write_safetensors(model: nn.Module, meta: dict, path: Path) -> float:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(state, metadata={"format": "pt", "arch": str(meta.get("arch")),
                                 EMBEDDED_SIDECAR_KEY: json.dumps(meta, ensure_ascii=False)})
    fileio.atomic_write_bytes(path, data)
    return 0.0  # the very tensors; read_safetensors_export is tested against them


def sidecar_for(path) -> Path:
    """model.json for model.safetensors: <stem>.json beside it, else model.json there."""
    p = Path(path)
    own = p.with_suffix(".json")
    return own if own.is_file() or not (p.parent / SIDECAR_NAME).is_file() else p.parent / SIDECAR_NAME


def read_safetensors_export(path) -> LoadedExport:
    """model.safetensors + its model.json -> a model ready for Predictor:
    architecture, classes, preprocessing and temperature from the JSON beside
    it, else from the copy of it that our exports keep in the file's metadata.
    Raises CheckpointError for a missing or damaged file, or a JSON that does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .safeload import MAX_FILE_BYTES

    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{p} does not exist" if not p.exists() else f"{p} is not a regular file")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise CheckpointError(f"{p} is {p.stat().st_size / 2**30:.1f} GiB; model files here are at most "
                              f"{MAX_FILE_BYTES / 2**30:.0f} GiB")
    meta, side = safetensors_meta(p)
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors file (truncated or damaged?): {first_line(e)}") from None
    if not state:
        raise CheckpointError(f"{p} holds no tensors")
    n = ck.head_out_features(state)
    if len(meta["class_names"]) != n:
        raise CheckpointError(f"{side} names {len(meta['class_names'])} classes but {p} has {n} outputs: the JSON "
                              f"belongs to another model")
    try:
        arch = ck.infer_arch(state)
    except CheckpointError:
        arch = meta["arch"]  # not keys this tool knows: model_from_state_dict says what does not fit
    if arch != meta["arch"]:
        raise CheckpointError(f"{side} says {meta['arch']} but {p} holds {arch} weights: the JSON belongs to "
                              f"another model")
    model, names = ck.model_from_state_dict(state, meta["arch"], meta["class_names"], p)
    info = {"format": "safetensors export", "path": str(p), "arch": meta["arch"], "sidecar": str(side),
            "class_names_recorded": True}
    for key in ("epoch", "best_epoch", "best_val_acc", "temperature", "weights"):
        if key in meta:
            info[key] = meta[key]
    return LoadedExport(model, names, info, meta["resize"], meta["crop"])


def safetensors_meta(p: Path) -> tuple[dict, str]:
    """(model.json's content, where it came from) for model.safetensors: the JSON
    beside it (which must list these very weights, when it lists any), else the
    copy our exports embed in the file's metadata."""
    from safetensors import SafetensorError

    side = sidecar_for(p)
    if side.is_file():
        meta = read_sidecar(side)
        listed = (meta.get("files") or {}).get(p.name) if isinstance(meta.get("files"), dict) else None
        if listed and listed != file_sha256(p):
            raise CheckpointError(f"{side} describes another {p.name} (its SHA-256 differs): the weights were "
                                  f"replaced or damaged after export; export again or use the model.json of these weights")
        return meta, str(side)
    try:
        embedded = _embedded_sidecar(p)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors file (truncated or damaged?): {first_line(e)}") from None
    if embedded is None:
        raise CheckpointError(f"{p} holds weights only; the architecture and class names come from {side.name} "
                              f"beside it, which is missing. Put the model.json written with it by the export beside it "
                              f"(a model.safetensors exported by this tool carries a copy of it and loads alone)")
    return _checked_embedded(embedded, p), f"{p.name}'s embedded model.json"


def _embedded_sidecar(p: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:  # reads the header only
        return (f.metadata() or {}).get(EMBEDDED_SIDECAR_KEY)


def _checked_embedded(text: str, p: Path) -> dict:
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{p}'s embedded model.json is not readable JSON: {first_line(e)}") from None
    return check_sidecar(meta, Path(f"{p.name} (its embedded model.json)"))


def read_sidecar(side: Path) -> dict:
    """model.json, each field used checked as a checkpoint's are (core.checkpoint_rules)."""
    try:
        if side.stat().st_size > MAX_SIDECAR_BYTES:
            raise CheckpointError(f"{side} is {side.stat().st_size:,} bytes; a model.json is a few KB "
                                  f"(at most {MAX_SIDECAR_BYTES:,} bytes)")
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{side} is not readable JSON: {first_line(e)}") from None
    return check_sidecar(meta, side)


def check_sidecar(meta, side: Path) -> dict:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{side} is not a model.json object")
    r = rules.Rules(side)
    r.str_("arch", meta.get("arch"), ARCHS)
    if rules.check_class_names(meta.get("class_names"), None, side) is None:
        r.fail("class_names", meta.get("class_names"), "a list of class-name strings")
    meta.setdefault("resize", 256)
    meta.setdefault("crop", 224)
    r.int_("resize", meta["resize"], rules.MIN_SIDE, rules.MAX_SIDE)
    r.int_("crop", meta["crop"], rules.MIN_SIDE, meta["resize"], " (at most resize)")
    if "temperature" in meta:
        r.real("temperature", meta["temperature"], 1e-3, rules.MAX_TEMPERATURE,
               f"a number above 0, at most {rules.MAX_TEMPERATURE:g}")
    return meta
