"""Predict with a trained model.

    python predict.py --image FILE_OR_DIR --checkpoint PATH --device cpu --topk 2
    python predict.py --image DIR --checkpoint PATH --random 1 --n 5
    python predict.py --image DIR --checkpoint PATH --all 1 --csv predictions.csv
    python predict.py --image FILE_OR_DIR --checkpoint PATH --cam cams/ [--cam-class NAME]
    python predict.py --image FILE --checkpoint PATH --min-confidence 0.9   (below it: "unsure")"""
from __future__ import annotations

import argparse
import sys

from cli.common import ArgumentParser, add_model_file_args, bool01, exit_fast, model_file_classes, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Classify an image, a random sample of a folder, or a whole folder.")
    a = p.add_argument
    a("--image", required=True, help="an image file, or a folder (first image; see --random/--all)")
    a("--checkpoint", required=True, help="checkpoint dict (.pt), bare state_dict, full model (with --trust-pickle 1), "
                                          "or an exported model.safetensors (with its model.json)")
    a("--device", default="auto", type=str.lower, help="auto | cpu | cuda | mps")
    a("--topk", type=int, default=2)
    a("--random", type=bool01, default=0, help="1: pick --n random images from the folder")
    a("--n", type=int, default=5)
    a("--seed", type=int, default=None, help="seed for --random (default: different each run)")
    a("--all", type=bool01, default=0, help="1: every image in the folder tree, in batches")
    a("--csv", default=None, help="write file,label,p,topk rows to this CSV")
    a("--batch-size", type=int, default=None, help="images per forward pass (default: 8 on CPU, 32 on GPU)")
    add_model_file_args(p)
    a("--cam", default=None, metavar="DIR", help="write Grad-CAM heatmaps here: <stem>_cam.png (blend) and "
      "<stem>_cam.npy (float32 map, the image's height x width, 0..1) per image")
    a("--cam-class", default=None, metavar="NAME", help="class the CAM is for (default: each image's top-1)")
    a("--min-confidence", type=float, default=None,
      help="answers whose top probability is below this are 'unsure' (the best guess is still shown)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _predict(args))


def _predict(args) -> int:
    from core.device import configure_threads
    from core.errors import UserError
    from core.cam import CamSettings
    from core.predict import Predictor, choose_images

    configure_threads()
    for flag, value in (("--topk", args.topk), ("--n", args.n), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1 (got {value})")
    classes = model_file_classes(args)
    if args.all and args.random:
        raise UserError("--all 1 and --random 1 exclude each other: every image, or --n random ones")
    from core.evaluate import check_min_confidence, is_unsure
    min_conf = check_min_confidence(args.min_confidence)
    csv_path = check_csv_path(args.csv) if args.csv else None
    cam = CamSettings(args.cam, args.cam_class).validate()
    images = choose_images(args.image, bool(args.random), args.n, bool(args.all), args.seed)
    pred = Predictor.load(args.checkpoint, args.device, bool(args.trust_pickle), args.arch, classes)
    cam.check_model(pred)  # a wrong --cam-class, or a model without a CAM layer, fails before any work
    for note in prediction_notes(args, pred, classes, len(images)):
        print(f"NOTE: {note}", file=sys.stderr)
    print(f"CHECKPOINT: {args.checkpoint}")
    print(f"format: {pred.info.get('format')}")
    if "best_epoch" in pred.info:
        print(f"best_epoch: {pred.info['best_epoch']}")
        print(f"best_val_acc: {pred.info['best_val_acc']:.4f}" if pred.info.get("best_val_acc") is not None else "best_val_acc: n/a")
    print(f"class_names: {pred.class_names}")
    rows, failed, results = [], 0, []
    for r in pred.predict_paths(images, args.topk, args.batch_size):
        results.append(r)
        print(f"IMAGE: {r.path}")
        if r.error:
            failed += 1
            print(f"ERROR: {r.error}")
            if len(images) == 1:
                print(f"error: {r.path}: {r.error}", file=sys.stderr)
            continue
        print("TOPK:")
        for i, (label, p) in enumerate(r.topk, 1):
            print(f"  {i}) {label}  p={p:.4f}")
        row = {"file": r.path, "label": r.label, "p": f"{r.p:.4f}", "topk": ";".join(f"{lab}:{p:.4f}" for lab, p in r.topk)}
        if min_conf is not None:
            unsure = is_unsure(r.p, min_conf)
            print(f"ANSWER: unsure (best guess {r.label}, p={r.p:.4f} is below --min-confidence {min_conf:g})"
                  if unsure else f"ANSWER: {r.label}")
            row["unsure"] = int(unsure)
        rows.append(row)
    if csv_path:
        from core.fileio import atomic_write_csv
        try:
            atomic_write_csv(csv_path, rows)
        except OSError as e:
            raise UserError(f"could not write --csv {args.csv}: {e.strerror or e}") from None
        print(f"CSV: {args.csv} ({len(rows)} rows)")
    if cam.out_dir is not None:
        write_cams(pred, results, cam, args.batch_size)
    if len(images) > 1:
        for line in folder_check_lines(results, pred.class_names):
            print(line)
    if failed and len(images) > 1:
        print(f"{failed} of {len(images)} image(s) could not be read", file=sys.stderr)
    return 2 if failed == len(images) else 0


def write_cams(pred, results, cam, batch_size) -> None:
    """<stem>_cam.png and <stem>_cam.npy per predicted image, one CAM line each."""
    from core.cam import image_cams, unique_stems, write_cam_files
    stems = dict(zip((r.path for r in results), unique_stems([r.path for r in results])))
    n = 0
    for c in image_cams(pred, results, cam.class_name, batch_size):
        if c.error:
            print(f"CAM: {c.path}: not written ({c.error})", file=sys.stderr)
            continue
        png, npy = write_cam_files(cam.out_dir, stems[c.path], c.image, c.cam)
        n += 1
        print(f"CAM: {c.path} -> {png} ({c.class_name}; map {npy.name})")
    print(f"CAMS: {n} written to {cam.out_dir}")


def folder_check_lines(results, classes, shown: int = 20) -> list[str]:
    """CHECK and WRONG lines for images in folders named after classes
    (val/<class>/...): the model against the folder names. [] without such folders."""
    from core.metrics import folder_check, folder_labels
    labels = folder_labels([r.path for r in results], classes)
    right, checked, wrong = folder_check([r.label for r in results], labels)  # None for an unreadable file
    if not checked:
        return []
    in_class_folders = sum(y is not None for y in labels)
    unread = f", {in_class_folders - checked} of them unreadable" if in_class_folders > checked else ""
    lines = [f"CHECK: {right}/{checked} = {right / checked:.4f} right against the folder names "
             f"({in_class_folders} of {len(results)} images are in folders named after classes{unread})"]
    lines += [f"  WRONG: {results[i].path} (predicted {results[i].label}, folder {labels[i]})" for i in wrong[:shown]]
    if len(wrong) > shown:
        lines.append(f"  ... {len(wrong) - shown} more wrong (their IMAGE lines above)")
    return lines


def check_csv_path(path: str):
    """Fail before predicting a whole folder, not after."""
    import os
    from pathlib import Path

    from core.errors import UserError
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"--csv {path} is a folder; give a file name, e.g. {p / 'predictions.csv'}")
    # An existing file is replaced only if it is a CSV: a typo must not turn an
    # image, a checkpoint, a source file or /dev/null into a table.
    if p.exists() and not p.is_file():
        raise UserError(f"--csv {path} is not a regular file; give a file name, e.g. predictions.csv")
    if p.exists() and p.suffix.lower() != ".csv" and not _is_our_csv(p):
        raise UserError(f"--csv {path} already exists and is not a .csv file; it was left alone. Give a new name "
                        f"or an existing .csv file to replace")
    if not p.parent.is_dir():
        above = next((a for a in p.parents if a.exists()), None)  # the nearest part of the path that is there
        if above is not None and not above.is_dir():
            raise UserError(f"--csv {path}: {above} is a file, not a folder; give a file name in a folder")
        raise UserError(f"--csv {path}: the folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise UserError(f"--csv {path}: the folder {p.parent} is not writable")
    return p


def _is_our_csv(p) -> bool:
    """An earlier --csv output of this tool, whatever its name: its header, or
    empty (a run whose every image failed writes no rows)."""
    try:
        with open(p, "rb") as f:
            head = f.read(64)
        return head == b"" or head.startswith(b"file,label,p,topk")
    except OSError:
        return False


def prediction_notes(args, pred, classes, n_images: int) -> list[str]:
    fmt = pred.info.get("format")
    notes = []
    recorded = fmt in ("checkpoint dict", "safetensors export")  # arch and classes come from the file (its model.json)
    if args.arch and recorded and pred.info.get("arch") != args.arch:
        notes.append(f"--arch {args.arch} ignored: the checkpoint is a {pred.info.get('arch')} model")
    if classes and recorded and pred.class_names != classes:
        notes.append(f"--classes ignored: the checkpoint names its classes {pred.class_names}")
    if not classes and fmt == "state_dict":
        notes.append("a bare state_dict has no class names; pass --classes, e.g. --classes cat,fish")
    elif not classes and pred.info.get("class_names_recorded") is False:
        notes.append(f"the {fmt} records no class names, so they are numbered; pass --classes, e.g. --classes cat,fish")
    if fmt in ("state_dict", "full model (pickle)"):
        notes.append(f"a {fmt} keeps no fitted temperature, so p is the model's raw softmax (uncalibrated); "
                     f"the run's checkpoint dict (best_acc.pt) gives calibrated p")
    if args.random and n_images < args.n:
        notes.append(f"the folder has {n_images} image(s), fewer than --n {args.n}: predicting all of them")
    return notes


if __name__ == "__main__":
    exit_fast(main())
