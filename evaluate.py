"""Evaluate a trained model on a labelled folder: metrics, calibration, and a report.

    python evaluate.py --checkpoint checkpoints/RUN/best_acc.pt
    python evaluate.py --checkpoint PATH --data DIR --out DIR --min-confidence 0.9

DIR holds one sub-folder per class (or is a dataset root whose val/ is used);
default: the validation split the checkpoint was trained with. Writes
predictions.csv and report.html (self-contained: opens offline) to --out."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.common import ArgumentParser, bool01, exit_fast, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Evaluate a checkpoint on a labelled folder and write report.html.")
    a = p.add_argument
    a("--checkpoint", required=True, help="checkpoint dict (.pt), bare state_dict, full model (with --trust-pickle 1), "
                                          "or an exported model.safetensors (with its model.json)")
    a("--data", default=None, help="a folder of <class>/ sub-folders, or a dataset root whose val/ is used "
                                   "(default: the checkpoint's own validation split)")
    a("--out", default=None, help="folder for predictions.csv and report.html (default: evaluation/<run>_<checkpoint>)")
    a("--min-confidence", type=float, default=None, help="answers whose top probability is below this are 'unsure'")
    a("--device", default="auto", type=str.lower, help="auto | cpu | cuda | mps")
    a("--batch-size", type=int, default=None, help="images per forward pass (default: 8 on CPU, 32 on GPU)")
    a("--arch", default=None, type=str.lower, help="architecture of a bare state_dict (resnet18 | mobilenet_v2)")
    a("--classes", default=None, help="comma-separated class names for a bare state_dict or full model")
    a("--trust-pickle", type=bool01, default=0, help="1: allow loading a full pickled model (runs code from the file!)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _evaluate(args))


def config_from_args(args):
    from core.evaluate import EvalConfig
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    return EvalConfig(checkpoint=args.checkpoint, data=args.data, out=args.out, min_confidence=args.min_confidence,
                      device=args.device, batch_size=args.batch_size, trust_pickle=bool(args.trust_pickle),
                      arch=args.arch, classes=classes).validate()


def _evaluate(args) -> int:
    from core.fileio import atomic_write_csv, atomic_write_text
    from core.config import ARCHS
    from core.device import configure_threads
    from core.errors import UserError
    from core.evaluate import evaluate, labelled_images, report_lines
    from core.predict import Predictor
    from core.report import report_html

    configure_threads()
    cfg = config_from_args(args)
    if cfg.arch is not None and cfg.arch not in ARCHS:
        raise UserError(f"--arch {cfg.arch!r} is not supported; choose {' or '.join(ARCHS)}")
    out = check_out_dir(cfg.out, cfg.checkpoint)
    pred = Predictor.load(cfg.checkpoint, cfg.device, cfg.trust_pickle, cfg.arch, cfg.classes)
    labelled = labelled_images(cfg.data, pred.class_names, pred.info, cfg.checkpoint)
    print(f"CHECKPOINT: {cfg.checkpoint}")
    print(f"format: {pred.info.get('format')}")
    print(f"temperature: {pred.temperature:.4f} " + ("(none fitted: probabilities are the plain softmax)"
                                                    if pred.temperature == 1.0 else "(probabilities: softmax(logits / T))"))
    res = evaluate(pred, labelled, cfg.min_confidence, cfg.batch_size)
    for line in report_lines(res):
        print(line)
    for path, reason in res.unreadable[:20]:
        print(f"unreadable: {path}: {reason}", file=sys.stderr)
    try:
        out.mkdir(parents=True, exist_ok=True)
        csv_path = atomic_write_csv(out / "predictions.csv", res.csv_rows())
        html_path = atomic_write_text(out / "report.html", report_html(res, cfg.checkpoint, cam_overlay(pred, res)))
    except OSError as e:
        raise UserError(f"could not write to --out {out}: {e.strerror or e}") from None
    print(f"CSV: {csv_path} ({len(res.rows)} rows)")
    print(f"REPORT: {html_path}")
    return 0


def cam_overlay(pred, res):
    """For the top losses: row -> a function blending that image's Grad-CAM (of
    its predicted class) over it; None when CAMs are not available."""
    from core.evaluate import loss_cams
    wrong, right = res.top_losses()
    cams = loss_cams(pred, wrong + right)
    if cams is None:
        print("NOTE: the top losses are shown without Grad-CAM (core.cam is not available)", file=sys.stderr)
        return None
    return lambda row: cams.get(row["path"])


def check_out_dir(out: str | None, checkpoint: str) -> Path:
    """--out as a folder to write into: fail before predicting, not after."""
    from core.errors import UserError
    if out is None:
        ck = Path(checkpoint).expanduser()
        name = f"{ck.parent.name}_{ck.stem}" if ck.parent.name else ck.stem
        return Path("evaluation") / name
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {out} is a file; give a folder (it gets predictions.csv and report.html)")
    above = next((a for a in [p, *p.parents] if a.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"--out {out}: {above} is a file, not a folder")
    return p


if __name__ == "__main__":
    exit_fast(main())
