"""Prediction: load any supported model file once, then classify images in batches."""
from __future__ import annotations

import copy
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from . import checkpoint as ck
from .data import center_crop, normalize, resize_short_side
from .device import inference_batch_size, resolve_device
from .checkpoint_rules import check_class_names, shown
from .errors import CheckpointError, ImageLoadError, UserError, first_line
from .export_formats import read_safetensors_export
from .fileio import load_file
from .metrics import clean_confusion
from .models import fold_batchnorm
from .images import is_image_name, load_rgb


@dataclass
class Prediction:
    path: str
    topk: list[tuple[str, float]]  # best first
    error: str | None = None
    probs: torch.Tensor | None = None  # every class's probability, when asked for (predict_paths keep_probs)

    @property
    def label(self) -> str | None:
        return self.topk[0][0] if self.topk else None

    @property
    def p(self) -> float | None:
        return self.topk[0][1] if self.topk else None


class Predictor:
    """A model in eval mode plus its class names and preprocessing."""

    def __init__(self, model, class_names, device="cpu", info: dict | None = None, resize=256, crop=224):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self._infer = _inference_copy(self.model)  # what forward passes run: same function, faster
        self.class_names = list(class_names)
        self.info = info or {}
        self.resize, self.crop = resize, crop
        # Temperature scaling (core.calibration): every probability shown is softmax(logits / T); 1 when none was fitted.
        self.temperature = float(self.info.get("temperature") or 1.0)
        self._lock = threading.Lock()  # one forward at a time per model: torch threads are already busy

    @classmethod
    def load(cls, path, device="cpu", trust_pickle=False, arch=None, classes=None) -> "Predictor":
        """Checkpoint dict (ours or the reference's), bare state_dict (with arch/classes),
        or a full pickled model (only with trust_pickle), or an exported
        model.safetensors (arch and classes from its model.json; arch/classes
        are not used). Every field is checked (core.checkpoint_rules): a damaged
        or hostile file is a CheckpointError."""
        if str(path).lower().endswith(".safetensors"):  # weights only: never unpickled
            e = read_safetensors_export(path)
            return cls(e.model, e.class_names, device, e.info, e.resize, e.crop)
        obj = load_file(path, trust_pickle=trust_pickle)
        if isinstance(obj, torch.nn.Module):
            n = _out_features(obj)
            names = check_class_names(classes, n, path, "{setting:classes}")
            if names is None:  # the class names export_full_model attaches, if they are usable
                try:
                    names = check_class_names(getattr(obj, "class_names", None), n, path, "the model's class_names")
                except CheckpointError:
                    names = None
            info = {"format": "full model (pickle)", "path": str(path), "class_names_recorded": names is not None}
            return cls(ck.check_weights(obj.float(), path), names or [f"class_{i}" for i in range(n)], device, info)
        if isinstance(obj, dict) and "model_state" in obj:
            if classes and not obj.get("class_names"):  # a checkpoint that never named its classes
                obj = dict(obj, class_names=check_class_names(classes, None, path, "{setting:classes}"))
            c = ck.normalise_checkpoint(obj, path)
            info = {"format": "checkpoint dict", "path": str(path), "epoch": c.get("epoch"),
                    "best_epoch": c.get("best_epoch"), "best_val_acc": c.get("best_val_acc"),
                    "arch": c["arch"], "weights": c.get("weights"), "class_names_recorded": c["class_names_recorded"],
                    "val_confusion": clean_confusion(c.get("val_confusion"), len(c["class_names"])),
                    "args": c.get("args") or {}, "data_files": c.get("data_files"),
                    **({"temperature": c["temperature"]} if "temperature" in c else {})}
            pre = c["preprocess"]
            return cls(ck.model_from_checkpoint(c, path), c["class_names"], device, info, pre["resize"], pre["crop"])
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            if classes:
                check_class_names(classes, None, path, "{setting:classes}")
            model, names = ck.model_from_state_dict(obj, arch, classes, path)
            return cls(model, names, device, {"format": "state_dict", "path": str(path),
                                              "class_names_recorded": bool(classes)})
        raise CheckpointError(f"{path} is not a checkpoint dict, a state_dict or a model")

    def default_batch_size(self) -> int:
        """Images per forward pass: the device's usual batch at a 224 crop, fewer
        for larger crops so that a batch's activations stay about that size."""
        return max(1, inference_batch_size(self.device) * 224 ** 2 // self.crop ** 2)

    def preprocess(self, image) -> torch.Tensor:
        """Path or PIL image -> uint8 crop, exactly as training's validation transform."""
        rgb = load_rgb(image, min_side=self.resize)
        return center_crop(resize_short_side(TF.pil_to_tensor(rgb), self.resize), self.crop)

    def probabilities(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, C) softmax probabilities for PIL images, in one batch."""
        return self._forward(torch.stack([self.preprocess(im) for im in images]))

    def _forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = normalize(crops).to(self.device).contiguous(memory_format=torch.channels_last)
        with self._lock, torch.inference_mode():
            try:
                out = self._infer(x)
            except Exception as e:  # a pickled model is someone else's code; ours are checked at load
                if self.info.get("format") != "full model (pickle)":
                    raise
                raise CheckpointError(f"{self.info.get('path')}: the pickled model failed on an image: "
                                      f"{type(e).__name__}: {first_line(e)}") from None
            if not torch.is_tensor(out) or tuple(out.shape) != (len(x), len(self.class_names)):
                raise CheckpointError(f"{self.info.get('path')}: the model gives {shown(out)} for {len(x)} "
                                      f"image(s); expected one score per class ({len(self.class_names)})")
            probs = torch.softmax(out.float() / self.temperature, dim=1).cpu()
        if not torch.isfinite(probs).all():  # finite weights can still overflow float32 on the way
            raise CheckpointError(f"{self.info.get('path', 'the model')} gives non-finite outputs (NaN or infinity): "
                                  f"its weights are out of range, so it cannot classify anything; use another checkpoint")
        return probs

    def topk(self, probs: torch.Tensor, k: int) -> list[tuple[str, float]]:
        k = max(1, min(int(k), len(self.class_names)))
        p, i = probs.topk(k)
        return [(self.class_names[j], float(v)) for v, j in zip(p.tolist(), i.tolist())]

    def predict_image(self, image, k: int = 5) -> list[tuple[str, float]]:
        """One PIL image or path -> top-k (label, probability)."""
        return self.topk(self._forward(self.preprocess(image)[None])[0], k)

    def cam(self, crops: torch.Tensor, class_indices) -> "np.ndarray":
        """Grad-CAM maps, float32 [N, crop, crop] in [0, 1], of uint8 crops (as
        preprocess() gives them) for the given class indices (core.cam). Runs the
        unfolded model with gradients; prediction itself never does."""
        from .cam import cam_maps, model_arch
        x = normalize(crops).to(self.device).contiguous(memory_format=torch.channels_last)
        with self._lock:
            try:
                return cam_maps(self.model, x, class_indices, self.info.get("arch") or model_arch(self.model))
            except UserError:
                raise
            except Exception as e:  # a pickled model is someone else's code
                if self.info.get("format") != "full model (pickle)":
                    raise
                raise CheckpointError(f"{self.info.get('path')}: Grad-CAM failed on the pickled model: "
                                      f"{type(e).__name__}: {first_line(e)}") from None

    def _load_chunk(self, paths: list[str]) -> tuple[list[str], list[torch.Tensor], dict[str, str]]:
        good, crops, errors = [], [], {}
        for p in paths:
            try:
                crops.append(self.preprocess(p))
                good.append(p)
            except ImageLoadError as e:
                errors[p] = e.reason
        return good, crops, errors

    def predict_paths(self, paths, k: int = 5, batch_size: int | None = None, keep_probs: bool = False):
        """Yield a Prediction per path, batching the forward pass (default batch:
        default_batch_size()) while a worker thread decodes the next batch.
        Unreadable files give a Prediction with `error` instead of stopping the loop.
        keep_probs: each Prediction also holds all classes' probabilities."""
        paths = [str(p) for p in paths]
        bs = batch_size or self.default_batch_size()
        chunks = [paths[i:i + bs] for i in range(0, len(paths), bs)]
        if not chunks:
            return
        with ThreadPoolExecutor(1) as pool:  # Pillow and torch resize release the GIL
            pending = pool.submit(self._load_chunk, chunks[0])
            for n, chunk in enumerate(chunks):
                good, crops, errors = pending.result()
                if n + 1 < len(chunks):
                    pending = pool.submit(self._load_chunk, chunks[n + 1])
                probs = self._forward(torch.stack(crops)) if crops else None
                row = {p: i for i, p in enumerate(good)}
                for p in chunk:
                    i = row.get(p)
                    yield Prediction(p, self.topk(probs[i], k) if i is not None else [], errors.get(p),
                                     probs[i] if keep_probs and i is not None else None)


def _inference_copy(model):
    """BatchNorm-folded copy; a pickled custom model that cannot be deep-copied runs as is."""
    try:
        return fold_batchnorm(model)
    except (RuntimeError, TypeError, copy.Error):
        return model


def _out_features(model) -> int:
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not last:
        raise CheckpointError("the pickled model has no Linear head")
    return last[-1].out_features


def list_images(folder, recursive: bool = True) -> list[str]:
    root = Path(folder)
    it = root.rglob("*") if recursive else root.iterdir()
    return sorted(str(p) for p in it if p.is_file() and is_image_name(p) and not p.name.startswith("."))


def choose_images(target, random_pick: bool = False, n: int = 5, all_images: bool = False, seed: int | None = None) -> list[str]:
    """The reference's rules: a file -> itself; a folder -> its first image, or
    `n` random ones (seedable), or every image with all_images."""
    if not str(target).strip():
        raise UserError("{setting} is empty; give an image file or a folder of images", field="image", value=str(target))
    p = Path(target).expanduser()
    if p.is_file():
        return [str(p)]
    if p.exists() and not p.is_dir():
        raise UserError(f"{{setting}} {p} is not a regular file or folder (a pipe or device?)", field="image", value=str(p))
    if not p.is_dir():
        raise UserError(f"{{setting}} {p} does not exist (give an image file or a folder of images)",
                        field="image", value=str(p))
    images = list_images(p)
    if not images:
        raise UserError(f"no images (jpg, png, gif, bmp, tif, webp) found under {p}")
    if all_images:
        return images
    if random_pick:
        return random.Random(seed).sample(images, min(n, len(images)))
    return images[:1]


_PREDICTORS: dict = {}
_PRED_LOCK = threading.Lock()


def cached_predictor(path, device="cpu", trust_pickle=False) -> Predictor:
    """Load once per (file, mtime); the app asks for the same checkpoint every request."""
    try:
        st = os.stat(path)
    except OSError:
        raise CheckpointError(f"checkpoint {path} does not exist or cannot be read") from None
    key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size, device, trust_pickle)
    with _PRED_LOCK:
        if key not in _PREDICTORS:
            if len(_PREDICTORS) >= 4:
                _PREDICTORS.pop(next(iter(_PREDICTORS)))
            _PREDICTORS[key] = Predictor.load(path, device, trust_pickle)
        return _PREDICTORS[key]
