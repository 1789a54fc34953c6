"""Export a trained model for use outside this tool.

    python export.py --checkpoint checkpoints/RUN/best_acc.pt
    python export.py --checkpoint checkpoints/RUN/best_acc.pt --format onnx --quantize int8
    python export.py --checkpoint state_dict.pt --arch resnet18 --classes cat,fish --out my_export

Writes model.onnx (ONNX Runtime, servers, phones), model.pt2 (a torch.export
program), model.safetensors (weights only: safe to share) and model.json (classes,
preprocessing, input/output names) into --out (default: export/ beside the checkpoint)."""
from __future__ import annotations

import argparse
import sys

from cli.common import ArgumentParser, add_model_file_args, exit_fast, model_file_classes, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Export a checkpoint to ONNX, a torch.export program and safetensors, "
                                   "each checked against the PyTorch model.")
    a = p.add_argument
    a("--checkpoint", required=True, help="checkpoint dict (.pt), bare state_dict (with --arch/--classes), full model "
                                          "(with --trust-pickle 1), or an exported model.safetensors")
    a("--format", default=None, help="comma-separated: onnx, pt2, safetensors (default: all three)")
    a("--out", default=None, help="output folder (default: export/ beside the checkpoint)")
    a("--quantize", default=None, type=str.lower, choices=["int8"],
      help="int8: also write model.int8.onnx, calibrated on up to 200 training images and scored on the val images")
    a("--data-dir", default=None, help="dataset for --quantize (default: the folder the checkpoint was trained on)")
    add_model_file_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _export(args))


def _export(args) -> int:
    from core.device import configure_threads
    from core.errors import UserError
    from core import export as ex

    configure_threads()
    classes = model_file_classes(args)
    formats = list(ex.parse_formats(args.format))
    if args.quantize and "onnx" not in formats:
        formats.insert(0, "onnx")
        print("NOTE: --quantize int8 quantizes model.onnx, so onnx is exported too", file=sys.stderr)
    out = ex.default_out_dir(args.checkpoint) if args.out is None else args.out
    if not str(out).strip():
        raise UserError("--out is empty; give a folder (default: export/ beside the checkpoint)")

    source = ex.load_source(args.checkpoint, bool(args.trust_pickle), args.arch, classes)
    meta = source.meta
    print(f"CHECKPOINT: {args.checkpoint}")
    print(f"format: {source.predictor.info.get('format')}")
    print(f"arch: {meta.get('arch') or 'unknown (not a torchvision model this tool builds)'}")
    print(f"class_names: {source.class_names}")
    if meta.get("best_epoch") is not None:
        print(f"best_epoch: {meta['best_epoch']}")
    if meta.get("best_val_acc") is not None:
        print(f"best_val_acc: {meta['best_val_acc']:.4f}")
    if meta.get("temperature") is not None:
        print(f"temperature: {meta['temperature']:g}")
    print(f"EXPORT: {out}")
    notes, onnx_path = [], None
    for f in ex.export_formats(source, out, formats):
        size = f"{f.bytes / 1e6:.1f} MB" if f.bytes >= 100_000 else f"{f.bytes:,} bytes"
        check = f"; max |logit diff| vs PyTorch {f.max_abs_diff:.1e}" if f.format in ("onnx", "pt2") else ""
        print(f"  {f.format}: {f.path} ({size}, {f.seconds:.1f} s{check})", flush=True)
        notes += f.notes
        if f.format == "onnx":
            onnx_path = f.path
    if args.quantize:
        report = ex.quantize_int8(source, onnx_path, data_dir=args.data_dir)
        for line in report.lines():
            print(line)
            if line.startswith("WARNING"):
                print(line, file=sys.stderr)
    for note in notes:
        print(f"NOTE: {note}", file=sys.stderr)
    if onnx_path:
        print(f"NEXT: python deploy/predict_onnx.py --model {onnx_path} --image photo.jpg  (needs only "
              f"onnxruntime, numpy, pillow: deploy/requirements.txt)")
    return 0


if __name__ == "__main__":
    exit_fast(main())
