"""In-process prediction measurements, run as a child of bench/run_bench.py.

single: Predictor.predict_image(path) and predict_image(PIL image), warm, interleaved
        with bare forward passes on an already preprocessed 1x3x224x224 tensor (channels_last,
        inference_mode: the best a caller could do) of (a) the trained model as loaded and (b) the
        BatchNorm-folded copy the Predictor runs internally (so (b) isolates the pre/post-processing cost).
folder: Predictor.predict_paths(paths) (batched, decode-ahead) vs two one-image-at-a-time loops:
        `[predict_image(p) for p in paths]` (our own single-image path) and the reference's loop
        (PIL open + transforms.Compose(Resize, CenterCrop, ToTensor, Normalize) + model(x) under
        no_grad, model as loaded, contiguous); interleaved passes; checks all give the same top-1.
Prints one JSON object on the last line of stdout."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import copy  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

from core.images import load_rgb  # noqa: E402
from core.predict import Predictor, list_images  # noqa: E402


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def single(pred: Predictor, image: str, n: int) -> dict:
    pil = load_rgb(image)
    x = torch.stack([pred.preprocess(pil)])
    from core.data import normalize
    x = normalize(x).contiguous(memory_format=torch.channels_last)
    model = getattr(pred, "_infer", pred.model)  # the module predict_image itself runs
    for _ in range(10):  # warm-up (the first batch-1 calls build oneDNN kernels)
        pred.predict_image(image)
        with torch.inference_mode():
            model(x)
            pred.model(x)
    t_path, t_pil, t_bare, t_loaded = [], [], [], []
    c_path, c_pil, c_bare, c_loaded = [], [], [], []  # process CPU time: less sensitive to other processes' load

    def bare():
        with torch.inference_mode():
            model(x)

    def bare_loaded():
        with torch.inference_mode():
            pred.model(x)
    for _ in range(n):  # interleaved so machine load hits all alike
        for fn, tl, cl in ((lambda: pred.predict_image(image), t_path, c_path),
                           (lambda: pred.predict_image(pil), t_pil, c_pil), (bare, t_bare, c_bare),
                           (bare_loaded, t_loaded, c_loaded)):
            c, t = time.process_time(), time.perf_counter()
            fn()
            tl.append(time.perf_counter() - t)
            cl.append(time.process_time() - c)
    r_path = med(t_path) / med(t_bare)  # ratio of medians (n interleaved calls each)
    r_pil = med(t_pil) / med(t_bare)
    return {"n": n, "image": image, "size": list(pil.size), "predict_path_ms": med(t_path) * 1e3,
            "predict_pil_ms": med(t_pil) * 1e3, "bare_forward_ms": med(t_bare) * 1e3,
            "bare_loaded_ms": med(t_loaded) * 1e3, "ratio_path_loaded": med(t_path) / med(t_loaded),
            "min_ratio_path_loaded": min(t_path) / min(t_loaded),
            "ratio_path": r_path, "ratio_pil": r_pil,
            "pair_ratio_path": med([a / b for a, b in zip(t_path, t_bare)]),
            "cpu_ms": {"path": med(c_path) * 1e3, "pil": med(c_pil) * 1e3, "bare": med(c_bare) * 1e3},
            "cpu_ratio_path": med(c_path) / med(c_bare), "cpu_ratio_pil": med(c_pil) / med(c_bare),
            "min_ms": {"path": min(t_path) * 1e3, "pil": min(t_pil) * 1e3, "bare": min(t_bare) * 1e3},
            "min_ratio_path": min(t_path) / min(t_bare), "min_ratio_pil": min(t_pil) / min(t_bare),
            "p25_p75_ms": {k: [sorted(v)[len(v) // 4] * 1e3, sorted(v)[3 * len(v) // 4] * 1e3]
                           for k, v in (("path", t_path), ("pil", t_pil), ("bare", t_bare))}}


REFERENCE_TF = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def reference_loop(model, paths: list[str]) -> list[int]:
    """The reference predict.py, one image at a time."""
    out = []
    for p in paths:
        x = REFERENCE_TF(Image.open(p).convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            out.append(int(torch.softmax(model(x), 1).argmax(1)))
    return out


def folder(pred: Predictor, paths: list[str], repeats: int, batch_size: int | None) -> dict:
    batched = list(pred.predict_paths(paths[:32], batch_size=batch_size))  # warm-up
    ref_model = copy.deepcopy(pred.model).to(memory_format=torch.contiguous_format).eval()
    reference_loop(ref_model, paths[:8])
    t = {"b": [], "l": [], "r": []}
    c = {"b": [], "l": [], "r": []}
    for r in range(repeats):
        order = ("b", "l", "r") if r % 2 == 0 else ("r", "l", "b")
        for which in order:
            c0, t0 = time.process_time(), time.perf_counter()
            if which == "b":
                batched = list(pred.predict_paths(paths, batch_size=batch_size))
            elif which == "l":
                loop = [pred.predict_image(p) for p in paths]
            else:
                ref = reference_loop(ref_model, paths)
            t[which].append(time.perf_counter() - t0)
            c[which].append(time.process_time() - c0)
    agree = sum(b.label == lp[0][0] for b, lp in zip(batched, loop))
    agree_ref = sum(b.label == pred.class_names[i] for b, i in zip(batched, ref))
    max_dp = max(abs(b.p - lp[0][1]) for b, lp in zip(batched, loop) if b.label == lp[0][0])
    n = len(paths)
    return {"images": n, "repeats": repeats, "batch_size": batch_size or "default",
            "batched_s": med(t["b"]), "loop_s": med(t["l"]), "reference_s": med(t["r"]),
            "batched_img_per_s": n / med(t["b"]), "loop_img_per_s": n / med(t["l"]),
            "reference_img_per_s": n / med(t["r"]),
            "speedup": med([l / b for b, l in zip(t["b"], t["l"])]), "min_speedup": min(t["l"]) / min(t["b"]),
            "cpu_speedup": med([l / b for b, l in zip(c["b"], c["l"])]),
            "speedup_reference": med([r / b for b, r in zip(t["b"], t["r"])]),
            "min_speedup_reference": min(t["r"]) / min(t["b"]),
            "top1_agree": agree, "top1_agree_reference": agree_ref, "max_abs_dp": max_dp}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--folders", nargs="+", required=True)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--folder-repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the Predictor's own (8 on CPU)")
    args = ap.parse_args()
    t = time.perf_counter()
    pred = Predictor.load(args.checkpoint, device="cpu")
    load_s = time.perf_counter() - t
    paths = [p for f in args.folders for p in list_images(f)]
    out = {"arch": pred.info.get("arch"), "load_s": load_s, "threads": torch.get_num_threads(),
           "single": single(pred, args.image, args.n),
           "folder": folder(pred, paths, args.folder_repeats, args.batch_size)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
