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
Every file is written atomically (temp file + os.replace)."""
from __future__ import annotations

import io
import json
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from . import checkpoint as ck
from . import checkpoint_rules as rules
from .config import ARCHS
from .data import IMAGENET_MEAN, IMAGENET_STD, normalize
from .errors import CheckpointError, ImageLoadError, UserError, first_line
from .zipimport import file_sha256

FORMATS = ("onnx", "pt2", "safetensors")
FILE_NAMES = {"onnx": "model.onnx", "pt2": "model.pt2", "safetensors": "model.safetensors"}
SIDECAR_NAME = "model.json"
INT8_NAME = "model.int8.onnx"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
EXPORT_VERSION = 1
# An export is refused when ONNX Runtime or the .pt2 program differs from the
# PyTorch model by more than this on the check batch (float32 rounding is ~1e-6).
SELF_CHECK_TOLERANCE = 1e-3
# int8 is reported as not good enough when val accuracy drops by more than this.
INT8_MAX_DROP = 0.01
MAX_CALIBRATION_IMAGES = 200
MAX_INT8_VAL_IMAGES = 2000  # int8 vs float32 is scored on at most this many val images (a seeded sample)
MAX_SIDECAR_BYTES = 16 * 2**20  # 10,000 class names are ~0.2 MB of JSON


class ExportError(UserError):
    """An export could not be written or checked; the message says why."""


@dataclass
class ExportSource:
    """A loaded model, ready to export: float32, eval mode, on the CPU."""
    model: nn.Module
    class_names: list[str]
    meta: dict  # the model.json content, less the per-file entries
    predictor: object  # the core.predict.Predictor it came from (its preprocessing)
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


class LoadedExport(NamedTuple):
    """What core.predict.Predictor needs: Predictor(model, class_names, device, info, resize, crop)."""
    model: nn.Module
    class_names: list[str]
    info: dict
    resize: int
    crop: int


@dataclass
class Int8Report:
    path: Path
    bytes: int
    calibration_images: int
    val_images: int
    float_val_acc: float
    int8_val_acc: float
    agreement: float  # share of val images whose top-1 is the same in int8 and float32
    seconds: float
    val_total: int = 0  # val images in the dataset (val_images were scored: a sample when there are many)

    @property
    def acceptable(self) -> bool:
        """At most one val image per 100 lost to quantization."""
        return self.float_val_acc - self.int8_val_acc <= INT8_MAX_DROP + 1e-9

    def lines(self) -> list[str]:
        """What export.py prints (and the app can show); a WARNING line when int8
        loses more than 1 val image in 100."""
        lines = [f"INT8: {self.path} ({self.bytes / 1e6:.1f} MB, {self.seconds:.1f} s), calibrated on "
                 f"{self.calibration_images} training image(s)",
                 f"  val accuracy on {self.val_images} image(s){self._sampled()}: float32 {self.float_val_acc:.4f}, int8 "
                 f"{self.int8_val_acc:.4f}; top-1 agreement {self.agreement:.4f}"]
        if not self.acceptable:
            lines.append(f"WARNING: int8 LOSES ACCURACY: {self.int8_val_acc:.4f} against float32's "
                         f"{self.float_val_acc:.4f} on {self.val_images} val images (more than 1 image in 100). "
                         f"{self.path.name} is written but is NOT a faithful copy: deploy model.onnx (float32) "
                         f"unless the speed is worth the loss")
        return lines

    def _sampled(self) -> str:
        return f" (a seeded sample of the {self.val_total:,})" if self.val_total > self.val_images else ""


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
    from .predict import Predictor  # core.predict may import this module to load .safetensors

    p = Path(path).expanduser()
    if p.suffix.lower() == ".safetensors":
        loaded = read_safetensors_export(p)
        pred = Predictor(loaded.model, loaded.class_names, "cpu", loaded.info, loaded.resize, loaded.crop)
    else:
        pred = Predictor.load(p, "cpu", trust_pickle, arch, classes)
    model = pred.model.to(memory_format=torch.contiguous_format).float().eval()
    meta, data_dir, split = _source_meta(p, pred)
    if p.suffix.lower() == ".safetensors":
        earlier = _read_sidecar(sidecar_for(p))
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
        c = ck.normalise_checkpoint(ck.load_file(path), path)  # as Predictor.load reads it (no optimizer checks)
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
            diff = _write_onnx(source, program, path, check)
        elif fmt == "pt2":
            diff = _write_pt2(source, program, path, check)
        else:
            diff = _write_safetensors(source, path)
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


def _reference_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x).float()


def _dynamic_batch():
    return ({0: torch.export.Dim("batch")},)


def _exported_program(model: nn.Module, x: torch.Tensor):
    try:
        return torch.export.export(model, (x,), dynamic_shapes=_dynamic_batch())
    except Exception as e:  # a foreign pickled model may do what torch.export cannot trace
        raise ExportError(f"torch.export could not trace this model: {type(e).__name__}: {first_line(e)}") from None


def _write_onnx(source: ExportSource, program, path: Path, x: torch.Tensor) -> float:
    import onnx

    try:
        onnx_program = torch.onnx.export(program, (x,), dynamo=True, input_names=[INPUT_NAME],
                                         output_names=[OUTPUT_NAME], verbose=False)
    except Exception as e:
        raise ExportError(f"the ONNX exporter failed on this model: {type(e).__name__}: {first_line(e)}") from None
    batch_dim = onnx_program.model.graph.inputs[0].shape[0]
    if not isinstance(batch_dim, int):  # the traced name (s77) -> "batch", as model.json says N
        onnx_program.rename_axes({batch_dim: "batch"})
    proto = onnx_program.model_proto
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"the exported ONNX model fails onnx.checker: {first_line(e)}") from None
    data = proto.SerializeToString()
    got = onnx_session(data, path.name).run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    diff = _compare(torch.from_numpy(got), _reference_logits(source.model, x), "ONNX Runtime")
    ck.atomic_write_bytes(path, data)
    return diff


def _write_pt2(source: ExportSource, program, path: Path, x: torch.Tensor) -> float:
    buf = io.BytesIO()  # torch.export.save wants a path or a plain buffer
    torch.export.save(program, buf)
    buf.seek(0)
    with torch.inference_mode():  # checked as it will be used: loaded back from the saved bytes
        got = torch.export.load(buf).module()(x).float()
    diff = _compare(got, _reference_logits(source.model, x), "the torch.export program")
    ck.atomic_write_bytes(path, buf.getvalue())
    return diff


def _write_safetensors(source: ExportSource, path: Path) -> float:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in source.model.state_dict().items()}
    data = save(state, metadata={"format": "pt", "arch": str(source.meta.get("arch")), "model_json": SIDECAR_NAME})
    ck.atomic_write_bytes(path, data)
    return 0.0  # the very tensors; read_safetensors_export is tested against them


def _compare(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    if tuple(got.shape) != tuple(want.shape):
        raise ExportError(f"{what} gives shape {tuple(got.shape)}, the PyTorch model {tuple(want.shape)}")
    diff = float((got - want).abs().max())
    if not diff <= SELF_CHECK_TOLERANCE or not torch.equal(got.argmax(1), want.argmax(1)):
        raise ExportError(f"{what} differs from the PyTorch model (max |logit difference| {diff:.3g}, allowed "
                          f"{SELF_CHECK_TOLERANCE:g}); the export was not written")
    return diff


def write_sidecar(source: ExportSource, out_dir: Path, written: dict[str, str]) -> tuple[Path, list[str]]:
    """model.json: source.meta plus `files` (name -> SHA-256). Files of an earlier
    export of the same checkpoint stay listed; a model.* file left by an export of
    another checkpoint is named in the returned notes (it does not match the JSON)."""
    path = out_dir / SIDECAR_NAME
    files = dict(written)
    notes = []
    earlier = _read_json_quietly(path)
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
    ck.atomic_write_json(path, {**source.meta, "files": dict(sorted(files.items()))})
    return path, notes


def _read_json_quietly(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- reading exports back

def onnx_session(model, name=None, threads: int | None = None):
    """An ONNX Runtime CPU session for a path or serialized bytes; a damaged file
    is a CheckpointError naming it, not ONNX Runtime's traceback."""
    import onnxruntime as ort

    name = name or str(model)
    if isinstance(model, (str, Path)):
        p = Path(model)
        if not p.is_file():
            raise CheckpointError(f"ONNX model {p} does not exist" if not p.exists() else f"{p} is not a file")
        model = str(p)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # its warnings are about graph rewrites, not the user's problem
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise CheckpointError(f"{name} is not a loadable ONNX model (truncated or damaged?): {first_line(e)}") from None


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


