"""Classify images with an exported model.onnx: no PyTorch needed.

    pip install -r deploy/requirements.txt          # onnxruntime, numpy, pillow
    python predict_onnx.py --model export/model.onnx --image photo.jpg --topk 2
    python predict_onnx.py --model export/model.onnx --image folder/    # every image under it

Reads model.json beside the model (class names, preprocessing, temperature) and
prints the same IMAGE:/TOPK: lines as the training tool's predict.py, with the
same preprocessing: EXIF orientation, RGB (transparency on white), shorter side
to 256 with torchvision's antialiased bilinear resize (reproduced exactly below),
center crop 224, ImageNet normalisation. Exit codes: 0 at least one image
predicted, 2 bad input (or no image readable), 1 a missing package."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit
REDUCE_ABOVE_PIXELS = 4096 * 4096  # larger images are box-reduced first, as the training tool does
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                7: "TRANSVERSE", 8: "ROTATE_90"}


class Refused(Exception):
    """Bad input: printed as one `error:` line, exit code 2."""


# ---------------------------------------------------------------- images

def load_rgb(path: str, min_side: int):
    """A fully decoded, upright RGB PIL image, decoded as the training tool does
    (a JPEG at least twice min_side is decoded at reduced scale)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    with Image.open(path) as img:
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ValueError(f"image is too large ({w}x{h})")
        img.seek(0)
        if img.format == "JPEG" and min(w, h) >= 2 * min_side:
            img.draft(img.mode, (min_side, min_side))
        img.load()
        w, h = img.size
        k = min(w, h) // (2 * min_side) if w * h > REDUCE_ABOVE_PIXELS else 1
        if k < 2:
            return to_rgb(upright(img, img))
        try:
            small = img.reduce(k)
        except ValueError:  # palette or 1-bit images cannot be averaged: convert first
            small = to_rgb(img).reduce(k)
        return to_rgb(upright(img, small))


def upright(img, pixels):
    """`pixels` turned by img's EXIF orientation; a malformed EXIF block means no turn."""
    from PIL import Image

    try:
        name = _ORIENTATION.get(int(img.getexif().get(0x0112, 1)))
    except Exception:
        return pixels
    return pixels.transpose(getattr(Image.Transpose, name)) if name else pixels


def to_rgb(img):
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # scale to 8 bits instead of clipping
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0
        else:
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8), mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _taps(in_size: int, out_size: int):
    """torchvision's antialiased bilinear resize of uint8 images (Pillow-SIMD's
    fixed-point scheme): per output pixel, the input indices and integer weights
    with `precision` fractional bits. Exact, so crops equal the training tool's."""
    import numpy as np

    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size) + 0.5)
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xsize = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    j = np.arange(int(xsize.max()))
    w = np.maximum(0.0, 1.0 - np.abs((j + xmin[:, None] - center[:, None] + 0.5) * invscale))
    w[j >= xsize[:, None]] = 0.0
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=w, where=total != 0.0)
    wmax, precision = float(w.max()), 0
    while precision < 22 and int(0.5 + wmax * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    idx = np.minimum(xmin[:, None] + j, in_size - 1)
    return idx, np.floor(w * (1 << precision) + 0.5).astype(np.int32), precision


def _apply(a, axis: int, idx, weights, precision: int):
    """Each output pixel along `axis`: the rounded fixed-point sum of its taps."""
    import numpy as np

    shape = [1] * a.ndim
    shape[axis] = idx.shape[0]
    acc = np.full(a.shape[:axis] + (idx.shape[0],) + a.shape[axis + 1:], 1 << (precision - 1), np.int32)
    for k in range(idx.shape[1]):
        acc += np.take(a, idx[:, k], axis=axis) * weights[:, k].reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resized_crop(hwc, size: int, crop: int):
    """Resize(size) (shorter side to `size`, the longer truncated as torchvision
    computes it; width pass first, each pass rounded to uint8) then
    CenterCrop(crop), computing only the pixels the crop keeps: an output pixel
    depends on its own taps only, and the weights come from the whole axis."""
    h, w = hwc.shape[:2]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    nh, nw = (h, w) if short == size else (size, new_long) if h <= w else (new_long, size)
    if nh < crop or nw < crop:
        raise ValueError(f"image is smaller than the {crop}x{crop} crop after resizing")
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    if (nh, nw) == (h, w):
        return hwc[top:top + crop, left:left + crop]
    vidx, vweights, vprecision = _taps(h, nh)
    vidx, vweights = vidx[top:top + crop], vweights[top:top + crop]
    first = int(vidx.min())
    rows = hwc[first:int(vidx.max()) + 1]  # only the input rows the kept output rows read
    hidx, hweights, hprecision = _taps(w, nw)
    wide = _apply(rows, 1, hidx[left:left + crop], hweights[left:left + crop], hprecision)
    return _apply(wide, 0, vidx - first, vweights, vprecision)


def model_input(path: str, meta: dict):
    """Image file -> float32 CHW, normalised, as the model.json describes."""
    import numpy as np

    resize, crop = int(meta.get("resize", 256)), int(meta.get("crop", 224))
    a = resized_crop(np.asarray(load_rgb(path, resize), dtype=np.uint8), resize, crop)
    x = a.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(meta.get("mean", (0.485, 0.456, 0.406)), np.float32).reshape(3, 1, 1)
    std = np.asarray(meta.get("std", (0.229, 0.224, 0.225)), np.float32).reshape(3, 1, 1)
    return (x - mean) / std


def list_images(target: str) -> list[str]:
    p = Path(target).expanduser()
    if p.is_file():
        return [str(p)]
    if p.exists() and not p.is_dir():
        raise Refused(f"--image {p} is not a regular file or folder (a pipe or device?)")
    if not p.is_dir():
        raise Refused(f"--image {p} does not exist (give an image file or a folder of images)")
    images = sorted(str(f) for f in p.rglob("*")
                    if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS) and not f.name.startswith("."))
    if not images:
        raise Refused(f"no images ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}) found under {p}")
    return images


