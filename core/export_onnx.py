"""ONNX: model.onnx by torch.onnx.export (dynamo=True, torch's recommended exporter)
checked by onnx.checker and against the PyTorch model in ONNX Runtime; ONNX
Runtime sessions with clear errors; the optional model.int8.onnx (static
quantization) scored against float32 on the val images."""
from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import fileio
from .data import normalize
from .errors import CheckpointError, ImageLoadError, UserError, first_line
from .export_formats import (INPUT_NAME, INT8_NAME, OUTPUT_NAME, SIDECAR_NAME, ExportError, compare,
                             read_json_quietly, reference_logits)
from .zipimport import file_sha256

if TYPE_CHECKING:
    from .export import ExportSource

# int8 is reported as not good enough when val accuracy drops by more than this.
INT8_MAX_DROP = 0.01
MAX_CALIBRATION_IMAGES = 200
MAX_INT8_VAL_IMAGES = 2000  # int8 vs float32 is scored on at most this many val images (a seeded sample)


def write_onnx(model, program, path: Path, x: torch.Tensor) -> float:
    """model.onnx from the torch.export program (batch dimension dynamic, named
    "batch"), after onnx.checker and ONNX Runtime agree with the PyTorch model on x."""
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
    diff = compare(torch.from_numpy(got), reference_logits(model, x), "ONNX Runtime")
    fileio.atomic_write_bytes(path, data)
    return diff


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


# ---------------------------------------------------------------- int8

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
    fileio.atomic_write_bytes(out_path, data)
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
    meta = read_json_quietly(side)
    if meta.get("source", {}).get("sha256") != source.meta["source"]["sha256"]:
        return
    meta.setdefault("files", {})[report.path.name] = file_sha256(report.path)
    meta["int8"] = {"file": report.path.name, "calibration_images": report.calibration_images,
                    "val_images": report.val_images, "val_acc_float32": report.float_val_acc,
                    "val_acc_int8": report.int8_val_acc, "top1_agreement": report.agreement,
                    "acceptable": report.acceptable}
    fileio.atomic_write_json(side, meta)


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