def sidecar_for(path) -> Path:
    """model.json for model.safetensors: <stem>.json beside it, else model.json there."""
    p = Path(path)
    own = p.with_suffix(".json")
    return own if own.is_file() or not (p.parent / SIDECAR_NAME).is_file() else p.parent / SIDECAR_NAME


def read_safetensors_export(path) -> LoadedExport:
    """model.safetensors + its model.json -> a model ready for Predictor:
    architecture, classes, preprocessing and temperature from the JSON. Raises
    CheckpointError for a missing or damaged file, or a JSON that does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .safeload import MAX_FILE_BYTES

    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{p} does not exist" if not p.exists() else f"{p} is not a regular file")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise CheckpointError(f"{p} is {p.stat().st_size / 2**30:.1f} GiB; model files here are at most "
                              f"{MAX_FILE_BYTES / 2**30:.0f} GiB")
    side = sidecar_for(p)
    if not side.is_file():
        raise CheckpointError(f"{p} holds weights only; the architecture and class names come from {side}, which is "
                              f"missing. Copy the model.json written with it by the export beside it")
    meta = _read_sidecar(side)
    listed = (meta.get("files") or {}).get(p.name) if isinstance(meta.get("files"), dict) else None
    if listed and listed != file_sha256(p):
        raise CheckpointError(f"{side} describes another {p.name} (its SHA-256 differs): the weights were replaced "
                              f"or damaged after export; export again or use the model.json of these weights")
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
    model, names = ck.model_from_state_dict(state, meta["arch"], meta["class_names"], p)
    info = {"format": "safetensors export", "path": str(p), "arch": meta["arch"], "sidecar": str(side)}
    for key in ("epoch", "best_epoch", "best_val_acc", "temperature", "weights"):
        if key in meta:
            info[key] = meta[key]
    return LoadedExport(model, names, info, meta["resize"], meta["crop"])


def _read_sidecar(side: Path) -> dict:
    """model.json, each field used checked as a checkpoint's are (core.checkpoint_rules)."""
    try:
        if side.stat().st_size > MAX_SIDECAR_BYTES:
            raise CheckpointError(f"{side} is {side.stat().st_size:,} bytes; a model.json is a few KB "
                                  f"(at most {MAX_SIDECAR_BYTES:,} bytes)")
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{side} is not readable JSON: {first_line(e)}") from None
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