# ---------------------------------------------------------------- model

def read_meta(model_path: Path) -> dict:
    side = model_path.with_suffix(".json")  # cats.onnx -> cats.json, else the model.json export.py wrote
    if not side.is_file():
        side = model_path.with_name("model.json")
    if not side.is_file():
        raise Refused(f"{side} is missing: it holds the class names and preprocessing; copy the model.json that "
                      f"export.py wrote beside {model_path.name}")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Refused(f"{side} is not readable JSON ({e})") from None
    names = meta.get("class_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise Refused(f"{side} has no class_names list")
    t = meta.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
        raise Refused(f"{side}: temperature is {t!r}; expected a number above 0")
    return meta


def open_model(model_path: Path, threads: int | None = None):
    import onnxruntime as ort

    if not model_path.is_file():
        raise Refused(f"--model {model_path} does not exist" if not model_path.exists() else f"--model {model_path} is not a file")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise Refused(f"{model_path} is not a loadable ONNX model (truncated or damaged?): {reason}") from None


def check_listed(model_path: Path, meta: dict) -> None:
    """export.py's model.json lists the SHA-256 of each file it describes. A model
    file matching none of them (left from an export of another checkpoint into the
    same folder) would run with another model's classes, preprocessing and
    temperature: refused. A renamed file still matches; a JSON without the list
    (written by hand) is taken as it is."""
    files = meta.get("files")
    listed = {v for v in files.values() if isinstance(v, str)} if isinstance(files, dict) else set()
    if not listed or not model_path.is_file():
        return
    digest = hashlib.sha256()
    with open(model_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() not in listed:
        raise Refused(f"the model.json beside {model_path} describes another export (no file it lists has "
                      f"{model_path.name}'s SHA-256): {model_path.name} is left from an export of another "
                      f"checkpoint; export that checkpoint again into this folder")


class OnnxClassifier:
    """model.onnx + model.json: images in, (label, probability) lists out."""

    def __init__(self, model_path, threads: int | None = None):
        self.path = Path(model_path).expanduser()
        self.meta = read_meta(self.path)
        check_listed(self.path, self.meta)
        self.session = open_model(self.path, threads)
        self.class_names = list(self.meta["class_names"])
        self.input_name = self.meta.get("input_name", self.session.get_inputs()[0].name)
        self.temperature = float(self.meta.get("temperature", 1.0))
        n_out = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.class_names):
            raise Refused(f"{self.path} has {n_out} outputs but model.json names {len(self.class_names)} classes")

    def probabilities(self, batch):
        import numpy as np

        logits = self.session.run(None, {self.input_name: batch})[0].astype(np.float64) / self.temperature
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def topk(self, probs, k: int) -> list[tuple[str, float]]:
        order = sorted(range(len(probs)), key=lambda i: -probs[i])[:max(1, min(k, len(probs)))]
        return [(self.class_names[i], float(probs[i])) for i in order]

    def predict_paths(self, paths: list[str], k: int, batch_size: int = 8):
        """Yield (path, topk, error) per path; an unreadable image gives an error, not a stop."""
        import numpy as np

        for start in range(0, len(paths), batch_size):
            chunk, good, xs, errors = paths[start:start + batch_size], [], [], {}
            for p in chunk:
                try:
                    xs.append(model_input(p, self.meta))
                    good.append(p)
                except Exception as e:  # a damaged file must not end a folder run
                    errors[p] = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            probs = self.probabilities(np.stack(xs)) if xs else []
            rows = {p: self.topk(probs[i], k) for i, p in enumerate(good)}
            for p in chunk:
                yield p, rows.get(p, []), errors.get(p)


# ---------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Classify images with an exported model.onnx (no PyTorch needed).")
    p.add_argument("--model", required=True, help="model.onnx (or model.int8.onnx) with model.json beside it")
    p.add_argument("--image", required=True, help="an image file, or a folder (every image under it)")
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: one per core)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        print(f"error: the package {e.name!r} is not installed: pip install -r "
              f"{Path(__file__).with_name('requirements.txt')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def run(args) -> int:
    for flag, value in (("--topk", args.topk), ("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise Refused(f"{flag} must be >= 1 (got {value})")
    images = list_images(args.image)
    clf = OnnxClassifier(args.model, args.threads)
    print(f"MODEL: {args.model}")
    print(f"class_names: {clf.class_names}")
    failed = 0
    for path, topk, error in clf.predict_paths(images, args.topk, args.batch_size):
        print(f"IMAGE: {path}")
        if error:
            failed += 1
            print(f"ERROR: {error}")
            continue
        print("TOPK:")
        for i, (label, p) in enumerate(topk, 1):
            print(f"  {i}) {label}  p={p:.4f}")
    if failed:
        print(f"{failed} of {len(images)} image(s) could not be read", file=sys.stderr)
    return 2 if failed == len(images) else 0


if __name__ == "__main__":
    sys.exit(main())