# ---------------------------------------------------------------- int8

def quantize_int8(source: ExportSource, onnx_path, out_path=None, data_dir=None,
                  max_images: int = MAX_CALIBRATION_IMAGES, seed: int = 0) -> Int8Report:
    """model.int8.onnx by ONNX Runtime's static quantization (QDQ, per-channel
    int8 weights, uint8 activations), calibrated on up to `max_images` training
    images; then both models score the val images. Needs the run's dataset
    (data_dir, else the folder the checkpoint was trained on)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    from .data import scan_dataset

    t0 = time.perf_counter()
    onnx_path = Path(onnx_path)
    out_path = Path(out_path) if out_path else onnx_path.with_name(INT8_NAME)
    folder = data_dir or source.data_dir
    if not folder:
        raise UserError("int8 quantization calibrates on training images, and this checkpoint names no dataset "
                        "folder; give it as {setting} (a folder with train/<class>/ and val/<class>/)",
                        field="data_dir")
    if not Path(folder).expanduser().is_dir():
        raise UserError(f"int8 quantization: the dataset folder {folder} does not exist (moved?); give the "
                        f"folder the model was trained on as {{setting}}", field="data_dir", value=str(folder))
    ds = scan_dataset(folder, *(source.split if folder == source.data_dir else (None, 0)))
    if ds.classes != source.class_names:
        raise UserError(f"int8 quantization: the classes of {folder} {ds.classes} are not the model's "
                        f"{source.class_names}; give the folder the model was trained on as {{setting}}",
                        field="data_dir", value=str(folder))
    rng = random.Random(seed)
    calib = sorted(rng.sample(ds.train.samples, min(max_images, len(ds.train.samples))))
    val = sorted(rng.sample(ds.val.samples, min(MAX_INT8_VAL_IMAGES, len(ds.val.samples))))
    calibrated = [0]

    class Batches(CalibrationDataReader):  # decoded a batch at a time: 200 inputs are 120 MB
        def __init__(self):
            self.batches = _input_batches(source, calib, 8)

        def get_next(self):
            x, _ = next(self.batches, (None, None))
            if x is None:
                return None
            calibrated[0] += len(x)
            return {INPUT_NAME: x}

    with tempfile.TemporaryDirectory(prefix="tl-int8-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(str(onnx_path), str(pre))  # shape inference + BatchNorm folding before quantizing
            quantize_static(str(pre), str(q), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"CalibMaxIntermediateOutputs": 4})
        except Exception as e:
            raise ExportError(f"int8 quantization failed: {type(e).__name__}: {first_line(e)}") from None
        if not calibrated[0]:
            raise UserError(f"int8 quantization: none of the training images under {folder} could be read",
                            field="data_dir", value=str(folder))
        data = q.read_bytes()
    sessions = onnx_session(str(onnx_path)), onnx_session(data, out_path.name)
    n = right_float = right_int8 = same = 0
    for x, y in _input_batches(source, val, 32):
        top_float, top_int8 = (s.run([OUTPUT_NAME], {INPUT_NAME: x})[0].argmax(1) for s in sessions)
        n += len(y)
        right_float += int((top_float == y).sum())
        right_int8 += int((top_int8 == y).sum())
        same += int((top_float == top_int8).sum())
    ck.atomic_write_bytes(out_path, data)
    nan = float("nan")
    report = Int8Report(out_path, len(data), calibrated[0], n, right_float / n if n else nan,
                        right_int8 / n if n else nan, same / n if n else nan, time.perf_counter() - t0,
                        len(ds.val.samples))
    _record_int8(source, report)
    return report


def _record_int8(source: ExportSource, report: Int8Report) -> None:
    """List model.int8.onnx and its scores in the model.json beside it (when
    that JSON describes the same checkpoint)."""
    side = report.path.parent / SIDECAR_NAME
    meta = _read_json_quietly(side)
    if meta.get("source", {}).get("sha256") != source.meta["source"]["sha256"]:
        return
    meta.setdefault("files", {})[report.path.name] = file_sha256(report.path)
    meta["int8"] = {"file": report.path.name, "calibration_images": report.calibration_images,
                    "val_images": report.val_images, "val_acc_float32": report.float_val_acc,
                    "val_acc_int8": report.int8_val_acc, "top1_agreement": report.agreement,
                    "acceptable": report.acceptable}
    ck.atomic_write_json(side, meta)


def _input_batches(source: ExportSource, samples: list[tuple[str, int]], size: int):
    """(float32 NCHW model inputs, int labels) per `size` samples, decoded as the
    Predictor decodes; unreadable files are left out, as training leaves them out."""
    for i in range(0, len(samples), size):
        crops, labels = [], []
        for path, label in samples[i:i + size]:
            try:
                crops.append(source.predictor.preprocess(path))
            except ImageLoadError:
                continue
            labels.append(label)
        if crops:
            yield normalize(torch.stack(crops)).numpy(), np.asarray(labels)
